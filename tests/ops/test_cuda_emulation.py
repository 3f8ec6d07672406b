"""The CUDA kernels and their bindings, run on the CPU by an emulated CUDA (`tests/cuda_emulation.py`),
against the CPU kernels (themselves held to the pure-PyTorch references and the per-expert loop
elsewhere) and against the contracts the CUDA headers state for input the CPU refuses.

Every op runs three times, its threads taking turns between barriers by three schedules (all in step;
each warp running ahead of the next, in increasing and in decreasing order), and the results must be
bit-identical: a kernel that reads shared memory before the barrier that publishes it gives different
answers. Outputs that `at::empty` allocates start as NaN (deterministic mode), so an element a kernel
never writes shows. What this cannot see is the GPU's own arithmetic (fused multiply-adds, its expf and
log), its memory model beyond barriers, and speed: the `tests` stage of `benchmarks/gpu_checks.sh` runs
the CUDA tests on a real GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests import cuda_emulation
from tests.ops.test_attention_ops import _inputs as _attention_inputs
from tests.ops.test_router_gates import _inputs as _router_inputs
from tests.ops.test_routing_ops import _inputs as _routing_inputs
from tests.ops.test_select_experts import _inputs as _select_inputs
from tests.ops.test_spectral_ops import _spectra, _windows

pytestmark = cuda_emulation.requires_emulation


@pytest.fixture(scope="module")
def cuda():
    library = cuda_emulation.ops()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # so at::empty fills new tensors with NaN (or the largest int)
    try:
        yield library
    finally:
        torch.use_deterministic_algorithms(before)
        library.set_schedule(0)


def _every_schedule(library, op, *args):
    """op(*args) under each of the emulation's schedules (lockstep; warps running ahead, in increasing and in
    decreasing order); asserts the three results are bit-identical, and returns the first."""
    results = []
    for schedule in range(3):
        library.set_schedule(schedule)
        out = op(*args)
        results.append(out if isinstance(out, tuple) else (out,))
    library.set_schedule(0)
    for first, *others in zip(*results, strict=True):
        for other in others:
            assert torch.equal(first.view(torch.uint8) if first.is_floating_point() else first,
                               other.view(torch.uint8) if other.is_floating_point() else other), \
                "the result depends on the order of the threads between barriers"
    return results[0] if len(results[0]) > 1 else results[0][0]


def _close(got, want, dtype, equal_nan=False):
    """fp64/fp32 at their precision; 16-bit within one rounding of the output's largest entry (the CPU
    kernels sum in float and round once, as the GPU does)."""
    if dtype in (torch.bfloat16, torch.float16):
        scale = want.float().abs().nan_to_num(0).max().clamp(min=1.0).item()
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=eps * scale, equal_nan=equal_nan)
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=equal_nan)


# --- the emulation itself --------------------------------------------------------------------------


def test_the_emulation_runs_warp_shuffles_and_block_barriers(cuda):
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cuda.emulation_kernel("warp_sums", x[:256]), x[:256].view(8, 32).sum(1))
    torch.testing.assert_close(cuda.emulation_kernel("block_sums", x), x.view(2, 256).sum(1))


@pytest.mark.parametrize("kernel,threads", [("broadcast", 32), ("block_broadcast", 64)])
def test_the_emulation_shows_a_missing_barrier_as_a_schedule_dependent_result(cuda, kernel, threads):
    """Thread 0 writes shared memory, every thread reads it: with __syncwarp (one warp) or __syncthreads (two
    warps) between, all read 1 under every schedule; without, some schedule reads first."""
    x = torch.zeros(1)
    assert torch.equal(_every_schedule(cuda, cuda.emulation_kernel, f"{kernel}_synchronised", x), torch.ones(threads))
    with pytest.raises(AssertionError, match="order of the threads"):
        _every_schedule(cuda, cuda.emulation_kernel, kernel, x)


@pytest.mark.parametrize("kernel,message", [
    ("shuffle_after_return", "after 16 of its lanes returned"),
    ("split_barrier", "split between barriers: 16 lanes at __syncthreads, 16 at __syncwarp"),
    ("too_many_threads", "block of 2048 threads"),
])
def test_the_emulation_refuses_what_cuda_leaves_undefined(cuda, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        cuda.emulation_kernel(kernel, torch.zeros(1))
    assert torch.equal(cuda.emulation_kernel("warp_sums", torch.ones(32)), torch.tensor([32.0]))  # still launches


# --- routing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs,experts", [(6, 5), (300, 7), (1000, 64), (1, 1)])
def test_moe_permute_equals_the_cpu_counting_sort(cuda, pairs, experts):
    ids = torch.randint(0, experts, (pairs,), generator=torch.Generator().manual_seed(pairs))
    order, offsets = _every_schedule(cuda, cuda.moe_permute, ids, experts, True)
    want_order, want_offsets = torch.ops.alphalora.moe_permute(ids, experts, True)
    assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets)


def test_moe_permute_lists_out_of_range_ids_after_every_expert_unless_validating(cuda):
    """The CPU refuses such ids; unvalidated, the CUDA op still returns a permutation (routing_cuda.h)."""
    ids = torch.tensor([3, 9, 0, -1, 3, 1, 5, 0])
    order, offsets = _every_schedule(cuda, cuda.moe_permute, ids, 5, False)
    assert offsets.tolist() == [0, 2, 3, 3, 5, 5]
    assert order.tolist() == [2, 7, 5, 0, 4, 1, 3, 6]  # by expert, stable; then 9, -1 and 5 in pair order
    with pytest.raises(RuntimeError, match=r"outside \[0, 5\)"):
        cuda.moe_permute(ids, 5, True)


def _routing_case(tokens, experts, k, dtype, seed=0):
    x, A, B, gates, ids = _routing_inputs(tokens=tokens, k=k, experts=experts, dtype=dtype, seed=seed)
    flat = ids.reshape(-1)
    order, offsets = torch.ops.alphalora.moe_permute(flat, experts, True)
    g = torch.Generator().manual_seed(seed + 1)
    grad_y = torch.randn(tokens, B.shape[1], generator=g).to(dtype)
    grad_h = torch.randn(flat.numel(), A.shape[1], generator=g).to(dtype)
    return x, A, B, gates.reshape(-1), flat, order, offsets, grad_h, grad_y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,experts,k", [(37, 5, 2), (9, 16, 3), (40, 1, 1), (260, 4, 2)])
def test_grouped_routing_ops_equal_the_cpu_kernels(cuda, dtype, tokens, experts, k):
    """Shrink, expand and both backwards, every output; at 260 tokens the shrink runs 260 blocks of 8 warps."""
    x, A, B, gates, flat, order, offsets, grad_h, grad_y = _routing_case(tokens, experts, k, dtype)
    cpu = torch.ops.alphalora
    h = _every_schedule(cuda, cuda.grouped_lora_shrink, x, A, flat, order, offsets)
    want_h = cpu.grouped_lora_shrink(x, A, flat, order, offsets)
    _close(h, want_h, dtype)
    _close(_every_schedule(cuda, cuda.grouped_lora_expand, want_h, B, gates, flat, order, offsets, tokens),
           cpu.grouped_lora_expand(want_h, B, gates, flat, order, offsets, tokens), dtype)
    for got, want in zip(_every_schedule(cuda, cuda.grouped_lora_shrink_backward, grad_h, x, A, flat, order, offsets),
                         cpu.grouped_lora_shrink_backward(grad_h, x, A, flat, order, offsets), strict=True):
        _close(got, want, dtype)
    for got, want in zip(_every_schedule(cuda, cuda.grouped_lora_expand_backward, grad_y, want_h, B, gates, flat, order,
                                      offsets),
                         cpu.grouped_lora_expand_backward(grad_y, want_h, B, gates, flat, order, offsets), strict=True):
        _close(got, want, dtype)


def test_grouped_ops_give_nan_where_the_cpu_refuses_their_input(cuda):
    """routing_cuda.h: a pair with an id outside [0, E) reads no weights (its row is NaN, every other row is
    right); an order that names a pair twice leaves the pair it misses NaN; an expert whose range lists
    another expert's pair gets a NaN weight gradient. The CPU refuses all three."""
    x, A, B, gates, flat, order, offsets, grad_h, grad_y = _routing_case(12, 4, 2, torch.float32)
    cpu = torch.ops.alphalora
    want_h = cpu.grouped_lora_shrink(x, A, flat, order, offsets)
    want_grad_x, want_grad_A = cpu.grouped_lora_shrink_backward(grad_h, x, A, flat, order, offsets)
    bad = flat.clone()
    bad[5] = 4
    with pytest.raises(RuntimeError):
        cpu.grouped_lora_shrink(x, A, bad, order, offsets)
    h = cuda.grouped_lora_shrink(x, A, bad, order, offsets)
    others = torch.arange(24) != 5
    assert h[5].isnan().all()
    _close(h[others], want_h[others], torch.float32)
    y = cuda.grouped_lora_expand(want_h, B, gates, bad, order, offsets, 12)
    assert y[2].isnan().all() and not y[torch.arange(12) != 2].isnan().any()  # pair 5 is token 2's

    twice = order.clone()
    missed = twice[1].item()
    twice[1] = twice[0]  # the first expert's range names its first pair twice, and misses another
    with pytest.raises(RuntimeError):
        cpu.grouped_lora_shrink(x, A, flat, twice, offsets)
    h = cuda.grouped_lora_shrink(x, A, flat, twice, offsets)
    others = torch.arange(24) != missed
    assert h[missed].isnan().all()
    _close(h[others], want_h[others], torch.float32)

    swapped = order.clone()
    swapped[0], swapped[offsets[1]] = order[offsets[1]], order[0]  # experts 0 and 1 each list the other's pair
    assert flat[order[0]] == 0 and flat[order[offsets[1]]] == 1
    with pytest.raises(RuntimeError):
        cpu.grouped_lora_shrink_backward(grad_h, x, A, flat, swapped, offsets)
    _close(cuda.grouped_lora_shrink(x, A, flat, swapped, offsets), want_h, torch.float32)  # rows follow pair ids
    grad_x, grad_A = cuda.grouped_lora_shrink_backward(grad_h, x, A, flat, swapped, offsets)
    assert grad_A[:2].isnan().all() and not grad_A[2:].isnan().any()
    _close(grad_A[2:], want_grad_A[2:], torch.float32)
    _close(grad_x, want_grad_x, torch.float32)


