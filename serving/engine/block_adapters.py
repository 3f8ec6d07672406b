"""Adapter parts that act on a whole block rather than on one projection.

- HeteroLoRA's shortcut connections: d -> d LoRA maps of the block input x_l, the FFN input h_l or
  the previous block's h_{l-1}, added inside the block's attention or FFN sum
  (`alphalora.adapters.shortcuts` in training).
- The shared-router option: one router per block reads the block input and gates every adapted
  module of the block (`alphalora.adapters.inject.SharedRouter` in training).

Each adapter's part runs on its own tokens. Few adapters of a step have such parts, so they run as
a loop over those adapters rather than through the routing kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from alphalora.adapters.routing import dense_gates, top_k_gates

from .adapters import LoadedAdapter, ModuleAdapter

# (adapter's map, its tokens' rows or None for every row of the step), by (block, shortcut kind)
StepShortcuts = dict[tuple[int, str], list[tuple[ModuleAdapter, torch.Tensor | None]]]
# (adapter, its tokens' rows or None, their dense gates [n, E] in float32), for one block
BlockGates = list[tuple[LoadedAdapter, torch.Tensor | None, torch.Tensor]]


def block_level_rows(adapters: list[tuple[LoadedAdapter, np.ndarray]], num_tokens: int,
                     device) -> dict[int, torch.Tensor | None]:
    """The step's rows of each adapter with block-level parts, by uid, on the device (None where they
    are every row of the step, in order): one copy per adapter per step, read by every block.
    `num_tokens` is the step's, base-model tokens included (they are in no adapter's rows)."""
    return {adapter.uid: None if len(rows) == num_tokens else torch.from_numpy(rows).to(device)
            for adapter, rows in adapters if adapter.shortcuts or adapter.layer_routers}


def step_shortcuts(adapters: list[tuple[LoadedAdapter, np.ndarray]],
                   rows_by_uid: dict[int, torch.Tensor | None]) -> StepShortcuts:
    """The step's shortcut connections; empty when no adapter of the step has one."""
    found: StepShortcuts = {}
    for adapter, _ in adapters:
        for key, module in adapter.shortcuts.items():
            found.setdefault(key, []).append((module, rows_by_uid[adapter.uid]))
    return found


def add_shortcuts(out: torch.Tensor, shortcuts: StepShortcuts, layer: int, **sources: torch.Tensor | None) -> None:
    """Adds into a block's attention or FFN sum `out` the shortcut maps of `layer`, kind by kind
    (`residual1=x_l`, ...), each applied to its source on its adapter's tokens."""
    for kind, source in sources.items():
        for module, rows in shortcuts.get((layer, kind), ()):
            x = source if rows is None else source[rows]
            delta = ((x @ module.A[0].T) @ module.B[0].T * module.scaling).to(out.dtype)
            if rows is None:
                out.add_(delta)
            else:
                out.index_add_(0, rows, delta)


def route_block(adapters: list[tuple[LoadedAdapter, np.ndarray]], rows_by_uid: dict[int, torch.Tensor | None],
                layer: int, block_input: torch.Tensor) -> BlockGates:
    """The gates of block `layer` for each adapter of the step with a shared router there, from the
    block's input (the residual stream before the block's first norm), as in training."""
    routed: BlockGates = []
    for adapter, _ in adapters:
        if layer in adapter.layer_routers:
            router, top_k = adapter.layer_routers[layer]
            index = rows_by_uid[adapter.uid]
            x = block_input if index is None else block_input[index]
            routed.append((adapter, index, dense_gates(*top_k_gates(x @ router.T, top_k), router.shape[0])))
    return routed


def add_block_routed(out: torch.Tensor, name: str, hidden: torch.Tensor, gates_by_adapter: BlockGates) -> None:
    """Adds module `name`'s deltas for the adapters its block's shared router gates: every expert's
    down-projection of the adapter's tokens times their gates and scaling, then the up-projection."""
    for adapter, rows, gates in gates_by_adapter:
        weights = adapter.modules.get(name)
        if weights is None or not weights.shared_router:
            continue
        x = hidden if rows is None else hidden[rows]
        experts, rank = weights.num_experts, weights.rank
        down = (x @ weights.A.view(experts * rank, -1).T).view(-1, experts, rank)
        gated = (down * (gates * weights.scaling)[:, :, None]).to(x.dtype).view(-1, experts * rank)
        delta = gated @ weights.B.permute(1, 0, 2).reshape(-1, experts * rank).T
        if rows is None:
            out.add_(delta)
        else:
            out.index_add_(0, rows, delta)
