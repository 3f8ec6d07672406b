"""Routing kernels against the references and a plain per-expert loop, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda


def _inputs(tokens=37, k=2, experts=5, d_in=24, d_out=20, rank=4, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g).to(device, dtype)
    A = (torch.randn(experts, rank, d_in, generator=g) * 0.3).to(device, dtype)
    B = (torch.randn(experts, d_out, rank, generator=g) * 0.3).to(device, dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).to(device)
    gates = torch.softmax(torch.randn(tokens, k, generator=g), -1).to(device, dtype)
    return x, A, B, gates, ids


DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def per_expert_loop(x, A, B, gates, ids):
    """The MoLA way: for each expert, the tokens routed to it, LoRA, weighted index_add."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float32, device=x.device)
    for e in range(A.shape[0]):
        rows, slot = torch.where(ids == e)
        if rows.numel():
            delta = F.linear(F.linear(x[rows], A[e]), B[e])
            out.index_add_(0, rows, delta.float() * gates[rows, slot, None].float())
    return out


def test_moe_permute_groups_pairs_by_expert_stably():
    ids = torch.tensor([3, 0, 3, 1, 0, 3])
    order, offsets = ops.moe_permute(ids, 5)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]
    assert offsets.tolist() == [0, 2, 3, 3, 6, 6]
    ref_order, ref_offsets = reference.moe_permute(ids, 5)
    assert torch.equal(order, ref_order) and torch.equal(offsets, ref_offsets)
    with pytest.raises(RuntimeError, match="outside"):
        ops.moe_permute(torch.tensor([0, 7]), 5)
    with pytest.raises(RuntimeError, match="outside"):
        ops.moe_permute(torch.tensor([0, 7]), 5, validate=False)  # the CPU checks as it counts, always


@requires_cuda
def test_cuda_moe_permute_checks_ids_unless_told_they_are_in_range():
    ids = torch.tensor([3, 0, 3, 1, 0, 3], device="cuda")
    order, offsets = ops.moe_permute(ids, 5, validate=False)
    assert order.tolist() == [1, 4, 3, 0, 2, 5] and offsets.tolist() == [0, 2, 3, 3, 6, 6]
    with pytest.raises(RuntimeError, match="outside"):
        ops.moe_permute(torch.tensor([0, 7], device="cuda"), 5)


def _compiled_ops():
    if not ops.HAS_COMPILED_OPS:
        pytest.skip("the compiled library is not loaded")
    return torch.ops.alphalora


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_refuse_inconsistent_inputs_before_reading_them(device):
    """Shapes, dtypes and expert counts are checked before a kernel reads a pointer (on a GPU an
    unchecked mismatch reads out of bounds)."""
    alphalora_ops = _compiled_ops()
    x, A, B, gates, ids = _inputs(tokens=6, k=2, experts=3, device=device)
    flat = ids.reshape(-1)
    order, offsets = alphalora_ops.moe_permute(flat, 3)
    h = alphalora_ops.grouped_lora_shrink(x, A, flat, order, offsets)
    pair_gates = gates.reshape(-1)
    with pytest.raises(RuntimeError, match="share one dtype"):
        alphalora_ops.grouped_lora_expand(h, B, pair_gates.double(), flat, order, offsets, 6)
    with pytest.raises(RuntimeError, match="num_experts \\+ 1"):
        alphalora_ops.grouped_lora_expand(h, B, pair_gates, flat, order, offsets[:-1], 6)
    with pytest.raises(RuntimeError, match="A \\(E, r, in\\)"):
        alphalora_ops.grouped_lora_shrink(x[:, :-1], A, flat, order, offsets)
    with pytest.raises(RuntimeError, match="grad_h must be"):
        alphalora_ops.grouped_lora_shrink_backward(h[:-1], x, A, flat, order, offsets)
    with pytest.raises(RuntimeError, match="one row per pair"):
        alphalora_ops.grouped_lora_expand(h[:-2], B, pair_gates, flat, order, offsets, 6)


