"""The `gpu` fixture: the CUDA kernels to test, on a real GPU where there is one and, everywhere, through
the emulated CUDA (`tests/cuda_emulation.py`) on CPU tensors. A test takes its ops from `gpu.ops` and puts
its tensors on `gpu.device`."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

from tests import cuda_emulation


class GpuKernels(NamedTuple):
    ops: Any  # torch.ops.alphalora on a GPU, torch.ops.alphalora_cuda_emulated on the CPU
    device: str

    def synchronize(self) -> None:
        """Waits for the GPU, where an out-of-bounds access surfaces as an error (no-op emulated)."""
        if self.device == "cuda":
            torch.cuda.synchronize()


@pytest.fixture(params=["cuda", "emulated"])
def gpu(request) -> GpuKernels:
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return GpuKernels(torch.ops.alphalora, "cuda")
    reason = cuda_emulation.unavailable()
    if reason is not None:
        pytest.skip(reason)
    return GpuKernels(cuda_emulation.ops(), "cpu")
