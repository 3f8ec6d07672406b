"""An adapter and its frozen base linear as one autograd function: plain LoRA, and the dense-masked
mixture of LoRA experts with its own router.

Written out as a chain of tensor ops an adapted linear is the base GEMM, the adapter's GEMMs, a
separate sum of the two outputs and, in backward, a separate sum of the two input gradients (for
MoE-LoRA also ~15 autograd nodes of routing). Here the adapter's output and input gradient are
accumulated in place with the base's (addmm_, in the order and with the reductions `product_forms` sets),
and the routing runs as one kernel each way
(`alphalora::router_gates` and its backward: top-k, softmax over the chosen logits, gating, and the
gradient through them). For MoE-LoRA, where E x r is small next to the hidden size, every
expert's down-projection is computed for every token (one GEMM over the concatenated [A; router]
weights) and the unchosen ones are zeroed by their gates: cheaper than gathering tokens per expert.
"""

from __future__ import annotations

import torch

from alphalora import ops

from .product_forms import base_input_grad, base_linear, token_reduction, with_input_update, with_update


class _LoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, lora_A, lora_B, scaling: float):
        base_out = base_linear(x, weight, bias)
        down, up = lora_A[0].to(x.dtype), lora_B[0].to(x.dtype)  # [r, in], [out, r] (float32 adapters over bf16)
        hidden = (x if x_dropped is None else x_dropped) @ down.T * scaling
        out = with_update(base_out, x, weight, bias, hidden, up)
        ctx.save_for_backward(x, x_dropped, weight, down, up, hidden)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_dropped, weight, down, up, hidden = ctx.saved_tensors
        grads = [None] * 7
        # (with dropout the adapter reads the dropped input, and x's gradient is the base's alone)
        x_grad_has_update = x_dropped is None and ctx.needs_input_grad[0]
        if ctx.needs_input_grad[0]:
            grads[0] = base_input_grad(grad_out, weight) if x_grad_has_update else grad_out @ weight
        grad_hidden = (grad_out @ up) * ctx.scaling
        if x_grad_has_update:
            grads[0] = with_input_update(grads[0], grad_out, weight, grad_hidden, down)
        if x_dropped is not None and ctx.needs_input_grad[1]:
            grads[1] = grad_hidden @ down
        grads[4] = token_reduction(grad_hidden, x if x_dropped is None else x_dropped)[None]
        grads[5] = token_reduction(grad_out, hidden)[None]
        return tuple(grads)


class _DenseMoELoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, router, lora_A, lora_B, scaling: float, top_k: int):
        num_experts, rank, fan_in = lora_A.shape
        fan_out = lora_B.shape[1]
        width = num_experts * rank
        base_out = base_linear(x, weight, bias)
        down = lora_A.reshape(width, fan_in).to(x.dtype)  # (float32 adapters over a bf16 base compute in bf16)
        router = router.to(x.dtype)
        shared = x_dropped is None  # no dropout: one GEMM gives the experts' down-projections and the logits
        if shared:
            stacked = torch.cat([down, router])
            both = x @ stacked.T
            hidden, logits = both[:, :width], both[:, width:]
        else:
            hidden, logits = x_dropped @ down.T, x @ router.T
        # gates: [T, E] fp32, the softmax of each token's top-k logits (zero elsewhere); gated: hidden
        # times scaling times its expert's gate.
        gated, gates, ids = ops.router_gates(hidden, logits, top_k, scaling)
        up = lora_B.permute(1, 0, 2).reshape(fan_out, width).to(x.dtype)  # [out, E*r]
        out = with_update(base_out, x, weight, bias, gated, up)
        # Without dropout [A; router] is all backward needs of the two; with it, A and the router apart.
        ctx.save_for_backward(x, x_dropped, weight, *((stacked,) if shared else (router, down)), up, hidden, gated,
                              gates)
        ctx.shape = (num_experts, rank, fan_in, fan_out)
        ctx.scaling, ctx.shared = scaling, shared
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ids)
        return out, logits, ids

    @staticmethod
    def backward(ctx, grad_out, grad_logits, _grad_ids):
        x, x_dropped, weight, *weights, up, hidden, gated, gates = ctx.saved_tensors
        num_experts, rank, fan_in, fan_out = ctx.shape
        width = num_experts * rank
        grads = [None] * 9
        if grad_out is None:
            grad_out = torch.zeros(x.shape[0], fan_out, dtype=hidden.dtype, device=x.device)
        base_grad = base_input_grad(grad_out, weight) if ctx.needs_input_grad[0] else None
        grad_up = token_reduction(grad_out, gated)  # [out, E*r]
        # [d hidden | d logits] in one buffer, the layout of [A; router]; the logits' gradient goes back
        # through g = softmax(top-k logits) (plus the load-balancing loss's, which reads them too).
        grad_both = ops.router_gates_backward(grad_out @ up, hidden, gates, grad_logits, ctx.scaling)
        if ctx.shared:
            (stacked,) = weights
            if ctx.needs_input_grad[0]:
                grads[0] = with_input_update(base_grad, grad_out, weight, grad_both, stacked)
            weight_grad = token_reduction(grad_both, x)
            grad_down, grads[4] = weight_grad[:width], weight_grad[width:]
        else:
            router, down = weights
            grad_hidden, grad_logits_total = grad_both[:, :width], grad_both[:, width:]
            if ctx.needs_input_grad[0]:
                grads[0] = with_input_update(base_grad, grad_out, weight, grad_logits_total, router)
            if ctx.needs_input_grad[1]:
                grads[1] = grad_hidden @ down
            grad_down, grads[4] = token_reduction(grad_hidden, x_dropped), token_reduction(grad_logits_total, x)
        grads[5] = grad_down.view(num_experts, rank, fan_in)
        grads[6] = grad_up.view(fan_out, num_experts, rank).permute(1, 0, 2)
        return tuple(grads)


def dense_moe_lora(x: torch.Tensor, x_dropped: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   router: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                   top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x @ weight.T + bias + scaling * sum over each token's top-k experts e of g_e B_e A_e x_dropped,
    the router logits [T, E] (differentiable, for the load-balancing loss), the chosen experts [T, k]).

    x: [T, in]; x_dropped: x after dropout, the experts' input (None without dropout); weight
    [out, in] and bias: the frozen base linear (no gradient is computed for them); router: [E, in];
    lora_A: [E, r, in]; lora_B: [E, out, r]. Gates: softmax of x @ router.T in fp32, top-k, renormalised to sum to 1.
    router, lora_A and lora_B may be float32 over a half-precision x and base: the products run in x's dtype, and
    their gradients come back in float32.
    """
    return _DenseMoELoRA.apply(x, x_dropped, weight, bias, router, lora_A, lora_B, scaling, top_k)


def lora_linear(x: torch.Tensor, x_dropped: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x @ weight.T + bias + scaling * B A x_dropped for one expert (lora_A [1, r, in], lora_B [1, out, r]);
    x_dropped is None without dropout; the base weight and bias get no gradient."""
    return _LoRA.apply(x, x_dropped, weight, bias, lora_A, lora_B, scaling)
