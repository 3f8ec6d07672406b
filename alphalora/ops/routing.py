"""Mixture-of-LoRA-experts routing ops: typed wrappers, fake kernels and autograd.

A token routed to k experts makes k pairs, p = t * k + j. `moe_permute` groups pairs by expert;
`grouped_lora_shrink` computes every pair's down-projection A_e x_t and `grouped_lora_expand`
adds gate * B_e h_p back into its token. With several adapters in one batch, expert ids are
virtual: adapter a's expert e is offset_a + e, so each adapter keeps its own expert count.
"""

from __future__ import annotations

import torch

from . import _library  # noqa: F401  (registers the ops: compiled, or the references)


@torch.library.register_fake("alphalora::moe_permute")
def _moe_permute_fake(expert_ids, num_experts, validate=True):
    return torch.empty_like(expert_ids), expert_ids.new_empty(num_experts + 1)


@torch.library.register_fake("alphalora::grouped_lora_shrink")
def _shrink_fake(x, A, expert_ids, order, offsets):
    return x.new_empty(expert_ids.shape[0], A.shape[1])


@torch.library.register_fake("alphalora::grouped_lora_expand")
def _expand_fake(h, B, gates, expert_ids, order, offsets, num_tokens):
    return h.new_empty(num_tokens, B.shape[1])


@torch.library.register_fake("alphalora::grouped_lora_shrink_backward")
def _shrink_backward_fake(grad_h, x, A, expert_ids, order, offsets):
    return torch.empty_like(x), torch.empty_like(A)


@torch.library.register_fake("alphalora::grouped_lora_expand_backward")
def _expand_backward_fake(grad_y, h, B, gates, expert_ids, order, offsets):
    return torch.empty_like(h), torch.empty_like(B), torch.empty_like(gates)


@torch.library.register_fake("alphalora::router_gates")
def _router_gates_fake(hidden, logits, top_k, scaling):
    tokens, experts = logits.shape
    return (hidden.new_empty(tokens, hidden.shape[1]), logits.new_empty(tokens, experts, dtype=torch.float32),
            logits.new_empty(tokens, top_k, dtype=torch.long))


@torch.library.register_fake("alphalora::router_gates_backward")
def _router_gates_backward_fake(grad_gated, hidden, gates, grad_logits, scaling):
    return hidden.new_empty(hidden.shape[0], hidden.shape[1] + gates.shape[1])


@torch.library.register_fake("alphalora::select_experts")
def _select_experts_fake(logits, member, scale, base, num_experts, top_k):
    tokens = logits.shape[0]
    return (logits.new_empty(tokens, top_k, dtype=torch.float32), logits.new_empty(tokens, top_k, dtype=torch.long))


def _shrink_setup(ctx, inputs, output):
    x, A, expert_ids, order, offsets = inputs
    ctx.save_for_backward(x, A, expert_ids, order, offsets)


def _shrink_backward(ctx, grad_h):
    x, A, expert_ids, order, offsets = ctx.saved_tensors
    grad_x, grad_A = torch.ops.alphalora.grouped_lora_shrink_backward(
        grad_h.contiguous(), x, A, expert_ids, order, offsets)
    return grad_x, grad_A, None, None, None


def _expand_setup(ctx, inputs, output):
    h, B, gates, expert_ids, order, offsets, _num_tokens = inputs
    ctx.save_for_backward(h, B, gates, expert_ids, order, offsets)


def _expand_backward(ctx, grad_y):
    h, B, gates, expert_ids, order, offsets = ctx.saved_tensors
    grad_h, grad_B, grad_gates = torch.ops.alphalora.grouped_lora_expand_backward(
        grad_y.contiguous(), h, B, gates, expert_ids, order, offsets)
    return grad_h, grad_B, grad_gates, None, None, None, None


torch.library.register_autograd("alphalora::grouped_lora_shrink", _shrink_backward, setup_context=_shrink_setup)
torch.library.register_autograd("alphalora::grouped_lora_expand", _expand_backward, setup_context=_expand_setup)


