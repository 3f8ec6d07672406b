"""Every emulated CUDA kernel stays inside its tensors: `tests/ops/test_cuda_emulation.py` run again in a
process where the kernels are built with AddressSanitizer (its runtime preloaded, so torch's tensors get
guard zones too). A read or write past a tensor, which a GPU may well survive silently, ends the run with
AddressSanitizer's report.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import cuda_emulation


@cuda_emulation.requires_emulation
def test_every_emulated_cuda_kernel_stays_inside_its_tensors():
    runtime = cuda_emulation.asan_runtime()
    if runtime is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(cuda_emulation.REPO / "tests" / "ops" / "test_cuda_emulation.py")],
        cwd=cuda_emulation.REPO, env=cuda_emulation.sanitized_environment(runtime), capture_output=True, text=True,
        timeout=1800)
    output = result.stdout + result.stderr
    assert "ERROR: AddressSanitizer" not in output, output[-6000:]
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and " skipped" not in output, output[-3000:]
