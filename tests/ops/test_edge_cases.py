"""Edge cases found by differential fuzzing of the kernels against their references: no tokens, float64
in the pair loops, ids out of range, NaN logits, constant spectral tails, spectra without a logarithm."""

from __future__ import annotations

import math

import pytest
import torch

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _routing(tokens, k, experts, d_in=6, d_out=5, rank=2, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64).to(device, dtype)
    A = torch.randn(experts, rank, d_in, generator=g, dtype=torch.float64).to(device, dtype)
    B = torch.randn(experts, d_out, rank, generator=g, dtype=torch.float64).to(device, dtype)
    gates = torch.rand(tokens * k, generator=g, dtype=torch.float64).to(device, dtype)
    ids = torch.randint(0, experts, (tokens * k,), generator=g).to(device)
    return x, A, B, gates, ids


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
def test_routing_ops_take_zero_tokens(implementation):
    """No tokens, no pairs: empty outputs and zero gradients (the reference divided by zero)."""
    x, A, B, gates, ids = _routing(0, 2, 3)
    order, offsets = ops.moe_permute(ids, 3)
    library = torch.ops.alphalora if implementation == "kernel" else reference
    h = library.grouped_lora_shrink(x, A, ids, order, offsets)
    y = library.grouped_lora_expand(h, B, gates, ids, order, offsets, 0)
    assert h.shape == (0, 2) and y.shape == (0, 5)
    grad_x, grad_A = library.grouped_lora_shrink_backward(h, x, A, ids, order, offsets)
    assert grad_x.shape == (0, 6) and torch.equal(grad_A, torch.zeros_like(A))
    grad_h, grad_B, grad_gates = library.grouped_lora_expand_backward(y, h, B, gates, ids, order, offsets)
    assert grad_h.shape == (0, 2) and torch.equal(grad_B, torch.zeros_like(B)) and grad_gates.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens, k, experts", [(5, 2, 3), (300, 1, 40), (1, 3, 3)])
def test_float64_pair_loops_sum_in_float64(device, tokens, k, experts):
    """Few pairs per expert take the CPU's pair loops, which summed float64 in float32 (1e-7 off)."""
    x, A, B, gates, ids = _routing(tokens, k, experts, d_in=64, d_out=48, rank=8, device=device)
    order, offsets = ops.moe_permute(ids, experts)
    h = ops.grouped_lora_shrink(x, A, ids, order, offsets)
    torch.testing.assert_close(h, reference.grouped_lora_shrink(x, A, ids, order, offsets), rtol=1e-12, atol=1e-12)
    y = ops.grouped_lora_expand(h, B, gates, ids, order, offsets, tokens)
    want = reference.grouped_lora_expand(h, B, gates, ids, order, offsets, tokens)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-1, 3])
def test_shrink_and_expand_refuse_ids_out_of_range(bad):
    """Called with ids moe_permute would refuse, the CPU pair loops read outside A and B."""
    x, A, B, gates, _ = _routing(2, 2, 3)
    order, offsets = ops.moe_permute(torch.tensor([0, 1, 2, 2]), 3)
    ids = torch.tensor([0, 1, bad, 2])
    with pytest.raises(RuntimeError, match="outside"):
        ops.grouped_lora_shrink(x, A, ids, order, offsets)
    with pytest.raises(RuntimeError, match="outside"):
        ops.grouped_lora_expand(torch.randn(4, 2, dtype=torch.float64), B, gates, ids, order, offsets, 2)


