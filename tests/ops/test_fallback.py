"""Without the compiled library, the reference ops take over with one warning."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch


def test_reference_ops_take_over_when_compiled_library_is_missing():
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        class BlockCompiled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "alphalora._C":
                    raise ImportError("blocked for the test")
                return None

        sys.meta_path.insert(0, BlockCompiled())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from alphalora import ops
            import alphalora.spectral
        assert not ops.HAS_COMPILED_OPS
        ours = [w for w in caught if "compiled kernels could not be loaded" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        q = (torch.arange(500, dtype=torch.float64) + 0.5) / 500
        x = ((1 - q) ** (-1 / 2.0))[None]
        alpha, _, index = ops.powerlaw_fit(x, torch.tensor([500]), torch.tensor([0]), torch.tensor([499]))
        assert abs(float(alpha) - 3.0) < 0.05, float(alpha)
        x = torch.randn(6, 8, requires_grad=True)
        A = torch.randn(3, 2, 8, requires_grad=True)
        B = torch.randn(3, 5, 2, requires_grad=True)
        ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0], [1, 2]])
        gates = torch.full((6, 2), 0.5, requires_grad=True)
        y = ops.moe_lora(x, A, B, gates, ids)
        want = sum(0.5 * (B[ids[:, j]] @ (A[ids[:, j]] @ x.unsqueeze(2))).squeeze(2) for j in range(2))
        assert torch.allclose(y, want, atol=1e-5)
        y.sum().backward()
        assert x.grad is not None and A.grad is not None and B.grad is not None and gates.grad is not None
        q, cache = torch.randn(1, 2, 4), torch.randn(6, 1, 4)
        slots, n = torch.tensor([[5, 1, 3]]), torch.tensor([3])
        out = ops.paged_decode_attention(q, cache, cache, slots, n, torch.tensor([0]), 0.5)
        keys = cache[slots[0], 0]
        want = torch.softmax(q[0] @ keys.T * 0.5, -1) @ keys
        assert torch.allclose(out[0], want, atol=1e-5)
        print("fallback ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_the_compiled_library_defines_every_op_the_python_side_knows():
    """`pip install` builds the compiled library with every schema of alphalora/ops/_library.py: none
    had to be filled in by a reference (`_fill_missing_ops` returns a library only when some were)."""
    from alphalora.ops import _library

    assert _library.HAS_COMPILED_OPS, "the compiled library did not load: rebuild with pip install"
    assert _library._python_library is None


def test_a_compiled_library_older_than_the_code_gets_references_for_the_ops_it_lacks():
    """An editable install not rebuilt after a pull: the newer ops run as references, with one warning."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        from alphalora.ops import _library

        newer = {"test_newer_op": ("test_newer_op(Tensor x, int k) -> Tensor", lambda x, k: x * k)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            library = _library._fill_missing_ops({**_library._SCHEMAS, **newer})
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "lack test_newer_op," in messages[0] and "Rebuild" in messages[0], messages
        assert torch.equal(torch.ops.alphalora.test_newer_op(torch.ones(3), 4), torch.full((3,), 4.0))
        print("filled", _library.HAS_COMPILED_OPS)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "filled" in result.stdout


def test_ops_without_a_cuda_kernel_get_their_references_on_cuda_with_one_warning(monkeypatch):
    """A library built without CUDA (no CUDA_HOME at install) on a GPU machine: every op still runs on
    CUDA tensors, through its reference, and one warning names the ops and the rebuild (paged attention among
    them: it has a CUDA kernel too). Shown on a throwaway namespace."""
    from alphalora.ops import _library

    namespace = "alphalora_fallback_test"
    definitions = torch.library.Library(namespace, "DEF")
    for name in ("router_gates", "paged_decode_attention"):
        definitions.define(f"{name}(Tensor x) -> Tensor")
        definitions.impl(name, lambda x: x + 1, "CPU")
    schemas = {"router_gates": ("", lambda x: x * 2), "paged_decode_attention": ("", lambda x: x * 3)}
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    with pytest.warns(RuntimeWarning, match=r"built without CUDA: router_gates, paged_decode_attention run as") \
            as caught:
        kept = _library._fill_missing_cuda_kernels(schemas, namespace)
    assert len(caught) == 1
    for name in schemas:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", "CUDA")
    assert _library._fill_missing_cuda_kernels(schemas, namespace) is None  # nothing left to fill
    del kept, definitions


def test_every_alphalora_op_runs_on_cuda_tensors_whatever_the_build():
    from alphalora.ops import _library

    for name in _library._SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"alphalora::{name}", "CUDA"), name
