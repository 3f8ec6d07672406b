"""`ww` reproduces WeightWatcher 0.7.7 analyze() on every matrix it analyses."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch
from torch import nn

import alphalora

ww = pytest.importorskip("weightwatcher")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def _weightwatcher(model: nn.Module):
    with contextlib.redirect_stdout(io.StringIO()):  # the small-N branch prints
        return ww.WeightWatcher(model=model).analyze()


def _compare(report, frame, alpha_tol, d_tol, xmin_rtol):
    ours = {m.name: m for m in report.matrices}
    assert len(frame) > 0
    for _, row in frame.iterrows():
        m = ours[row["longname"]]
        assert m.status == "success", (m.name, m.status)
        assert abs(m.alpha - row["alpha"]) <= alpha_tol, (m.name, m.alpha, row["alpha"])
        assert abs(m.D - row["D"]) <= d_tol, (m.name, m.D, row["D"])
        assert abs(m.xmin - row["xmin"]) <= xmin_rtol * row["xmin"], (m.name, m.xmin, row["xmin"])
        assert m.num_pl_spikes == row["num_pl_spikes"] or alpha_tol > 1e-6
    # Everything WeightWatcher skipped, we skipped too (same layer filters).
    analysed = set(frame["longname"])
    assert {m.name for m in report.matrices if m.status == "success"} == analysed


class Synthetic(nn.Module):
    """Square, tall, wide, heavy-tailed and small matrices; one small enough for the small-N branch."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        shapes = [(256, 256), (512, 128), (96, 300), (64, 64), (15, 40), (12, 12), (5, 30)]
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)
        with torch.no_grad():
            for k, layer in enumerate(self.layers):
                o, i = layer.weight.shape
                t = torch.distributions.StudentT(2.0 + k).sample((o, i))
                layer.weight.copy_(t / (o**0.5) + 0.01 * torch.randn(o, i, generator=g))


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def minilm_ww(minilm):
    return _weightwatcher(minilm)


def test_ww_fp64_equals_weightwatcher_on_minilm(minilm, minilm_ww):
    report = alphalora.analyze(minilm, estimator="ww", precision="fp64", include_embeddings=True, progress=False)
    _compare(report, minilm_ww, alpha_tol=1e-8, d_tol=1e-8, xmin_rtol=1e-8)


def test_ww_fp32_close_to_weightwatcher_on_minilm(minilm, minilm_ww):
    report = alphalora.analyze(minilm, estimator="ww", precision="fp32", include_embeddings=True, progress=False)
    _compare(report, minilm_ww, alpha_tol=2e-3, d_tol=2e-3, xmin_rtol=2e-3)


def test_ww_reading_the_folder_equals_the_live_model(minilm, minilm_dir, minilm_ww):
    report = alphalora.analyze(minilm_dir, estimator="ww", precision="fp64", include_embeddings=True, progress=False)
    _compare(report, minilm_ww, alpha_tol=1e-8, d_tol=1e-8, xmin_rtol=1e-8)


def test_ww_fp64_equals_weightwatcher_on_synthetic_model():
    torch.manual_seed(3)
    model = Synthetic()
    frame = _weightwatcher(model)
    report = alphalora.analyze(model, estimator="ww", precision="fp64", progress=False)
    _compare(report, frame, alpha_tol=1e-8, d_tol=1e-8, xmin_rtol=1e-8)
    small = next(m for m in report.matrices if m.shape == [12, 12])
    assert small.num_fit_evals < 20  # the small-N branch was exercised
    skipped = next(m for m in report.matrices if m.shape == [5, 30])
    assert skipped.status.startswith("skipped") and "min_evals" in skipped.status


def test_ww_fp32_close_to_weightwatcher_on_synthetic_model():
    torch.manual_seed(3)
    model = Synthetic()
    frame = _weightwatcher(model)
    report = alphalora.analyze(model, estimator="ww", precision="fp32", progress=False)
    _compare(report, frame, alpha_tol=2e-3, d_tol=2e-3, xmin_rtol=2e-3)


def test_norm_metrics_equal_weightwatcher(minilm, minilm_ww):
    report = alphalora.analyze(minilm, estimator="ww", precision="fp64", include_embeddings=True, progress=False)
    ours = {m.name: m for m in report.matrices}
    for _, row in minilm_ww.iterrows():
        m = ours[row["longname"]]
        for column in ["lambda_max", "log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm",
                       "stable_rank", "entropy"]:
            assert getattr(m, column) == pytest.approx(row[column], rel=1e-7, abs=1e-9), (m.name, column)
        assert m.matrix_rank == row["matrix_rank"]


