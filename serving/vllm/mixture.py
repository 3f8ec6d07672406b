"""One vLLM linear's MoE-LoRA delta: each fused slice (q/k/v, gate/up) gets its own module's mixture.

Kept free of vLLM imports except the tensor-parallel all-reduce, so the math can be tested
against the native engine without vLLM installed; the gating is the training layer's own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from alphalora.adapters.routing import dense_gates, top_k_gates
from alphalora.spectral.roles import block_index

WHOLE = "whole"  # a Hugging Face module that is itself fused as vLLM fuses it (Phi-3's qkv_proj, gate_up_proj)
# Hugging Face module -> (the vLLM linear it is fused into, its slice index; None: the whole linear, row-parallel)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
         "qkv_proj": ("qkv_proj", WHOLE), "gate_up_proj": ("gate_up_proj", WHOLE),
         "o_proj": ("o_proj", None), "down_proj": ("down_proj", None)}


@dataclass(frozen=True)
class SliceSpec:
    """Where one Hugging Face module's output sits in a (possibly fused) vLLM linear on this rank."""

    name: str  # the Hugging Face module name, e.g. model.layers.0.self_attn.k_proj
    offset: int  # first output column of the slice in this rank's output
    size: int  # output columns of the slice on this rank
    # the [start, stop) ranges of the module's full output rows this rank holds (lora_B rows), in output order:
    # one, or one per fused part where the module is a whole fused one (q, k, v of Phi-3's qkv_proj)
    rows: tuple[tuple[int, int], ...]
    cols: tuple[int, int] | None = None  # [start, stop) of its input columns on this rank (row-parallel only)


def column_slices(linear) -> list[tuple[int, int, int]]:
    """(offset in this rank's output, size on this rank, first row of the module's full output) per fused slice.

    `linear` is a vLLM QKVParallelLinear (q, k, v; KV heads replicated when there are fewer than
    ranks) or MergedColumnParallelLinear (gate, up); only its layout attributes are read.
    """
    rank = linear.tp_rank
    if hasattr(linear, "num_kv_heads"):
        q, kv = linear.num_heads * linear.head_size, linear.num_kv_heads * linear.head_size
        kv_rank = rank // linear.num_kv_head_replicas
        return [(0, q, rank * q), (q, kv, kv_rank * kv), (q + kv, kv, kv_rank * kv)]
    sizes = [size // linear.tp_size for size in linear.output_sizes]
    return [(sum(sizes[:i]), size, rank * size) for i, size in enumerate(sizes)]


def full_sizes(linear) -> list[int]:
    """The full (all ranks') output width of each part of a fused column-parallel linear: q, k, v or gate, up."""
    if hasattr(linear, "num_kv_heads"):
        kv = linear.total_num_kv_heads * linear.head_size
        return [linear.total_num_heads * linear.head_size, kv, kv]
    return list(linear.output_sizes)


def slice_spec(hf_name: str, linear, index: int | str | None) -> SliceSpec:
    """Where module `hf_name` sits in `linear`: slice `index` of a fused column-parallel linear, all of its
    slices (index WHOLE: a module fused as vLLM fuses it, whose rows run q, k, v or gate, up), or (index
    None) the whole of a row-parallel one, whose input this rank holds only a share of."""
    if index == WHOLE:
        slices, sizes = column_slices(linear), full_sizes(linear)
        bases = [sum(sizes[:i]) for i in range(len(slices))]  # where each part starts in the module
        rows = tuple((base + start, base + start + size) for base, (_, size, start) in zip(bases, slices, strict=True))
        return SliceSpec(hf_name, 0, sum(size for _, size, _ in slices), rows)
    if index is not None:
        offset, size, start = column_slices(linear)[index]
        return SliceSpec(hf_name, offset, size, ((start, start + size),))
    out, cols = linear.output_size, linear.input_size_per_partition
    start = linear.tp_rank * cols
    return SliceSpec(hf_name, 0, out, ((0, out),), (start, start + cols))


class ModuleMixture(nn.Module):
    """scaling * sum over the top-k experts e of g_e(x) B_e A_e x, for one module (E = 1: plain LoRA).

    Gates are the softmax of the router logits in fp32, top-k, renormalised (MoLA, as in training).
    """

    def __init__(self, num_experts: int, top_k: int, rank: int, in_features: int, out_features: int,
                 scaling: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.num_experts, self.top_k, self.rank, self.scaling = num_experts, top_k, rank, scaling
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.zeros(num_experts * rank, in_features, **factory), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank, **factory), requires_grad=False)
        self.router = (nn.Parameter(torch.zeros(num_experts, in_features, **factory), requires_grad=False)
                       if num_experts > 1 else None)

    @torch.no_grad()
    def load(self, spec: SliceSpec, lora_A: torch.Tensor, lora_B: torch.Tensor, router: torch.Tensor | None) -> None:
        """Copies this rank's share of a module's saved weights: A (E, r, in), B (E, out, r), router (E, in)."""
        if spec.cols is not None:
            lora_A = lora_A[:, :, spec.cols[0]: spec.cols[1]]
            router = router[:, spec.cols[0]: spec.cols[1]] if router is not None else None
        lora_B = torch.cat([lora_B[:, start:stop, :] for start, stop in spec.rows], dim=1)
        self.lora_A.copy_(lora_A.reshape(-1, lora_A.shape[-1]))
        self.lora_B.copy_(lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], -1))
        if self.router is not None:
            self.router.copy_(router)

    def partials(self, x2: torch.Tensor) -> torch.Tensor:
        """[T, E*r (+E)]: the down-projection of every expert, then the router logits; linear in x."""
        hidden = x2 @ self.lora_A.T
        return hidden if self.router is None else torch.cat([hidden, x2 @ self.router.T], dim=1)

    def finish(self, partials: torch.Tensor) -> torch.Tensor:
        """The delta [T, out] from (reduced) partials."""
        width = self.num_experts * self.rank
        hidden = partials[:, :width]
        if self.router is None:
            return (hidden * self.scaling) @ self.lora_B.T
        gates, ids = top_k_gates(partials[:, width:], self.top_k)
        dense = dense_gates(gates, ids, self.num_experts) * self.scaling
        hidden = hidden * dense.to(hidden.dtype).repeat_interleave(self.rank, dim=1)
        return hidden @ self.lora_B.T