def test_weight_gradients_of_an_expert_with_thousands_of_pairs_stay_within_float_rounding(cuda):
    """The weight-gradient kernel sums an expert's pairs in chunks, then the chunks: one running float32 sum of
    8192 positive terms was off by up to 1.8e-6 of the total over these four draws, the two-level sum by at most
    1.2e-7 (against float64)."""
    pairs = 8192
    B, ids = torch.ones(1, 1, 1), torch.zeros(pairs, dtype=torch.long)
    order, offsets = torch.ops.alphalora.moe_permute(ids, 1, True)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        h, gates, grad_y = (torch.rand(pairs, 1, generator=g), torch.rand(pairs, generator=g),
                            torch.rand(pairs, 1, generator=g))
        grad_B = cuda.grouped_lora_expand_backward(grad_y, h, B, gates, ids, order, offsets)[1]
        exact = (grad_y.double()[:, 0] * h.double()[:, 0] * gates.double()).sum().item()
        assert abs(grad_B.double().item() - exact) < 5e-7 * exact, seed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,experts,rank,top_k", [(37, 5, 4, 2), (19, 40, 3, 3), (9, 1, 8, 1), (3, 512, 1, 2)])
def test_router_gates_equal_the_cpu_kernel(cuda, dtype, tokens, experts, rank, top_k):
    """40 experts are more than a warp's lanes; 512 is the most a block's shared memory takes; 37 tokens
    fill five blocks of eight warps, the last one part-empty."""
    hidden, logits = _router_inputs(tokens=tokens, experts=experts, rank=rank, dtype=dtype)
    gated, gates, ids = _every_schedule(cuda, cuda.router_gates, hidden, logits, top_k, 1.5)
    want_gated, want_gates, want_ids = torch.ops.alphalora.router_gates(hidden, logits, top_k, 1.5)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=1e-7)
    _close(gated, want_gated, dtype)
    grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    extra = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    for grad_logits in (None, extra):
        got = _every_schedule(cuda, cuda.router_gates_backward, grad, hidden, want_gates, grad_logits, 1.5)
        want = torch.ops.alphalora.router_gates_backward(grad, hidden, want_gates, grad_logits, 1.5)
        _close(got, want, torch.float32 if dtype == torch.float64 else dtype)  # routing math in float, summed
        # across a warp's lanes on the GPU, in one loop on the CPU


