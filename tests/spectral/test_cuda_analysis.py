"""`alphalora.analyze` on a CUDA GPU gives the CPU's report (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import alphalora
from tests.conftest import requires_cuda


def _heavy_tailed_model() -> nn.Module:
    """Matrices of several shapes, heavy-tailed (Student-t) like trained weights, and one in the small-N branch."""
    g = torch.Generator().manual_seed(11)
    shapes = [(384, 384), (512, 128), (96, 300), (64, 64), (15, 40), (200, 200)]
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            o, i = layer.weight.shape
            normal = torch.randn(o, i, generator=g, dtype=torch.float64)
            chi2 = torch.randn(3 + k, o, i, generator=g, dtype=torch.float64).square().mean(0)
            layer.weight.copy_(normal / chi2.sqrt() / i**0.5)
    return model


@requires_cuda
@pytest.mark.parametrize("estimator", ["ww", "xmin_peak", "median"])
@pytest.mark.parametrize("precision,alpha_tol", [("fp64", 1e-8), ("fp32", 2e-3)])
def test_cuda_analysis_equals_the_cpu_analysis(estimator, precision, alpha_tol):
    model = _heavy_tailed_model()
    cpu = alphalora.analyze(model, estimator=estimator, precision=precision, device="cpu", progress=False)
    gpu = alphalora.analyze(model, estimator=estimator, precision=precision, device="cuda", progress=False)
    assert [m.name for m in gpu.matrices] == [m.name for m in cpu.matrices]
    for got, want in zip(gpu.matrices, cpu.matrices, strict=True):
        assert got.status == want.status, got.name
        if want.status != "success":
            continue
        assert got.alpha == pytest.approx(want.alpha, abs=alpha_tol), got.name
        assert got.xmin == pytest.approx(want.xmin, rel=max(alpha_tol, 1e-9)), got.name
        assert got.D == pytest.approx(want.D, abs=max(alpha_tol, 1e-9)), got.name
        assert got.lambda_max == pytest.approx(want.lambda_max, rel=1e-5), got.name
    for got, want in zip(gpu.layers, cpu.layers, strict=True):
        assert got.alpha == pytest.approx(want.alpha, abs=alpha_tol)
