"""The spectral analysis's GPU path without a GPU: Gram matrices built and solved on `cuda:0`.

Fake tensors (`tests.fake_cuda`) carry devices and dtypes but no values: these tests check where the
batched eigenvalue solve runs and in which precision (float64 on a GPU, see `SOLVE_IN_FLOAT64_ON`), and
that the spectra come back to the host as float64; `test_cuda_analysis` checks the numbers on a real GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alphalora import ops
from alphalora.spectral.eigenvalues import eigenvalues
from alphalora.spectral.weights import module_weights
from tests.fake_cuda import CUDA, assert_on_device, fake_cuda


def _model() -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in [(48, 32), (32, 48), (40, 40), (20, 64)])
    return model


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_grams_are_solved_on_the_gpu_in_float64_and_come_back_to_the_host(precision, monkeypatch):
    solved = []
    real_solve = ops.eigvalsh_batched

    def solve(grams):
        solved.append(grams)
        return real_solve(grams)

    monkeypatch.setattr(ops, "eigvalsh_batched", solve)
    entries = module_weights(_model())
    with fake_cuda(monkeypatch) as audit:
        spectra = eigenvalues(entries, precision=precision, device="cuda:0", batch_bytes=2 * 32 * 32 * 8)
    assert len(solved) >= 2  # batched by size, and split by batch_bytes
    assert_on_device(solved, CUDA, dtype=torch.float64)
    assert [tuple(s.shape) for s in spectra] == [(32,), (32,), (40,), (20,)]
    assert_on_device(spectra, torch.device("cpu"), dtype=torch.float64)
    assert audit.cpu_compute == []