@pytest.mark.parametrize("k,experts", [(1, 1), (1, 4), (2, 5), (3, 3), (2, 64)])
def test_moe_lora_equals_the_per_expert_loop(k, experts):
    x, A, B, gates, ids = _inputs(k=k, experts=experts)
    torch.testing.assert_close(ops.moe_lora(x, A, B, gates, ids), per_expert_loop(x, A, B, gates, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,experts", [(1, 4), (2, 5), (2, 64)])
def test_gradients_equal_the_per_expert_loop(k, experts):
    tensors = [t.requires_grad_() for t in _inputs(k=k, experts=experts)[:4]]
    ids = _inputs(k=k, experts=experts)[4]
    ours = torch.autograd.grad(ops.moe_lora(*tensors, ids).square().sum(), tensors)
    loop = torch.autograd.grad(per_expert_loop(*tensors, ids).square().sum(), tensors)
    for got, want in zip(ours, loop, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_at_bf16_tolerance():
    x, A, B, gates, ids = _inputs(tokens=64, experts=8, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.moe_lora(x, A, B, gates, ids).float(), per_expert_loop(x, A, B, gates, ids),
                               rtol=3e-2, atol=3e-2)


# GEMMs (few experts, many tokens); transposed-B loops; pair loops; top-1; fewer tokens than experts.
@pytest.mark.parametrize("tokens,experts,k", [(600, 2, 2), (100, 4, 2), (300, 16, 2), (40, 4, 1), (3, 16, 2)])
def test_bf16_gradients_equal_a_float32_loop_at_bf16_tolerance(tokens, experts, k):
    """bfloat16 gradients of x, A, B and the gates against the plain per-expert loop in float32 on the same
    (bf16-exact) values: every error within 1.6e-2 of the gradient's largest entry (about four bf16 ulps;
    measured at most 0.006)."""
    bf16 = [t.requires_grad_() for t in _inputs(tokens=tokens, k=k, experts=experts, dtype=torch.bfloat16)[:4]]
    ids = _inputs(tokens=tokens, k=k, experts=experts)[4]
    fp32 = [t.detach().float().requires_grad_() for t in bf16]
    upstream = torch.randn(tokens, bf16[2].shape[1], generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(ops.moe_lora(*bf16, ids), bf16, upstream.bfloat16())
    loop = torch.autograd.grad(per_expert_loop(*fp32, ids), fp32, upstream)
    for name, got, want in zip(("x", "A", "B", "gates"), ours, loop, strict=True):
        assert got.dtype == torch.bfloat16, name
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1.6e-2 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_kernels_equal_their_references():
    x, A, B, gates, ids = _inputs(k=2, experts=6)
    flat = ids.reshape(-1)
    order, offsets = ops.moe_permute(flat, 6)
    h = ops.grouped_lora_shrink(x, A, flat, order, offsets)
    torch.testing.assert_close(h, reference.grouped_lora_shrink(x, A, flat, order, offsets))
    g = gates.reshape(-1)
    y = ops.grouped_lora_expand(h, B, g, flat, order, offsets, x.shape[0])
    torch.testing.assert_close(y, reference.grouped_lora_expand(h, B, g, flat, order, offsets, x.shape[0]))
    grad_h = torch.randn_like(h)
    for got, want in zip(torch.ops.alphalora.grouped_lora_shrink_backward(grad_h, x, A, flat, order, offsets),
                         reference.grouped_lora_shrink_backward(grad_h, x, A, flat, order, offsets), strict=True):
        torch.testing.assert_close(got, want)
    grad_y = torch.randn_like(y)
    for got, want in zip(torch.ops.alphalora.grouped_lora_expand_backward(grad_y, h, B, g, flat, order, offsets),
                         reference.grouped_lora_expand_backward(grad_y, h, B, g, flat, order, offsets), strict=True):
        torch.testing.assert_close(got, want)


def _every_stage(library, x, A, B, gates, flat, order, offsets, grad_h, grad_y, h):
    """Each grouped op on the same inputs (the expand and its backward on a given h)."""
    out = {"h": library.grouped_lora_shrink(x, A, flat, order, offsets),
           "y": library.grouped_lora_expand(h, B, gates, flat, order, offsets, x.shape[0])}
    out["grad_x"], out["grad_A"] = library.grouped_lora_shrink_backward(grad_h, x, A, flat, order, offsets)
    out["grad_h"], out["grad_B"], out["grad_gates"] = library.grouped_lora_expand_backward(
        grad_y, h, B, gates, flat, order, offsets)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# pair loops element by element; in float32 first; transposed B; per-expert GEMMs (top-2, top-1); one expert
# holding every pair (top-1); a stack of mostly idle experts
@pytest.mark.parametrize("tokens,experts,k", [(3, 16, 2), (64, 8, 2), (100, 4, 2), (600, 2, 2), (600, 4, 1),
                                              (150, 1, 1), (200, 32, 2)])
def test_half_kernels_equal_their_references_within_one_rounding(device, dtype, tokens, experts, k):
    """In bfloat16 and float16 the kernels sum in float32 and round each output once (expand_backward's
    B^T grad_y once more, before the gates scale it), and so do the references: every entry within one
    unit in the last place (rtol = eps) of the reference, plus eps / 16 of the largest entry for
    summation order near zero. Measured: at most 0.01 eps of the largest entry beyond rtol. The references
    summed in the half dtype before (index_add_, bmm of bf16 products) and the CPU's per-expert GEMMs
    rounded each expert's product and the token's sum over experts: 0.64 eps beyond rtol."""
    x, A, B, gates, ids = _inputs(tokens=tokens, k=k, experts=experts, d_in=96, d_out=80, rank=8, dtype=dtype,
                                  device=device)
    flat, pair_gates = ids.reshape(-1), gates.reshape(-1)
    order, offsets = ops.moe_permute(flat, experts)
    g = torch.Generator().manual_seed(1)
    grad_h = torch.randn(flat.numel(), 8, generator=g).to(device, dtype)
    grad_y = torch.randn(tokens, 80, generator=g).to(device, dtype)
    h = reference.grouped_lora_shrink(x, A, flat, order, offsets)
    got = _every_stage(torch.ops.alphalora, x, A, B, pair_gates, flat, order, offsets, grad_h, grad_y, h)
    want = _every_stage(reference, x, A, B, pair_gates, flat, order, offsets, grad_h, grad_y, h)
    eps = torch.finfo(dtype).eps
    for name in want:
        assert got[name].dtype == dtype, name
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=eps, atol=eps / 16 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, A, B, gates, ids = _inputs(tokens=9, k=2, experts=3, device=device)
    flat = ids.reshape(-1)
    order, offsets = ops.moe_permute(flat, 3)
    torch.library.opcheck(torch.ops.alphalora.moe_permute.default, (flat, 3))
    torch.library.opcheck(torch.ops.alphalora.moe_permute.default, (flat, 3, False))
    x.requires_grad_(), A.requires_grad_()
    torch.library.opcheck(torch.ops.alphalora.grouped_lora_shrink.default, (x, A, flat, order, offsets))
    h = ops.grouped_lora_shrink(x, A, flat, order, offsets).detach().requires_grad_()
    g = gates.reshape(-1).clone().requires_grad_()
    torch.library.opcheck(torch.ops.alphalora.grouped_lora_expand.default,
                          (h, B.requires_grad_(), g, flat, order, offsets, 9))


# Inductor on the CPU only: a few seconds here; on a GPU it has not been run yet.
@pytest.mark.parametrize("device,backend", [("cpu", "eager"), ("cpu", "aot_eager"), ("cpu", "inductor"),
                                            pytest.param("cuda", "eager", marks=requires_cuda),
                                            pytest.param("cuda", "aot_eager", marks=requires_cuda)])
def test_compiles_fullgraph_in_values_and_gradients(device, backend):
    """One graph through dynamo (eager), AOTAutograd's traced forward and backward (aot_eager: the fake
    kernels and registered autograd), and Inductor's generated code around the ops."""
    torch._dynamo.reset()
    inputs = _inputs(tokens=16, experts=4, device=device)
    ids = inputs[4]
    compiled_in = [t.clone().requires_grad_() for t in inputs[:4]]
    eager_in = [t.clone().requires_grad_() for t in inputs[:4]]
    compiled = torch.compile(ops.moe_lora, fullgraph=True, backend=backend)
    out = compiled(*compiled_in, ids)
    want = ops.moe_lora(*eager_in, ids)
    torch.testing.assert_close(out, want)
    for got, expected in zip(torch.autograd.grad(out.square().sum(), compiled_in),
                             torch.autograd.grad(want.square().sum(), eager_in), strict=True):
        torch.testing.assert_close(got, expected)
    # and against the per-expert loop, so a graph that drops the gates' gradient cannot agree with itself
    loop_in = [t.clone().requires_grad_() for t in inputs[:4]]
    loop = torch.autograd.grad(per_expert_loop(*loop_in, ids).square().sum(), loop_in)
    for got, expected in zip(torch.autograd.grad(compiled(*compiled_in, ids).square().sum(), compiled_in), loop,
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu_in_values_and_gradients(dtype):
    """In bfloat16 both devices sum in float32 and round at the same points (the CPU's per-expert GEMMs
    rounded more before, so this allowed 3e-2 on values and 0.3 on gradients): two bf16 eps (1.6e-2) of
    each output's largest entry. (On the CPU the references, which sum in another order, measured within
    1e-6 of the kernels over this whole forward and backward.)"""
    cpu = [t.requires_grad_() if t.is_floating_point() else t for t in _inputs(tokens=300, experts=16, dtype=dtype)]
    gpu = [t.detach().cuda().requires_grad_() if t.is_floating_point() else t.cuda() for t in cpu]
    out_cpu, out_gpu = ops.moe_lora(*cpu), ops.moe_lora(*gpu)
    grads_cpu = torch.autograd.grad(out_cpu.float().square().sum(), cpu[:4])
    grads_gpu = torch.autograd.grad(out_gpu.float().square().sum(), gpu[:4])
    if dtype == torch.float32:
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads_gpu, grads_cpu, strict=True):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        return
    tol = 2 * torch.finfo(dtype).eps
    for got, want in zip((out_gpu, *grads_gpu), (out_cpu, *grads_cpu), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))


@requires_cuda
def test_cuda_kernels_take_more_tokens_than_a_grid_dimension_and_float64():
    """70,000 tokens (beyond a CUDA grid's y limit of 65535) and float64, against the CPU kernels."""
    for tokens, dtype in ((70_000, torch.float32), (300, torch.float64)):
        cpu = [t.requires_grad_() if t.is_floating_point() else t
               for t in _inputs(tokens=tokens, experts=4, d_in=8, d_out=6, rank=2, dtype=dtype)]
        gpu = [t.detach().cuda().requires_grad_() if t.is_floating_point() else t.cuda() for t in cpu]
        out_cpu, out_gpu = ops.moe_lora(*cpu), ops.moe_lora(*gpu)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
        grads_cpu = torch.autograd.grad(out_cpu.square().sum(), cpu[:4])
        grads_gpu = torch.autograd.grad(out_gpu.square().sum(), gpu[:4])
        for got, want in zip(grads_gpu, grads_cpu, strict=True):  # sums over ~35,000 pairs: compare norms
            assert float((got.cpu() - want).norm() / want.norm()) < 1e-5


# GEMMs (top-2, top-1); transposed-B loops; pair loops
@pytest.mark.parametrize("tokens,experts,k", [(600, 2, 2), (600, 4, 1), (100, 4, 2), (40, 16, 2)])
def test_every_cpu_strategy_equals_the_loop(tokens, experts, k):
    tensors = [t.requires_grad_() for t in _inputs(tokens=tokens, k=k, experts=experts)[:4]]
    _assert_values_and_gradients_equal_the_loop(tensors, _inputs(tokens=tokens, k=k, experts=experts)[4])


def _assert_values_and_gradients_equal_the_loop(tensors, ids):
    ours = ops.moe_lora(*tensors, ids)
    loop = per_expert_loop(*tensors, ids)
    torch.testing.assert_close(ours, loop, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(ours.square().sum(), tensors),
                         torch.autograd.grad(loop.square().sum(), tensors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_stack_with_many_idle_experts_equals_the_loop():
    """A serving stack: 32 experts resident, the batch's 200 tokens routed to two of them (the CPU
    kernels take the per-expert GEMMs, judged by the experts in use)."""
    tensors = [t.requires_grad_() for t in _inputs(tokens=200, k=2, experts=32)[:4]]
    ids = torch.stack([torch.full((200,), 3), torch.where(torch.arange(200) % 3 == 0, 17, 29)], dim=1)
    _assert_values_and_gradients_equal_the_loop(tensors, ids)


@pytest.mark.parametrize("experts", [1, 6])
def test_one_expert_holding_every_token_equals_the_loop(experts):
    """Top-1 with every token on one expert (a single adapter in a serving batch): the CPU kernels
    multiply without gathering or scattering."""
    x, A, B, gates, _ = _inputs(tokens=150, k=1, experts=experts)
    ids = torch.full((150, 1), experts - 1)
    torch.testing.assert_close(ops.moe_lora(x, A, B, gates, ids), per_expert_loop(x, A, B, gates, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,experts", [(64, 8), (3, 16)])  # operands converted once; element by element
def test_half_pair_loops_equal_float32_sums_rounded_once_per_stage(tokens, experts, dtype):
    """The CPU pair loops sum in float32 whichever way they read bfloat16 or float16: each stage equals the
    float32 kernels on the same (exactly representable) values, rounded once."""
    x, A, B, gates, ids = _inputs(tokens=tokens, k=2, experts=experts, dtype=dtype)
    flat = ids.reshape(-1)
    order, offsets = ops.moe_permute(flat, experts)
    h = ops.grouped_lora_shrink(x, A, flat, order, offsets)
    assert torch.equal(h, ops.grouped_lora_shrink(x.float(), A.float(), flat, order, offsets).to(dtype))
    y = ops.grouped_lora_expand(h, B, gates.reshape(-1), flat, order, offsets, tokens)
    want = ops.grouped_lora_expand(h.float(), B.float(), gates.reshape(-1).float(), flat, order, offsets, tokens)
    assert torch.equal(y, want.to(dtype))
