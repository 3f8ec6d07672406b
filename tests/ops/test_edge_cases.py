"""Edge cases found by differential fuzzing of the kernels against their references: no tokens, float64
in the pair loops, ids, order entries and offsets out of range, NaN logits, constant spectral tails, spectra
without a logarithm."""

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


def test_cuda_shrink_and_expand_give_nan_for_ids_out_of_range_instead_of_reading_outside(gpu):
    """A GPU does not sync to check the ids: a pair (token) with a bad id gets NaN, the others their values."""
    x, A, B, gates, _ = _routing(2, 2, 3, device=gpu.device)
    order, offsets = gpu.ops.moe_permute(torch.tensor([0, 1, 2, 2], device=gpu.device), 3)
    ids = torch.tensor([0, 1, 1 << 40, 2], device=gpu.device)
    h = gpu.ops.grouped_lora_shrink(x, A, ids, order, offsets)
    assert torch.isnan(h[2]).all() and not torch.isnan(h[[0, 1, 3]]).any()
    y = gpu.ops.grouped_lora_expand(h.nan_to_num(), B, gates, ids, order, offsets, 2)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()


def _grouped_calls(library, x, A, B, gates, ids, order, offsets):
    """Each grouped op once with the given order and offsets (inputs otherwise consistent)."""
    tokens, pairs = x.shape[0], ids.numel()
    h = torch.ones(pairs, A.shape[1], dtype=x.dtype, device=x.device)
    grad_y = torch.ones(tokens, B.shape[1], dtype=x.dtype, device=x.device)
    return {
        "shrink": lambda: library.grouped_lora_shrink(x, A, ids, order, offsets),
        "expand": lambda: library.grouped_lora_expand(h, B, gates, ids, order, offsets, tokens),
        "shrink_backward": lambda: library.grouped_lora_shrink_backward(h, x, A, ids, order, offsets),
        "expand_backward": lambda: library.grouped_lora_expand_backward(grad_y, h, B, gates, ids, order, offsets),
    }


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
@pytest.mark.parametrize("tokens, experts", [(2, 3), (300, 2)])  # the CPU's pair loops (which read no order); GEMMs
@pytest.mark.parametrize("bad", ["-1", "pairs", "2**40"])
def test_grouped_ops_refuse_order_entries_out_of_range(implementation, tokens, experts, bad):
    """order is moe_permute's, but the ops take it from anyone: on the CPU an entry outside [0, pairs) made
    the per-expert GEMMs fail inside index_select (an IndexError naming no argument), and the pair loops,
    which read no order, passed it silently. Every path refuses it now, the references alike."""
    x, A, B, gates, ids = _routing(tokens, 2, experts)
    order, offsets = ops.moe_permute(ids, experts)
    order[order.numel() // 2] = {"-1": -1, "pairs": ids.numel(), "2**40": 1 << 40}[bad]
    library = torch.ops.alphalora if implementation == "kernel" else reference
    for name, call in _grouped_calls(library, x, A, B, gates, ids, order, offsets).items():
        with pytest.raises(RuntimeError, match="order entry .* is outside"):
            call()
            pytest.fail(f"{name} took the order entry")


@pytest.mark.parametrize("implementation", ["kernel", "reference"])
@pytest.mark.parametrize("broken", [[1, 2, 3, 4], [0, 2, 3, 5], [-1, 2, 3, 4], [0, 3, 2, 4]])
def test_grouped_ops_refuse_offsets_moe_permute_never_makes(implementation, broken):
    """offsets must rise from 0 to the number of pairs: the CPU sliced order with whatever it got (a negative
    start counts from the end), so a broken range gave wrong sums with no error."""
    x, A, B, gates, _ = _routing(2, 2, 3)
    ids = torch.tensor([0, 1, 2, 2])
    order, _ = ops.moe_permute(ids, 3)
    library = torch.ops.alphalora if implementation == "kernel" else reference
    for name, call in _grouped_calls(library, x, A, B, gates, ids, order, torch.tensor(broken)).items():
        with pytest.raises(RuntimeError, match="offsets must"):
            call()
            pytest.fail(f"{name} took offsets {broken}")


@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_cuda_grouped_ops_give_nan_for_order_entries_out_of_range_instead_of_reading_outside(gpu, bad):
    """A GPU does not sync to check order: an entry outside [0, pairs) is read nowhere, the pair it should
    have named comes out NaN (its h row; its grad_h and grad_gates), as does the weight gradient of the
    expert whose range holds it; everything else has its value, and the expand, which reads no order, is exact."""
    x, A, B, gates, _ = _routing(2, 2, 3, device=gpu.device)
    ids = torch.tensor([0, 1, 2, 2], device=gpu.device)
    order, offsets = gpu.ops.moe_permute(ids, 3)  # [0, 1, 2, 3], [0, 1, 2, 4]
    broken = order.clone()
    broken[2] = bad  # pair 2 (expert 2's first) is named by no entry
    fine = [0, 1, 3]
    h = gpu.ops.grouped_lora_shrink(x, A, ids, broken, offsets)
    want_h = reference.grouped_lora_shrink(x, A, ids, order, offsets)
    assert torch.isnan(h[2]).all()
    torch.testing.assert_close(h[fine], want_h[fine])
    y = gpu.ops.grouped_lora_expand(want_h, B, gates, ids, broken, offsets, 2)
    torch.testing.assert_close(y, reference.grouped_lora_expand(want_h, B, gates, ids, order, offsets, 2))
    grad_h = torch.randn_like(want_h)
    grad_x, grad_A = gpu.ops.grouped_lora_shrink_backward(grad_h, x, A, ids, broken, offsets)
    want_x, want_A = reference.grouped_lora_shrink_backward(grad_h, x, A, ids, order, offsets)
    torch.testing.assert_close(grad_x, want_x)
    assert torch.isnan(grad_A[2]).all()
    torch.testing.assert_close(grad_A[:2], want_A[:2])
    grad_y = torch.randn(2, 5, dtype=x.dtype, device=gpu.device)
    got = gpu.ops.grouped_lora_expand_backward(grad_y, want_h, B, gates, ids, broken, offsets)
    want = reference.grouped_lora_expand_backward(grad_y, want_h, B, gates, ids, order, offsets)
    assert torch.isnan(got[0][2]).all() and torch.isnan(got[2][2]) and torch.isnan(got[1][2]).all()
    torch.testing.assert_close(got[0][fine], want[0][fine])
    torch.testing.assert_close(got[2][fine], want[2][fine])
    torch.testing.assert_close(got[1][:2], want[1][:2])
    gpu.synchronize()  # an out-of-bounds access would surface here as an error


@pytest.mark.parametrize("broken", [[-5, 1, 2, 4], [0, 1, 9, 4], [0, 1, 0, 4]])
def test_cuda_weight_gradients_are_nan_for_offsets_moe_permute_never_makes(gpu, broken):
    """The weight gradients walk each expert's range of order: a range outside [0, pairs) or decreasing is
    read nowhere and that expert's gradient is NaN; an expert whose range is untouched keeps its value."""
    x, A, B, gates, _ = _routing(2, 2, 3, device=gpu.device)
    ids = torch.tensor([0, 1, 2, 2], device=gpu.device)
    order, offsets = gpu.ops.moe_permute(ids, 3)  # [0, 1, 2, 3], [0, 1, 2, 4]
    bad_offsets = torch.tensor(broken, device=gpu.device)
    spoilt = [e for e in range(3) if not 0 <= broken[e] <= broken[e + 1] <= 4]
    kept = [e for e in range(3) if broken[e:e + 2] == offsets.tolist()[e:e + 2]]
    assert spoilt and kept
    h = reference.grouped_lora_shrink(x, A, ids, order, offsets)
    grad_y = torch.ones(2, 5, dtype=x.dtype, device=gpu.device)
    grad_A = gpu.ops.grouped_lora_shrink_backward(torch.ones_like(h), x, A, ids, order, bad_offsets)[1]
    grad_B = gpu.ops.grouped_lora_expand_backward(grad_y, h, B, gates, ids, order, bad_offsets)[1]
    want_A = reference.grouped_lora_shrink_backward(torch.ones_like(h), x, A, ids, order, offsets)[1]
    want_B = reference.grouped_lora_expand_backward(grad_y, h, B, gates, ids, order, offsets)[1]
    for got, want in ((grad_A, want_A), (grad_B, want_B)):
        assert torch.isnan(got[spoilt]).all()
        torch.testing.assert_close(got[kept], want[kept])
    gpu.synchronize()

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