def moe_permute(expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): pair indices grouped by expert, and expert e's range offsets[e]:offsets[e+1].

    Ids outside [0, num_experts) are an error; `validate=False` lets a caller whose ids are in range
    by construction skip the check's host synchronisation on a GPU (the CPU checks anyway). order is
    always a permutation of the pairs: unchecked pairs with such ids come after every expert's range."""
    return torch.ops.alphalora.moe_permute(expert_ids, num_experts, validate)


def grouped_lora_shrink(x, A, expert_ids, order, offsets) -> torch.Tensor:
    """h[p] = A[e_p] x[t_p] for every pair: (T, in) x (E, r, in) -> (P, r).

    order and offsets must be moe_permute's for these expert_ids (every pair once, grouped by expert),
    as for every grouped op: the CPU refuses any other; a GPU does not check (it would cost a host
    synchronisation per call) and gives NaN rows or weight gradients instead."""
    return torch.ops.alphalora.grouped_lora_shrink(x, A, expert_ids, order, offsets)


def grouped_lora_expand(h, B, gates, expert_ids, order, offsets, num_tokens: int) -> torch.Tensor:
    """y[t] = sum_j gates[p] B[e_p] h[p] over the token's pairs: (P, r) x (E, out, r) -> (T, out)."""
    return torch.ops.alphalora.grouped_lora_expand(h, B, gates, expert_ids, order, offsets, num_tokens)


def moe_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor,
             expert_ids: torch.Tensor, ids_in_range: bool = False) -> torch.Tensor:
    """The mixture-of-LoRA-experts delta of tokens x (T, in) routed to experts_ids (T, k) with
    gates (T, k): sum_j gates[t, j] B[e] A[e] x[t]. Gather, grouped matmuls, weighted scatter-add;
    differentiable in x, A, B and gates. `ids_in_range=True` (ids from top-k over A's experts)
    skips the range check's host synchronisation on a GPU."""
    flat_ids = expert_ids.reshape(-1).contiguous()
    order, offsets = moe_permute(flat_ids, A.shape[0], validate=not ids_in_range)
    h = grouped_lora_shrink(x.contiguous(), A.contiguous(), flat_ids, order, offsets)
    return grouped_lora_expand(h, B.contiguous(), gates.reshape(-1).to(h.dtype).contiguous(), flat_ids, order,
                               offsets, x.shape[0])


def router_gates(hidden: torch.Tensor, logits: torch.Tensor, top_k: int,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense-masked MoE-LoRA router in one pass per token: hidden (T, E * r) holds every expert's
    down-projection, logits (T, E) the router's. Returns (hidden scaled by scaling x each expert's
    gate, the dense float32 gates (T, E): the softmax over each token's top-k logits, which is the
    renormalised top-k of the softmax, zero elsewhere, and the chosen ids (T, top_k), largest first)."""
    return torch.ops.alphalora.router_gates(hidden, logits, top_k, scaling)


def router_gates_backward(grad_gated: torch.Tensor, hidden: torch.Tensor, gates: torch.Tensor,
                          grad_logits: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """(T, E * r + E) in hidden's dtype: the gradient of router_gates' hidden input, then of its
    logits (plus `grad_logits`, another use of the logits, when given): [A; router]'s column order."""
    return torch.ops.alphalora.router_gates_backward(grad_gated, hidden, gates, grad_logits, scaling)


def select_experts(logits: torch.Tensor, member: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                   num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert choice for tokens of several adapters routed by one GEMM against their stacked routers.

    logits (T, M * E) holds M routers' logits side by side; token t keeps block member[t] (its
    adapter's), picks its top-k experts (largest first, equal logits by lower index) and returns
    (gates (T, k) float32: the softmax over the chosen logits times scale[t], which is the
    renormalised top-k of the full softmax; ids (T, k): base[t] + expert). member and base are
    int64, scale float32, one per token. A GPU does not check member's range (a host sync)."""
    return torch.ops.alphalora.select_experts(logits, member, scale, base, num_experts, top_k)