@requires_cuda
def test_cuda_shrink_and_expand_give_nan_for_ids_out_of_range_instead_of_reading_outside():
    """A GPU does not sync to check the ids: a pair (token) with a bad id gets NaN, the others their values."""
    x, A, B, gates, _ = _routing(2, 2, 3, device="cuda")
    order, offsets = ops.moe_permute(torch.tensor([0, 1, 2, 2], device="cuda"), 3)
    ids = torch.tensor([0, 1, 1 << 40, 2], device="cuda")
    h = ops.grouped_lora_shrink(x, A, ids, order, offsets)
    assert torch.isnan(h[2]).all() and not torch.isnan(h[[0, 1, 3]]).any()
    y = ops.grouped_lora_expand(h.nan_to_num(), B, gates, ids, order, offsets, 2)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_logits_rank_last_in_kernels_and_references_alike(device, dtype):
    """The kernels never choose a NaN logit while a number is left (and give it gate 0 if they must); the
    references chose it first (torch.sort puts NaN on top), so paths disagreed on the experts."""
    logits = torch.tensor([[float("nan"), 1.0, 3.0, 2.0],
                           [0.5, float("nan"), float("nan"), float("nan")],
                           [float("nan")] * 4], dtype=dtype, device=device)
    hidden = torch.ones(3, 8, dtype=dtype, device=device)
    for top_k in (2, 4):
        got = ops.router_gates(hidden, logits, top_k, 1.0)
        want = reference.router_gates(hidden, logits, top_k, 1.0)
        assert torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1], equal_nan=True)
        torch.testing.assert_close(got[0], want[0], equal_nan=True)
        stacked = torch.cat([logits, logits.flip(1)], 1)
        member = torch.tensor([0, 1, 0], device=device)
        scale = torch.ones(3, device=device)
        base = torch.tensor([0, 4, 8], device=device)
        got = ops.select_experts(stacked, member, scale, base, 4, top_k)
        want = reference.select_experts(stacked, member, scale, base, 4, top_k)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert reference.router_gates(hidden, logits, 2, 1.0)[2][0].tolist() == [2, 3]


def test_select_experts_reference_takes_zero_tokens():
    gates, ids = reference.select_experts(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                          torch.zeros(0, dtype=torch.long), 3, 2)
    assert gates.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize("bias_corrected", [False, True])
def test_a_constant_tail_is_no_fit_in_kernel_and_reference(bias_corrected):
    """T_i = 0 exactly where the tail is constant (alpha = inf, never a fit); the reference's difference
    of suffix sums left rounding noise there and fitted alpha ~ 1e15."""
    evals = torch.full((2, 47), 2.5, dtype=torch.float64)
    evals[1, :20] = torch.linspace(0.5, 2.0, 20, dtype=torch.float64)  # a rising head, then a constant tail
    lengths = torch.tensor([47, 47])
    lo, hi = torch.tensor([0, 20]), torch.tensor([47, 47])
    for fit in (ops.powerlaw_fit(evals, lengths, lo, hi, 1, bias_corrected),
                reference.powerlaw_fit(evals, lengths, lo, hi, 1, bias_corrected)):
        assert fit[2].tolist() == [-1, -1] and torch.isnan(fit[0]).all()


@pytest.mark.parametrize("value", [0.0, -1e-9, math.inf, math.nan])
def test_xmin_peak_window_refuses_values_without_a_finite_logarithm_like_the_reference(value):
    """log10 of 0, a negative, inf or NaN has no histogram bin: the reference raises (torch.histc), the
    kernel cast NaN to an integer (undefined behaviour) and returned a window."""
    evals = torch.sort(torch.rand(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1)[0]
    row = evals[1].clone()
    row[0 if value <= 0 else 29 if value == math.inf else 15] = value
    evals[1] = row
    lengths = torch.tensor([30, 30])
    with pytest.raises(RuntimeError):
        reference.xmin_peak_window(evals, lengths, 100, True)
    with pytest.raises(RuntimeError, match="positive and finite"):
        ops.xmin_peak_window(evals, lengths, 100, True)
    # A row too short to fit is not read, as in the reference.
    assert ops.xmin_peak_window(evals[1:, :1], torch.tensor([1]), 100, True)[0].tolist() == [0]


@pytest.mark.parametrize("poison", ["nan_query", "inf_key"])
def test_decode_attention_reference_propagates_non_finite_inputs_like_the_kernel(poison):
    """The reference (the implementation on a GPU) zeroed whatever softmax made NaN, so a NaN query gave
    zeros instead of NaN; only rows with no context are zeros, in both."""
    g = torch.Generator().manual_seed(0)
    q, k_cache, v_cache = (torch.randn(*shape, generator=g) for shape in [(3, 2, 4), (8, 1, 4), (8, 1, 4)])
    if poison == "nan_query":
        q[0, 1, 2] = math.nan
    else:
        k_cache[2] = math.inf
    slots = torch.tensor([[2, 3, 4], [2, 5, 6], [1, 0, 0]])
    lengths, starts = torch.tensor([3, 2, 0]), torch.zeros(3, dtype=torch.long)
    want = ops.paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, 0.5)
    got = reference.paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, 0.5)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert torch.isnan(got[0]).any() and torch.equal(got[2], torch.zeros(2, 4))
