"""Bad input gives a clear error up front, or a per-matrix status: never a crash halfway."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import alphalora
from alphalora.spectral import AnalysisError, ReportFormatError, SpectralReport
from tests.tiny_models import build


def test_missing_path(tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        alphalora.analyze(tmp_path / "nope", progress=False)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AnalysisError, match="no weights"):
        alphalora.analyze(tmp_path, progress=False)


def test_model_without_2d_weights(tmp_path):
    save_file({"norm.weight": torch.ones(8), "scale": torch.ones(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(AnalysisError, match="no 2-D weight matrices"):
        alphalora.analyze(tmp_path, progress=False)


def test_unknown_estimator_precision_and_device():
    model = build("llama")
    with pytest.raises(AnalysisError, match="unknown estimator"):
        alphalora.analyze(model, estimator="powerlaw2")
    with pytest.raises(AnalysisError, match="unknown precision"):
        alphalora.analyze(model, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(AnalysisError, match="no CUDA GPU"):
            alphalora.analyze(model, device="cuda")


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(5))
        self.tiny = nn.Linear(4, 3)
        with torch.no_grad():
            self.layers[1].weight[3, 4] = float("nan")
            self.layers[2].weight[0, 0] = float("inf")
            self.layers[3].weight.zero_()


@pytest.mark.parametrize("estimator", ["ww", "xmin_peak", "median"])
def test_bad_matrices_get_a_status_and_the_rest_is_analysed(estimator):
    report = alphalora.analyze(Broken(), estimator=estimator, progress=False)
    status = {m.name: m.status for m in report.matrices}
    assert status["layers.0"] == "success" and status["layers.4"] == "success"
    assert "NaN or Inf" in status["layers.1"] and "NaN or Inf" in status["layers.2"]
    assert status["layers.3"].startswith("failed") and "eigenvalues above" in status["layers.3"]
    if estimator == "ww":
        assert status["tiny"].startswith("skipped") and "min_evals" in status["tiny"]
    else:
        assert status["tiny"] == "success"
    assert [layer.layer for layer in report.layers] == [0, 4]
    for m in report.matrices:
        assert (m.alpha is None) == (m.status != "success")


def test_report_file_is_validated(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text('{"matrices": []}')
    with pytest.raises(ReportFormatError, match="format_version"):
        SpectralReport.load(bad)
    bad.write_text('{"format_version": 99}')
    with pytest.raises(ReportFormatError, match="not supported"):
        SpectralReport.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ReportFormatError, match="not valid JSON"):
        SpectralReport.load(bad)
    with pytest.raises(ReportFormatError, match="does not exist"):
        SpectralReport.load(tmp_path / "missing.json")