class RankDeficient(nn.Module):
    """Matrices whose zero singular values an fp64 Gram eigensolve returns as +-noise: exact rank 40 of 64
    (repeated columns), rank 1 (constant), and a low-rank product, beside a full-rank one."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        repeated = torch.randn(96, 64, generator=g)
        repeated[:, 40:] = repeated[:, :24]
        product = torch.randn(64, 10, generator=g) @ torch.randn(10, 64, generator=g)
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in (
            repeated, torch.ones(64, 32), product, torch.randn(80, 64, generator=g)))
        with torch.no_grad():
            for layer, weight in zip(self.layers, (repeated, torch.ones(64, 32), product, None), strict=True):
                if weight is not None:
                    layer.weight.copy_(weight)


def test_rank_and_entropy_of_rank_deficient_matrices_equal_weightwatcher():
    """WeightWatcher counts the rank on an fp64 SVD (singular values above sigma_max * N * eps); a Gram
    eigensolve's noise used to count rank 50 for 40 and 9 for 1."""
    model = RankDeficient()
    frame = _weightwatcher(model).set_index("longname")
    report = alphalora.analyze(model, estimator="ww", precision="fp64", progress=False)
    for m in report.matrices:
        row = frame.loc[m.name]
        assert m.matrix_rank == row["matrix_rank"], (m.name, m.matrix_rank, row["matrix_rank"])
        assert m.entropy == pytest.approx(row["entropy"], rel=1e-7), m.name
        assert m.log_norm == pytest.approx(row["log_norm"], rel=1e-9), m.name
        if m.status == "success":
            assert m.alpha == pytest.approx(row["alpha"], rel=1e-8), m.name
    # by construction (the rank-10 product, stored in float32, is of full rank by its rounding, as WeightWatcher says)
    assert [m.matrix_rank for m in report.matrices] == [40, 1, 64, 64]


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_median_of_a_rank_deficient_matrix_counts_its_zero_eigenvalues_as_tempbalance(precision):
    """PL_Alpha_Hill takes the median of every eigenvalue of svdvals(W)^2, the (tiny) zero ones of a rank-deficient
    matrix included; dropping the ones an eigensolver returns negative moved the median."""
    model = RankDeficient()
    weight = model.layers[0].weight.detach().double()
    eigs = torch.linalg.svdvals(weight).square().sort().values
    i = eigs.numel() // 2
    n = eigs.numel() - i
    expected = 1 + n / float(eigs[i:].log().sum() - n * eigs[i].log())  # TempBalance's formula, by hand
    report = alphalora.analyze(model, estimator="median", precision=precision, progress=False)
    assert report.matrices[0].alpha == pytest.approx(expected, rel=1e-6)
    assert report.matrices[1].status.startswith("failed: the median eigenvalue is zero")  # rank 1 of 32


@pytest.mark.parametrize("estimator", ["xmin_peak", "median", "ww"])
def test_a_constant_matrix_gets_a_status_not_a_crash(estimator):
    """All-equal weights (rank 1) with the defaults used to stop the whole analysis: the fp64 recompute's
    noise eigenvalues (1e-51) became zeros in the fp32 histogram."""
    report = alphalora.analyze(RankDeficient(), estimator=estimator, progress=False)  # xmin_peak, fp32: the defaults
    assert report.matrices[1].matrix_rank == 1  # (its fit, of eigensolver noise, means what the reference's would)
    assert report.matrices[3].status == "success"


@pytest.mark.parametrize("n", [2, 3, 7])
def test_sigma_of_weightwatchers_whole_spectrum_fallback_is_weightwatchers(n):
    """Under 8 eigenvalues above its 1e-5 filter (here a rank-n 40 x 32 matrix) WeightWatcher fits the whole
    spectrum but reports the sigma it computed before (with alpha 0): -1 / sqrt(N)."""
    g = torch.Generator().manual_seed(n)
    model = nn.Sequential(nn.Linear(32, 40, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(40, n, generator=g) @ torch.randn(n, 32, generator=g))
    frame = _weightwatcher(model)
    report = alphalora.analyze(model, estimator="ww", precision="fp64", progress=False)
    (m,) = report.matrices
    row = frame.iloc[0]
    assert (m.alpha, m.sigma) == (pytest.approx(row["alpha"], rel=1e-9), pytest.approx(row["sigma"], rel=1e-9))
    assert m.sigma == pytest.approx(-1 / n**0.5)
