"""Flat spectra: a tail with every eigenvalue at xmin has an alpha made of rounding noise."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import alphalora
from alphalora.spectral import fit_spectra
from alphalora.spectral.estimators import FLAT_TAIL_RTOL
from tests.spectral.authors_fix_finger import fix_finger, hill_median
from tests.tiny_models import build

ORTHOGONAL_O_PROJ = "model.layers.1.self_attn.o_proj"


def _spread_spectrum(spread: float, n: int = 64) -> torch.Tensor:
    """Eigenvalues from 1 to 1 + spread, denser at the bottom (a well-conditioned Hill sum)."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return 1.0 + spread * q**2


def _orthogonal(size: int, scale: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return (scale * q).float()  # stored in fp32: its squared singular values are scale^2 up to fp32 rounding


def _llama_with_orthogonal_o_proj(scale: float):
    model = build("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.get_submodule(ORTHOGONAL_O_PROJ).weight.copy_(_orthogonal(32, scale))
    return model


def test_a_tail_within_the_tolerance_is_degenerate_with_its_numbers_kept():
    (flat,) = fit_spectra([_spread_spectrum(0.005)], "median")
    alpha, distance, xmin = hill_median(_spread_spectrum(0.005))
    assert flat.status.startswith("degenerate: flat tail") and flat.warning == "flat tail"
    assert flat.alpha == pytest.approx(alpha, rel=1e-9) and flat.D == pytest.approx(distance, abs=1e-9)
    assert flat.xmin == xmin
    assert flat.alpha > 1 + 1 / math.log1p(FLAT_TAIL_RTOL)  # what a tail this flat implies: > 101


@pytest.mark.parametrize("estimator", ["ww", "xmin_peak", "median"])
def test_a_tail_spread_a_little_more_is_a_success(estimator):
    (fit,) = fit_spectra([_spread_spectrum(0.5)], estimator)
    assert fit.status == "success"


def test_xmin_peak_keeps_the_authors_alpha_of_a_flat_tail():
    evals = _spread_spectrum(0.002)
    (fit,) = fit_spectra([evals], "xmin_peak", precision="fp64")
    alpha, distance, xmin = fix_finger(evals)
    assert fit.status.startswith("degenerate")
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.xmin == xmin


@pytest.mark.parametrize("estimator", ["ww", "xmin_peak", "median"])
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_an_orthogonal_matrix_is_left_out_of_its_layer_score(estimator, precision):
    report = alphalora.analyze(_llama_with_orthogonal_o_proj(3.0), estimator=estimator, precision=precision,
                               progress=False)
    flat = next(m for m in report.matrices if m.name == ORTHOGONAL_O_PROJ)
    assert flat.status.startswith("degenerate: flat tail") and "rounding noise" in flat.status
    assert flat.alpha > 1e5 and flat.lambda_max == pytest.approx(9.0, rel=1e-5)
    others = [m.alpha for m in report.matrices if m.layer == 1 and m.name != ORTHOGONAL_O_PROJ]
    assert all(m.ok for m in report.matrices if m.layer == 1 and m.name != ORTHOGONAL_O_PROJ)
    assert report.layers[1].alpha == pytest.approx(statistics.fmean(others))
    assert report.layers[1].n_matrices == 6 and "o" not in report.layers[1].alphas_by_role
    # The allocation follows the other layers' alphas, not the noise.
    plan = alphalora.allocate(report, budget=30)
    assert plan.experts_per_layer == alphalora.allocate(alphas=[statistics.fmean(
        m.alpha for m in report.matrices if m.layer == layer and m.ok) for layer in range(3)], budget=30
    ).experts_per_layer
    assert max(plan.experts_per_layer) < 20


def test_log_alpha_norm_of_a_huge_alpha_is_finite_and_exact():
    """0.5 x orthogonal: every eigenvalue near 0.25, so 0.25 ** alpha underflows to 0 (log10(0) used to raise)."""
    mpmath = pytest.importorskip("mpmath")
    model = _llama_with_orthogonal_o_proj(0.5)
    report = alphalora.analyze(model, estimator="median", precision="fp64", progress=False)
    flat = next(m for m in report.matrices if m.name == ORTHOGONAL_O_PROJ)
    assert flat.status.startswith("degenerate") and flat.alpha > 1e5
    mpmath.mp.dps = 50
    lam = report.eigenvalues[ORTHOGONAL_O_PROJ].tolist()
    expected = mpmath.log10(mpmath.fsum(mpmath.mpf(v) ** flat.alpha for v in lam))
    assert flat.log_alpha_norm == pytest.approx(float(expected), rel=1e-12)
    assert flat.log_alpha_norm < -1e5