def test_router_gates_ties_and_rows_that_are_not_finite_equal_the_cpu_kernel(cuda):
    hidden, logits = _router_inputs(tokens=5, experts=6, rank=2)
    logits = logits.contiguous()
    logits[0] = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 2.0])  # a three-way tie: lower experts first
    logits[1, 3], logits[2], logits[3] = float("inf"), float("-inf"), float("nan")
    for got, want in zip(_every_schedule(cuda, cuda.router_gates, hidden, logits, 2, 1.0),
                         torch.ops.alphalora.router_gates(hidden, logits, 2, 1.0), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_router_gates_refuse_more_experts_than_shared_memory_holds(cuda):
    hidden, logits = _router_inputs(tokens=2, experts=513, rank=1)
    with pytest.raises(RuntimeError, match="up to 512 experts"):
        cuda.router_gates(hidden, logits, 2, 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,routers,experts,top_k", [(41, 3, 5, 2), (200, 2, 40, 3), (5, 1, 1, 1)])
def test_select_experts_equal_the_cpu_kernel(cuda, dtype, tokens, routers, experts, top_k):
    logits, member, scale, base = _select_inputs(tokens=tokens, routers=routers, experts=experts, dtype=dtype)
    gates, ids = _every_schedule(cuda, cuda.select_experts, logits, member, scale, base, experts, top_k)
    want_gates, want_ids = torch.ops.alphalora.select_experts(logits, member, scale, base, experts, top_k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=1e-7)


def test_select_experts_give_nan_gates_for_a_router_outside_the_stack(cuda):
    """select_experts_cuda.h: a member outside [0, routers) gives NaN gates and ids base[t]; the CPU refuses."""
    logits, member, scale, base = _select_inputs(tokens=6, routers=2, experts=4)
    member = member.clone()
    member[4] = 2
    with pytest.raises(RuntimeError):
        torch.ops.alphalora.select_experts(logits, member, scale, base, 4, 2)
    gates, ids = cuda.select_experts(logits, member, scale, base, 4, 2)
    assert gates[4].isnan().all() and ids[4].tolist() == [base[4].item()] * 2
    keep = torch.arange(6) != 4
    want_gates, want_ids = torch.ops.alphalora.select_experts(logits[keep], member[keep], scale[keep], base[keep], 4, 2)
    assert torch.equal(ids[keep], want_ids) and torch.equal(gates[keep], want_gates)


# --- spectral ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_tail,bias_corrected,full", [(1, False, True), (1, False, False), (8, True, True),
                                                          (40, False, False)])
