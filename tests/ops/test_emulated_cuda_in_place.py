"""The layers, the serving engine and the spectral analysis computed by the CUDA kernels: their test suites run
again in a child process where the emulated CUDA kernels and bindings (`tests/cuda_emulation.py`) have taken
the place of the CPU kernels of the `alphalora` ops. The Python code keeps its CPU paths (the tensors stay on
the CPU), while every routing, gating, expert-selection and power-law-fitting op computes in a CUDA kernel.
The suites then check those kernels in use: MoE-LoRA values and gradients against the per-expert loop, PEFT's
outputs, greedy tokens of mixed-adapter batches against transformers' `generate`, and WeightWatcher's
numbers. (The training suite takes over ten minutes this way and is left out; its layers are these.)
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests import cuda_emulation

SUITES = ["tests/adapters", "tests/serving/test_engine.py", "tests/serving/test_routing_layout.py", "tests/spectral"]


@cuda_emulation.requires_emulation
def test_the_adapter_serving_and_spectral_suites_pass_on_the_cuda_kernels():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *SUITES],
        cwd=cuda_emulation.REPO, env={**os.environ, cuda_emulation.IN_PLACE_VARIABLE: "1"},
        capture_output=True, text=True, timeout=2400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]  # (the child's conftest fails unless the kernels were replaced)
    assert " passed" in output, output[-3000:]
