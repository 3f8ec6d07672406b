"""The grouped ops' order must be a permutation of the pairs grouped by expert, as moe_permute makes it (the CPU
refuses any other, where an entry in range used to be enough; a GPU never reads outside and leaves what it cannot
compute NaN), and eigvalsh_batched takes real matrices on every device."""

from __future__ import annotations

import pytest
import torch

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda

# The refusals are the compiled kernels' (the references read no order, so any order gives them the same sums).
requires_kernels = pytest.mark.skipif(not ops.HAS_COMPILED_OPS, reason="the compiled library is not loaded")


def _routing(tokens, experts, k=2, d_in=6, d_out=5, rank=2, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64).to(device)
    A = torch.randn(experts, rank, d_in, generator=g, dtype=torch.float64).to(device)
    B = torch.randn(experts, d_out, rank, generator=g, dtype=torch.float64).to(device)
    gates = torch.rand(tokens * k, generator=g, dtype=torch.float64).to(device)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).reshape(-1).to(device)
    return x, A, B, gates, ids


def _each_op(x, A, B, gates, ids, order, offsets):
    tokens, pairs = x.shape[0], ids.numel()
    h = torch.ones(pairs, A.shape[1], dtype=x.dtype, device=x.device)
    grad_y = torch.ones(tokens, B.shape[1], dtype=x.dtype, device=x.device)
    library = torch.ops.alphalora
    return {
        "shrink": lambda: library.grouped_lora_shrink(x, A, ids, order, offsets),
        "expand": lambda: library.grouped_lora_expand(h, B, gates, ids, order, offsets, tokens),
        "shrink_backward": lambda: library.grouped_lora_shrink_backward(h, x, A, ids, order, offsets),
        "expand_backward": lambda: library.grouped_lora_expand_backward(grad_y, h, B, gates, ids, order, offsets),
    }


def _first_pair_of_another_expert(order, offsets, expert):
    """A position in order outside expert's range (the first of the next expert that has pairs)."""
    end = int(offsets[expert + 1])
    return end if end < order.numel() else 0


# (2, 3): the CPU's pair loops, which read no order and let a broken one pass; (300, 2): per-expert GEMMs,
# which computed with it (a pair listed twice: another pair's row left zero)
@requires_kernels
@pytest.mark.parametrize("tokens, experts", [(2, 3), (300, 2)])
def test_cpu_grouped_ops_refuse_an_order_that_lists_a_pair_twice(tokens, experts):
    x, A, B, gates, ids = _routing(tokens, experts)
    order, offsets = ops.moe_permute(ids, experts)
    expert = int(ids[0])
    start, end = int(offsets[expert]), int(offsets[expert + 1])
    broken = order.clone()
    if end - start >= 2:
        broken[start + 1] = broken[start]  # in range and of the right expert, but twice
    else:  # the expert has one pair: list another expert's pair in its range too
        broken[start] = order[_first_pair_of_another_expert(order, offsets, expert)]
    for name, call in _each_op(x, A, B, gates, ids, broken, offsets).items():
        with pytest.raises(RuntimeError, match="twice|group the pairs"):
            call()
            pytest.fail(f"{name} took an order that is not a permutation")


@requires_kernels
@pytest.mark.parametrize("tokens, experts", [(2, 3), (300, 2)])
def test_cpu_grouped_ops_refuse_a_permutation_that_puts_a_pair_under_another_expert(tokens, experts):
    x, A, B, gates, ids = _routing(tokens, experts)
    order, offsets = ops.moe_permute(ids, experts)
    first_expert = int(ids[order[0]])
    other = _first_pair_of_another_expert(order, offsets, first_expert)
    swapped = order.clone()
    swapped[0], swapped[other] = order[other], order[0]  # still each pair once, but under the wrong expert
    for name, call in _each_op(x, A, B, gates, ids, swapped, offsets).items():
        with pytest.raises(RuntimeError, match="group the pairs by their expert_ids"):
            call()
            pytest.fail(f"{name} took pairs under the wrong expert")