def test_powerlaw_fit_equals_the_cpu_kernel(cuda, min_tail, bias_corrected, full):
    """Spectra of 30 to 215 eigenvalues: one candidate block to several, KS distances over every tail."""
    evals, lengths = _spectra(5, batch=6, tail_power=2.0)
    lo, hi = (torch.zeros_like(lengths), lengths - 1) if full else _windows(lengths, 5)
    got = _every_schedule(cuda, cuda.powerlaw_fit, evals, lengths, lo, hi, min_tail, bias_corrected)
    want = torch.ops.alphalora.powerlaw_fit(evals, lengths, lo, hi, min_tail, bias_corrected)
    assert torch.equal(got[2], want[2])
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_powerlaw_fit_of_empty_and_tiny_spectra_equals_the_cpu_kernel(cuda):
    empty, none = torch.empty(3, 0, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    for got, want in zip(cuda.powerlaw_fit(empty, none, none, none, 1, False),
                         torch.ops.alphalora.powerlaw_fit(empty, none, none, none, 1, False), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    evals = torch.tensor([[1.0, 2.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0], [1.0, 1.5, 2.0, 9.0]], dtype=torch.float64)
    lengths, lo = torch.tensor([3, 1, 4]), torch.zeros(3, dtype=torch.long)
    for got, want in zip(_every_schedule(cuda, cuda.powerlaw_fit, evals, lengths, lo, lengths - 1, 1, False),
                         torch.ops.alphalora.powerlaw_fit(evals, lengths, lo, lengths - 1, 1, False), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_lower_bound", [True, False])
def test_xmin_peak_window_equals_the_cpu_kernel(cuda, dtype, log_lower_bound):
    evals, lengths = _spectra(4, batch=8, dtype=dtype)
    lo, hi = _every_schedule(cuda, cuda.xmin_peak_window, evals, lengths, 100, log_lower_bound)
    want_lo, want_hi = torch.ops.alphalora.xmin_peak_window(evals, lengths, 100, log_lower_bound)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)


# --- paged decode attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (4, 4, 40), (4, 2, 128), (2, 1, 256)])
def test_paged_decode_attention_equals_the_cpu_kernel(cuda, dtype, heads, kv_heads, dim):
    """Grouped-query heads, each share of the head a lane can hold (1, 2, 4 and 8 elements: head_dim 16, 40 (which
    leaves lanes idle), 128 and 256, the largest), windows that start late, and a context of one position (fewer
    positions than warps)."""
    inputs = _attention_inputs(heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype)
    got = _every_schedule(cuda, cuda.paged_decode_attention, *inputs, 0.3)
    _close(got, torch.ops.alphalora.paged_decode_attention(*inputs, 0.3), dtype)


def test_paged_decode_attention_over_a_long_context_equals_the_cpu_kernel(cuda):
    """Hundreds of positions per warp, scores growing along the context: the online softmax rescales its
    running sums at every tile with a new maximum."""
    g = torch.Generator().manual_seed(3)
    lengths, starts = torch.tensor([1500, 700]), torch.tensor([0, 350])
    slots = torch.stack([torch.randperm(2000, generator=g)[:1500] for _ in range(2)])
    q = torch.randn(2, 2, 32, generator=g)
    keys = torch.randn(2000, 1, 32, generator=g) * torch.linspace(0.1, 3.0, 2000)[:, None, None]
    values = torch.randn(2000, 1, 32, generator=g)
    inputs = (q, keys, values, slots, lengths, starts)
    got = _every_schedule(cuda, cuda.paged_decode_attention, *inputs, 0.5)
    torch.testing.assert_close(got, torch.ops.alphalora.paged_decode_attention(*inputs, 0.5), rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_gives_zeros_without_context_and_nan_where_the_cpu_refuses(cuda):
    """No context: zeros, as on the CPU. A NaN key: NaN in its rows, as on the CPU. What the CPU refuses
    (a slot outside the cache, lengths beyond the slots, a start past the length): NaN in that row only, and
    no read outside the cache (the AddressSanitizer build runs this too)."""
    q, k_cache, v_cache, slots, lengths, starts = _attention_inputs()
    starts[2] = lengths[2]
    k_cache = k_cache.clone()
    k_cache[slots[3, 10], 0, 0] = float("nan")  # row 3 reads it (heads 0-3 share kv head 0)
    got = _every_schedule(cuda, cuda.paged_decode_attention, q, k_cache, v_cache, slots, lengths, starts, 0.25)
    want = torch.ops.alphalora.paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, 0.25)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    assert got[3, :4].isnan().all() and not got[3, 4:].isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)

    bad_slots, bad_lengths, bad_starts = slots.clone(), lengths.clone(), starts.clone()
    bad_slots[0, 3] = k_cache.shape[0]
    bad_lengths[1] = slots.shape[1] + 1
    bad_starts[4] = lengths[4] + 1
    got = cuda.paged_decode_attention(q, k_cache, v_cache, bad_slots, bad_lengths, bad_starts, 0.25)
    for row in (0, 1, 4):
        assert got[row].isnan().all()
    torch.testing.assert_close(got[[2, 3]], want[[2, 3]], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_paged_decode_attention_refuses_a_head_dim_beyond_its_registers(cuda):
    q, k_cache, v_cache, slots, lengths, starts = _attention_inputs(dim=264)
    with pytest.raises(RuntimeError, match="head_dim up to 256"):
        cuda.paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, 0.25)
