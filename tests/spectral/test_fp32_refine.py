"""fp32 analysis recomputes in fp64 the matrices whose fit reads eigenvalues under the fp32 noise floor."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch
from torch import nn

import alphalora
from tests.conftest import requires_cuda
from tests.spectral.authors_fix_finger import fix_finger, hill_median


def _exact_spectrum(weight: torch.Tensor) -> torch.Tensor:
    return (torch.linalg.svdvals(weight.detach().double()) ** 2).sort().values


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_xmin_peak_fp32_equals_the_authors_estimator_on_exact_spectra(minilm, device):
    report = alphalora.analyze(minilm, estimator="xmin_peak", precision="fp32", device=device, progress=False)
    for m in report.matrices:
        expected, _, _ = fix_finger(_exact_spectrum(minilm.get_submodule(m.name).weight))
        assert m.status == "success" and abs(m.alpha - expected) <= 1e-3, (m.name, m.alpha, expected)
    refined = [m.name for m in report.matrices if m.refined_fp64]
    # The square attention matrices read eigenvalues near zero; the 1536 x 384 MLP matrices do not.
    assert 0 < len(refined) < len(report.matrices)
    assert not any("intermediate" in name for name in refined)


class RankOne(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        u, v = torch.randn(64, 1, generator=g), torch.randn(1, 64, generator=g)
        self.proj = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(scale * (u / u.norm()) @ (v / v.norm()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("scale", [10.0, 50.0])
def test_ww_fp32_fails_on_a_rank_one_matrix_like_weightwatcher(scale, device):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = RankOne(scale)  # lambda_max = scale^2: its fp32 rounding noise reaches above the 1e-5 filter
    with contextlib.redirect_stdout(io.StringIO()):
        frame = ww.WeightWatcher(model=model).analyze()
    assert frame["alpha"].tolist() == [-1]  # WeightWatcher's failed fit
    (m,) = alphalora.analyze(model, estimator="ww", precision="fp32", device=device, progress=False).matrices
    assert m.status.startswith("failed") and m.alpha is None and m.num_fit_evals == 1, m.status
    assert m.refined_fp64


class HalfTiny(nn.Module):
    """56 of 96 singular values in [1e-5, 1e-4], the rest up to 31.6: the median eigenvalue is fp32 noise."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        u, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
        tiny, large = torch.logspace(-5, -4, 56, dtype=torch.float64), torch.logspace(-1, 1.5, 40, dtype=torch.float64)
        s = torch.cat([tiny, large])
        self.proj = nn.Linear(96, 96, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.copy_(u @ torch.diag(s) @ v.T)


def test_median_fp32_reads_the_median_in_fp64_when_fp32_cannot_resolve_it():
    model = HalfTiny()
    (m,) = alphalora.analyze(model, estimator="median", precision="fp32", progress=False).matrices
    expected, _, xmin = hill_median(_exact_spectrum(model.proj.weight))
    assert m.refined_fp64
    assert m.alpha == pytest.approx(expected, rel=1e-6) and m.xmin == pytest.approx(xmin, rel=1e-6)


def test_fp32_keeps_matrices_whose_fit_reads_only_resolved_eigenvalues(minilm):
    for estimator in ("ww", "median"):
        report = alphalora.analyze(minilm, estimator=estimator, precision="fp32", progress=False)
        assert not any(m.refined_fp64 for m in report.matrices), estimator