class LinearMixture(nn.Module):
    """The deltas of every adapted slice of one vLLM linear, laid out like its output on this rank.

    For a row-parallel linear (o_proj, down_proj under tensor parallelism) the input is sharded:
    the partial down-projections and router logits are summed across ranks with `all_reduce`
    before the gates are taken, and lora_B is whole, so every rank adds the same full delta to
    the already reduced output.
    """

    def __init__(self, specs: list[SliceSpec], mixtures: list[ModuleMixture], out_width: int,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.specs = specs
        self.mixtures = nn.ModuleList(mixtures)
        self.out_width = out_width
        self.all_reduce = all_reduce

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The full-width delta for this rank's output, zero outside the adapted slices."""
        x2 = x.reshape(-1, x.shape[-1])
        pieces, cursor = [], 0
        for spec, mixture in zip(self.specs, self.mixtures, strict=True):
            partials = mixture.partials(x2)
            if self.all_reduce is not None:
                partials = self.all_reduce(partials)
            if spec.offset > cursor:
                pieces.append(x2.new_zeros(x2.shape[0], spec.offset - cursor))
            pieces.append(mixture.finish(partials).to(x2.dtype))
            cursor = spec.offset + spec.size
        if cursor < self.out_width:
            pieces.append(x2.new_zeros(x2.shape[0], self.out_width - cursor))
        return torch.cat(pieces, dim=1).reshape(*x.shape[:-1], self.out_width)

    def hook(self, _module: nn.Module, args: tuple, output):
        """Forward hook for the vLLM linear: adds the delta to its output (a tensor or (out, bias))."""
        if isinstance(output, tuple):
            return (output[0] + self.delta(args[0]), *output[1:])
        return output + self.delta(args[0])


def build_mixtures(module_names: list[str], shapes: dict[str, tuple[int, ...]], plan: dict, linears: dict,
                   dtype: torch.dtype, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> dict[str, LinearMixture]:
    """One LinearMixture per adapted vLLM linear (by its name in the vLLM model), sized for this rank.

    `shapes` holds the saved lora_A shapes (E, r, in) by `<module>.lora_A`; `linears` the vLLM
    linears by name (missing ones, held by another pipeline stage, are skipped); `all_reduce` sums
    over the tensor-parallel group (used for row-parallel linears when it has several ranks).
    """
    grouped: dict[str, list[tuple[SliceSpec, ModuleMixture]]] = {}
    for hf_name in module_names:
        parent, _, leaf = hf_name.rpartition(".")
        if leaf not in FUSED:
            raise ValueError(f"{hf_name}: the vLLM plugin adapts {sorted(FUSED)} only")
        target, index = FUSED[leaf]
        linear = linears.get(f"{parent}.{target}")
        if linear is None:
            continue
        spec = slice_spec(hf_name, linear, index)
        experts, rank, in_features = shapes[f"{hf_name}.lora_A"]
        width = spec.cols[1] - spec.cols[0] if spec.cols else in_features
        layer = block_index(hf_name)
        mixture = ModuleMixture(experts, plan["top_k_per_layer"][layer], rank, width, spec.size,
                                plan["lora_alpha"] / rank, dtype)
        grouped.setdefault(f"{parent}.{target}", []).append((spec, mixture))
    built = {}
    for name, entries in grouped.items():
        linear = linears[name]
        entries.sort(key=lambda entry: entry[0].offset)
        row_parallel = entries[0][0].cols is not None
        out_width = linear.output_size if row_parallel else linear.output_size_per_partition
        reduce = all_reduce if row_parallel and linear.tp_size > 1 else None
        built[name] = LinearMixture([s for s, _ in entries], [m for _, m in entries], out_width, reduce)
    return built
