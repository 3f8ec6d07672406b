"""The dense-masked MoE-LoRA router gates (`alphalora::router_gates` and its backward) against the
renormalised top-k of the full softmax, written out independently, and its autograd gradient."""

from __future__ import annotations

import pytest
import torch

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
IMPLEMENTATIONS = {"kernel": (ops.router_gates, ops.router_gates_backward),
                   "reference": (reference.router_gates, reference.router_gates_backward)}


def _inputs(tokens=37, experts=5, rank=4, dtype=torch.float32, device="cpu", seed=0):
    """hidden (T, E * r) and logits (T, E) as column slices of one GEMM output, as the layer has them."""
    g = torch.Generator().manual_seed(seed)
    both = torch.randn(tokens, experts * rank + experts, generator=g, dtype=torch.float64).to(device, dtype)
    return both[:, : experts * rank], both[:, experts * rank:]


def _oracle(hidden, logits, top_k, scaling):
    """MoLA's gating op by op in float64: softmax over every expert, top-k, renormalised, dense."""
    experts = logits.shape[1]
    probs = torch.softmax(logits.double(), dim=-1)
    top, ids = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, ids, top / top.sum(-1, keepdim=True))
    gated = hidden.double() * (gates * scaling).repeat_interleave(hidden.shape[1] // experts, dim=1)
    return gated, gates, ids


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (5, 2), (6, 6), (40, 3)])
def test_router_gates_equal_the_renormalised_top_k_softmax(implementation, device, dtype, tol, experts, top_k):
    forward, _ = IMPLEMENTATIONS[implementation]
    hidden, logits = _inputs(experts=experts, dtype=dtype, device=device)
    gated, gates, ids = forward(hidden, logits, top_k, 2.0)
    want_gated, want_gates, want_ids = _oracle(hidden, logits, top_k, 2.0)
    assert gated.dtype == dtype and gates.dtype == torch.float32 and gated.is_contiguous()
    assert torch.equal(ids.sort(-1).values.cpu(), want_ids.sort(-1).values.cpu())
    torch.testing.assert_close(gates.double().cpu(), want_gates.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gated.double().cpu(), want_gated.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (5, 2), (40, 3)])
def test_router_gates_backward_equals_autograd_of_the_op_by_op_gating(implementation, device, with_extra,
                                                                      experts, top_k):
    """[d hidden | d logits] against autograd through the oracle (plus another use of the logits)."""
    forward, backward = IMPLEMENTATIONS[implementation]
    hidden, logits = (t.detach().clone().requires_grad_() for t in _inputs(experts=experts, device=device))
    grad_gated = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(device)
    extra = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(device) if with_extra else None
    gated, _, _ = _oracle(hidden, logits, top_k, 2.0)
    loss = (gated * grad_gated.double()).sum() + ((logits.double() * extra.double()).sum() if with_extra else 0)
    want_hidden, want_logits = torch.autograd.grad(loss, (hidden, logits))
    _, gates, _ = forward(hidden.detach(), logits.detach(), top_k, 2.0)
    got = backward(grad_gated, hidden.detach(), gates, extra, 2.0)
    width = hidden.shape[1]
    assert got.shape == (hidden.shape[0], width + experts)
    torch.testing.assert_close(got[:, :width], want_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, width:], want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
def test_router_gates_break_ties_by_lower_expert_and_pass_opcheck(implementation, device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 2.0]], device=device)
    hidden = torch.ones(2, 8, device=device)
    _, gates, ids = IMPLEMENTATIONS[implementation][0](hidden, logits, 2, 1.0)
    assert ids.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(gates.cpu(), torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]))
    hidden, logits = _inputs(device=device)
    torch.library.opcheck(torch.ops.alphalora.router_gates.default, (hidden, logits, 2, 2.0))
    _, gates, _ = ops.router_gates(hidden, logits, 2, 2.0)
    grad = torch.randn_like(hidden.contiguous())
    torch.library.opcheck(torch.ops.alphalora.router_gates_backward.default, (grad, hidden, gates, None, 2.0))
    torch.library.opcheck(torch.ops.alphalora.router_gates_backward.default,
                          (grad, hidden, gates, torch.randn_like(gates), 2.0))


def test_router_gates_refuse_inconsistent_shapes():
    hidden, logits = _inputs(experts=5)
    with pytest.raises(RuntimeError, match="top_k must be in \\[1, 5\\], got 6"):
        ops.router_gates(hidden, logits, 6, 1.0)
    with pytest.raises(RuntimeError, match="not a multiple of the 5 experts"):
        ops.router_gates(hidden[:, :-1], logits, 2, 1.0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.router_gates(hidden.double(), logits, 2, 1.0)
    _, gates, _ = ops.router_gates(hidden, logits, 2, 1.0)
    with pytest.raises(RuntimeError, match="float32 gates"):
        ops.router_gates_backward(hidden.contiguous(), hidden, gates.double(), None, 1.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_router_gates_equal_the_cpu_kernel(dtype):
    """More tokens than one block, 40 experts (more than a warp's lanes), strided rows."""
    hidden, logits = _inputs(tokens=1000, experts=40, rank=3, dtype=dtype)
    gated, gates, ids = ops.router_gates(hidden, logits, 3, 1.5)
    gated_gpu, gates_gpu, ids_gpu = ops.router_gates(hidden.cuda(), logits.cuda(), 3, 1.5)
    assert torch.equal(ids_gpu.cpu(), ids)
    torch.testing.assert_close(gates_gpu.cpu(), gates, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gated_gpu.cpu(), gated, rtol=1e-2 if dtype.itemsize == 2 else 1e-6, atol=1e-6)
    grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    extra = torch.randn(logits.shape)
    want = ops.router_gates_backward(grad, hidden, gates, extra, 1.5)
    got = ops.router_gates_backward(grad.cuda(), hidden.cuda(), gates.cuda(), extra.cuda(), 1.5)
    tol = 2e-2 if dtype.itemsize == 2 else 1e-5
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


@requires_cuda
def test_cuda_router_gates_keep_zeros_off_the_top_k_where_a_row_is_not_finite():
    """A +inf logit, a row of -inf, a row of NaN: the chosen gates are NaN on both devices (the layer's
    output is NaN either way), and the experts not chosen stay at 0, as on the CPU."""
    hidden, logits = _inputs(tokens=4, experts=6, rank=2, dtype=torch.float32)
    logits = logits.contiguous()
    logits[0, 3], logits[1], logits[2] = float("inf"), float("-inf"), float("nan")
    for device_out, cpu_out in zip(ops.router_gates(hidden.cuda(), logits.cuda(), 2, 1.0),
                                   ops.router_gates(hidden, logits, 2, 1.0), strict=True):
        torch.testing.assert_close(device_out.cpu(), cpu_out, equal_nan=True, rtol=1e-6, atol=1e-6)