@requires_kernels
def test_cpu_grouped_ops_name_the_fix_in_the_error():
    x, A, B, gates, ids = _routing(2, 3)
    order, offsets = ops.moe_permute(ids, 3)
    broken = order.clone()
    broken[1] = broken[0]
    with pytest.raises(RuntimeError, match=r"grouped_lora_shrink: order lists pair .* twice .*moe_permute\("):
        ops.grouped_lora_shrink(x, A, ids, broken, offsets)


@pytest.mark.parametrize("tokens, experts", [(2, 3), (300, 2)])
def test_cpu_grouped_ops_take_any_order_of_pairs_within_an_expert(tokens, experts):
    """Only the grouping matters: pairs in another order inside their expert's range give the same results."""
    x, A, B, gates, ids = _routing(tokens, experts)
    order, offsets = ops.moe_permute(ids, experts)
    reversed_within = torch.cat([order[int(offsets[e]):int(offsets[e + 1])].flip(0) for e in range(experts)])
    assert not torch.equal(reversed_within, order)
    want = {name: call() for name, call in _each_op(x, A, B, gates, ids, order, offsets).items()}
    got = {name: call() for name, call in _each_op(x, A, B, gates, ids, reversed_within, offsets).items()}
    for name in want:
        for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got[name], want[name])), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_cuda_moe_permute_lists_every_pair_once_even_with_ids_out_of_range(gpu):
    """validate=False skips the range check: the pairs with ids outside [0, E) come after every expert's
    range (before, the end of order held whatever its allocation did), and shrink gives them NaN."""
    ids = torch.tensor([2, -1, 0, 7, 2, 1], device=gpu.device)
    order, offsets = gpu.ops.moe_permute(ids, 3, validate=False)
    assert offsets.tolist() == [0, 1, 2, 4]
    assert order.tolist() == [2, 5, 0, 4, 1, 3]
    x, A, _, _, _ = _routing(3, 3, device=gpu.device)
    h = gpu.ops.grouped_lora_shrink(x, A, ids, order, offsets)
    assert torch.isnan(h[[1, 3]]).all() and not torch.isnan(h[[0, 2, 4, 5]]).any()


def test_cuda_weight_gradients_are_nan_for_pairs_under_another_expert(gpu):
    """A GPU does not sync to check order: an expert whose range names a pair of another expert gets a NaN
    weight gradient instead of a silently wrong one; experts whose ranges are right keep their values."""
    x, A, B, gates, ids = _routing(4, 4, device=gpu.device)
    order, offsets = gpu.ops.moe_permute(ids, 4)
    first_expert = int(ids[order[0]])
    other = _first_pair_of_another_expert(order, offsets, first_expert)
    other_expert = int(ids[order[other]])
    swapped = order.clone()
    swapped[0], swapped[other] = order[other], order[0]
    h = reference.grouped_lora_shrink(x, A, ids, order, offsets)
    grad_h = torch.ones_like(h)
    grad_y = torch.ones(4, B.shape[1], dtype=x.dtype, device=gpu.device)
    grad_A = gpu.ops.grouped_lora_shrink_backward(grad_h, x, A, ids, swapped, offsets)[1]
    grad_B = gpu.ops.grouped_lora_expand_backward(grad_y, h, B, gates, ids, swapped, offsets)[1]
    want_A = reference.grouped_lora_shrink_backward(grad_h, x, A, ids, order, offsets)[1]
    want_B = reference.grouped_lora_expand_backward(grad_y, h, B, gates, ids, order, offsets)[1]
    spoilt = [first_expert, other_expert]
    kept = [e for e in range(4) if e not in spoilt]
    for got, want in ((grad_A, want_A), (grad_B, want_B)):
        assert torch.isnan(got[spoilt]).all()
        torch.testing.assert_close(got[kept], want[kept])
    gpu.synchronize()


@requires_kernels
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_eigvalsh_batched_refuses_complex_matrices_on_every_device(device):
    """The GPU binding passed a complex batch to the solver and copied its real eigenvalues into a complex
    output, where the CPU refuses it."""
    grams = torch.eye(3, dtype=torch.complex64, device=device).expand(4, 3, 3).contiguous()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.alphalora.eigvalsh_batched(grams)
