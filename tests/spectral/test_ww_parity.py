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
