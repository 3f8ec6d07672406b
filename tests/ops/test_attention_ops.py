"""Paged decode attention against attention over each row's gathered context (SDPA)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda


def _inputs(heads=8, kv_heads=2, dim=16, cache=96, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([23, 5, 1, 17, 30])
    starts = torch.tensor([0, 2, 0, 9, 20])  # rows 1, 3 and 4 keep only a window of their context
    width = int(lengths.max()) + 3
    slots = torch.full((len(lengths), width), -7)  # padding is never read: not even a valid slot
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(cache, generator=g)[:n]
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    k_cache = torch.randn(cache, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(cache, kv_heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, slots, lengths, starts


def attention_row_by_row(q, k_cache, v_cache, slots, lengths, starts, scale):
    """Each row's attended context gathered, then torch's scaled_dot_product_attention."""
    out = []
    for b in range(q.shape[0]):
        context = slots[b, int(starts[b]):int(lengths[b])]
        keys, values = k_cache[context].transpose(0, 1).double(), v_cache[context].transpose(0, 1).double()
        query = q[b][:, None, :].double()
        result = F.scaled_dot_product_attention(query[None], keys[None], values[None], scale=scale, enable_gqa=True)
        out.append(result[0, :, 0, :])
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (4, 1)])
def test_equals_attention_over_the_gathered_context(heads, kv_heads):
    inputs = _inputs(heads=heads, kv_heads=kv_heads)
    ours = ops.paged_decode_attention(*inputs, 0.3)
    want = attention_row_by_row(*inputs, 0.3)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.paged_decode_attention(*inputs, 0.3).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)])
def test_other_dtypes_accumulate_at_least_in_float(dtype, tolerance):
    inputs = _inputs(dtype=dtype)
    ours = ops.paged_decode_attention(*inputs, 0.25)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), attention_row_by_row(*inputs, 0.25), rtol=tolerance, atol=tolerance)


def test_a_row_with_no_context_gives_zeros():
    q, k_cache, v_cache, slots, lengths, starts = _inputs()
    starts[2] = lengths[2]
    out = ops.paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, 0.25)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_bad_input_is_refused():
    q, k_cache, v_cache, slots, lengths, starts = _inputs()
    bad_slots = slots.clone()
    bad_slots[0, 3] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.paged_decode_attention(q, k_cache, v_cache, bad_slots, lengths, starts, 0.25)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ops.paged_decode_attention(q[:, :7], k_cache, v_cache, slots, lengths, starts, 0.25)
    with pytest.raises(RuntimeError, match="lengths"):
        ops.paged_decode_attention(q, k_cache, v_cache, slots, lengths + 100, starts, 0.25)


def test_opcheck():
    torch.library.opcheck(torch.ops.alphalora.paged_decode_attention.default, (*_inputs(), 0.25))


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2),
                                             (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 16), (32, 8, 128), (4, 1, 256)])
def test_cuda_equals_cpu(dtype, tolerance, heads, kv_heads, dim):
    """The CUDA kernel (csrc/attention/paged_attention_cuda.cu) on the GPU's own arithmetic."""
    inputs = _inputs(heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype)
    cpu = ops.paged_decode_attention(*inputs, 0.25)
    gpu = ops.paged_decode_attention(*(t.cuda() for t in inputs), 0.25)
    assert gpu.dtype == dtype
    torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=tolerance, atol=tolerance)


def test_the_baseline_isa_build_of_the_cpu_kernel_agrees_with_the_oracle_too():
    """The kernel runs an AVX2 + FMA build where the CPU has one; ALPHALORA_CPU_ISA=baseline forces the
    portable build, which must give the same attention (up to FMA's rounding)."""
    script = textwrap.dedent(
        """
        import torch
        from tests.ops.test_attention_ops import _inputs, attention_row_by_row
        from alphalora import ops
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-10)):
            inputs = _inputs(dtype=dtype)
            got = ops.paged_decode_attention(*inputs, 0.3).double()
            want = attention_row_by_row(*inputs, 0.3)
            assert torch.allclose(got, want, rtol=tol, atol=tol), (dtype, (got - want).abs().max())
        print("baseline ok")
        """
    )
    env = {**os.environ, "ALPHALORA_CPU_ISA": "baseline"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=Path(__file__).resolve().parents[2])  # the checkout: `tests` imports from there
    assert result.returncode == 0, result.stderr
    assert "baseline ok" in result.stdout


def test_the_engines_head_dim_limit_is_the_cuda_kernels():
    """The serving engine sends heads up to PAGED_MAX_HEAD_DIM to the CUDA kernel and gathers wider ones: the limit
    must be the kernel's own (kMaxHeadDim), or wider heads reach a kernel that refuses them, or narrower ones
    take the slower gather."""
    from alphalora.serving.engine.model_runner import PAGED_MAX_HEAD_DIM

    header = Path(__file__).resolve().parents[2] / "csrc" / "attention" / "paged_attention_cuda.h"
    found = re.search(r"constexpr int64_t kMaxHeadDim = (\d+);", header.read_text())
    assert found is not None, f"no kMaxHeadDim in {header}"
    assert PAGED_MAX_HEAD_DIM == int(found.group(1))
