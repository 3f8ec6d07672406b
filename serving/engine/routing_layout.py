"""How one step routes a bucket's tokens: their rows, plain LoRA's fixed gates, the router groups.

A bucket is the adapters of one module with the same rank and top-k; their tokens go through one
routing-kernel call over "virtual" experts (an adapter's offset in the module's stack + its
expert). Everything such a call needs besides the hidden states is known on the host before the
step runs (which rows belong to which adapter, at which offsets, with which scaling), so it is
built there in numpy and copied to the device once per layout, and a layout serves every module
whose bucket has the same adapters, offsets and scales (usually all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .adapter_stacks import AdapterStack
from .adapters import LoadedAdapter
from .upload import upload


@dataclass
class RouterGroup:
    """Adapters of a bucket whose routers have the same expert count: routed with one GEMM."""

    num_experts: int
    top_k: int
    rows: torch.Tensor | None  # their tokens' batch rows (None: every token, in batch order)
    member: torch.Tensor  # each row's adapter, as its position in the module's router stack
    scale: torch.Tensor  # each row's adapter scaling (float32)
    base: torch.Tensor  # each row's first virtual expert id


@dataclass
class BucketLayout:
    """A bucket's rows (plain LoRA adapters' first, then each router group's) with plain LoRA's
    fixed gates and virtual expert ids, or one of two shortcuts where the bucket holds every token
    of the step: one plain adapter (`only_adapter`), or every expert for every token (`dense`)."""

    rows: torch.Tensor | None = None  # None: every token of the step, in batch order
    plain_gates: torch.Tensor | None = None  # [plain rows, 1] float32
    plain_ids: torch.Tensor | None = None  # [plain rows, 1]
    groups: tuple[RouterGroup, ...] = ()
    only_adapter: tuple[int, float] | None = None  # (expert, scaling) of a plain adapter holding every token
    dense: bool = False  # every token, few narrow experts: computed dense-masked, not routed
    dense_gates: torch.Tensor | None = None  # [tokens, experts in the stack] fp32, plain LoRA: each token's scaling


def build_bucket_layout(name: str, bucket: list[tuple[LoadedAdapter, np.ndarray]], experts: AdapterStack,
                        routers: dict[int, AdapterStack], num_tokens: int, width: int, device) -> BucketLayout:
    """The layout of module `name`'s bucket: each adapter with its tokens' batch rows (host), the
    module's expert stack, its router stacks by expert count, the step's token count and the hidden
    width (for the dense rule)."""
    plain = [(adapter, rows) for adapter, rows in bucket if adapter.modules[name].router is None]
    routed: dict[int, list[tuple[LoadedAdapter, np.ndarray]]] = {}
    for adapter, rows in bucket:
        module = adapter.modules[name]
        if module.router is not None:
            routed.setdefault(module.num_experts, []).append((adapter, rows))
    counts = [rows.size for _, rows in plain]
    arrays = {"plain_gates": _per_row([a.modules[name].scaling for a, _ in plain], counts, np.float32)[:, None],
              "plain_ids": _per_row([experts.offsets[a.uid] for a, _ in plain], counts, np.int64)[:, None]}
    row_lists = [rows for _, rows in plain]
    for g, (num_experts, group) in enumerate(routed.items()):
        counts = [rows.size for _, rows in group]
        row_lists += [rows for _, rows in group]
        arrays.update({
            f"group{g}_rows": np.concatenate([rows for _, rows in group]),
            f"group{g}_member": _per_row([routers[num_experts].offsets[a.uid] // num_experts for a, _ in group],
                                         counts, np.int64),
            f"group{g}_scale": _per_row([a.modules[name].scaling for a, _ in group], counts, np.float32),
            f"group{g}_base": _per_row([experts.offsets[a.uid] for a, _ in group], counts, np.int64)})
    rows = np.concatenate(row_lists) if row_lists else np.zeros(0, dtype=np.int64)
    in_batch_order = rows.size == num_tokens and (not routed or (len(routed) == 1 and not plain))
    only_adapter = dense = False
    if in_batch_order:
        # The rows are a permutation of the step's tokens: each per-row array is put in batch order
        # here, so projections skip the gather and the scatter.
        for key in [k for k in arrays if k.endswith("_rows")]:
            del arrays[key]
        for key, values in arrays.items():
            if values.shape[0]:  # plain LoRA's are empty when every adapter is routed
                arrays[key] = np.empty_like(values)
                arrays[key][rows] = values
        only_adapter = len(bucket) == 1 and not routed
        # Every stacked expert's down-projection for every token is cheaper than routing while the
        # experts' ranks add up to under half the width (the training side's rule on the CPU and in float32;
        # in half precision on a GPU training keeps dense up to twice the width, measured for training's
        # thousands of tokens a call, not for decode steps).
        dense = not only_adapter and experts.rows * experts.tensors[0].shape[1] <= width // 2
        if dense and not routed:  # plain LoRA's gates are the same for every module: built once a step
            gates = np.zeros((num_tokens, experts.rows), dtype=np.float32)
            gates[np.arange(num_tokens), arrays["plain_ids"][:, 0]] = arrays["plain_gates"][:, 0]
            arrays = {"dense_gates": gates}
    else:
        arrays["rows"] = rows
    if only_adapter:
        adapter = bucket[0][0]
        return BucketLayout(only_adapter=(experts.offsets[adapter.uid], adapter.modules[name].scaling))
    views = upload(arrays, device)
    groups = tuple(RouterGroup(
        num_experts=num_experts, top_k=group[0][0].modules[name].top_k,
        rows=views.get(f"group{g}_rows"), member=views[f"group{g}_member"], scale=views[f"group{g}_scale"],
        base=views[f"group{g}_base"])
        for g, (num_experts, group) in enumerate(routed.items()))
    return BucketLayout(rows=views.get("rows"), plain_gates=views.get("plain_gates"),
                        plain_ids=views.get("plain_ids"), groups=groups, dense=dense,
                        dense_gates=views.get("dense_gates"))


def _per_row(values: list, counts: list[int], dtype) -> np.ndarray:
    """values[i] repeated counts[i] times, one after another."""
    return np.repeat(np.asarray(values, dtype=dtype), counts)
