"""One vLLM linear's MoE-LoRA delta: each fused slice (q/k/v, gate/up) gets its own module's mixture.

Kept free of vLLM imports except the tensor-parallel all-reduce, so the math can be tested
against the native engine without vLLM installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SliceSpec:
    """Where one Hugging Face module's output sits in a (possibly fused) vLLM linear on this rank."""

    name: str  # the Hugging Face module name, e.g. model.layers.0.self_attn.k_proj
    offset: int  # first output column of the slice in this rank's output
    size: int  # output columns of the slice on this rank
    rows: tuple[int, int]  # [start, stop) of the module's full output rows held by this rank (lora_B rows)
    cols: tuple[int, int] | None = None  # [start, stop) of its input columns on this rank (row-parallel only)


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
        probs = torch.softmax(partials[:, width:].float(), dim=-1)
        gates, ids = torch.topk(probs, self.top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(1, ids, gates) * self.scaling
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
