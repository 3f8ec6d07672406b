"""Bad input gives a clear error up front, or a per-matrix status: never a crash halfway."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import alphalora
from alphalora.cli import main
from alphalora.spectral import AnalysisError, ReportFormatError, SpectralReport
from tests.tiny_models import build

analyze_module = importlib.import_module("alphalora.spectral.analyze")  # the package's `analyze` is the function


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


@pytest.mark.parametrize("device", ["gpu", "meta", "mps", "xla", "cuda:x", ""])
def test_unknown_device_names_the_value_and_the_choices(device):
    with pytest.raises(AnalysisError, match=f"unknown device '{device}'; choose cpu, cuda or cuda:N"):
        alphalora.analyze(build("llama"), device=device, progress=False)


def test_cuda_ordinal_beyond_the_gpus_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(AnalysisError, match=r"'cuda:2' does not exist: torch sees 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        alphalora.analyze(build("llama"), device="cuda:2", progress=False)


def test_cli_bad_device_is_one_line_and_exit_2(tmp_path, capsys):
    build("llama").save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "m"), "--device", "gpu", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown device 'gpu'; choose cpu, cuda or cuda:N" in err


class Opaque:
    """Not a tensor: weights-only loading refuses to unpickle it."""


def _two_shards(folder, index_name="model.safetensors.index.json"):
    save_file({"layers.0.weight": torch.randn(16, 16)}, folder / "model-00001-of-00002.safetensors")
    save_file({"layers.1.weight": torch.randn(16, 16)}, folder / "model-00002-of-00002.safetensors")
    weight_map = {"layers.0.weight": "model-00001-of-00002.safetensors",
                  "layers.1.weight": "model-00002-of-00002.safetensors"}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a safetensors file")
    return "model.safetensors", "header"


def _truncated_shard(folder):
    _two_shards(folder)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name, "damaged or incomplete"


def _index_naming_a_missing_shard(folder):
    _two_shards(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    return "model-00002-of-00002.safetensors", "missing"


def _index_without_weight_map(folder):
    _two_shards(folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return "model.safetensors.index.json", "weight_map"


def _index_not_json(folder):
    _two_shards(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    return "model.safetensors.index.json", "Expecting value"


def _bin_with_pickled_objects(folder):
    torch.save({"layers.0.weight": torch.randn(16, 16), "extra": Opaque()}, folder / "pytorch_model.bin")
    return "pytorch_model.bin", "Python objects besides tensors.*save_pretrained"


def _bin_not_a_checkpoint(folder):
    (folder / "pytorch_model.bin").write_bytes(b"PK not really a zip archive")
    return "pytorch_model.bin", "damaged or incomplete"


def _config_not_json(folder):
    save_file({"layers.0.weight": torch.randn(16, 16)}, folder / "model.safetensors")
    (folder / "config.json").write_text("{model_type: llama")
    return "config.json", "Expecting property name"


BAD_FILES = [_corrupt_safetensors, _truncated_shard, _index_naming_a_missing_shard, _index_without_weight_map,
             _index_not_json, _bin_with_pickled_objects, _bin_not_a_checkpoint, _config_not_json]


@pytest.mark.parametrize("make_bad_file", BAD_FILES, ids=lambda f: f.__name__.strip("_"))
def test_unreadable_weight_files_name_the_file_and_the_reason(tmp_path, capsys, make_bad_file):
    folder = tmp_path / "model"
    folder.mkdir()
    file, reason = make_bad_file(folder)
    with pytest.raises(AnalysisError, match=f"^cannot read {folder / file}: .*{reason}"):
        alphalora.analyze(folder, progress=False)
    assert main(["analyze", str(folder), "--out", str(tmp_path / "r.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: cannot read {folder / file}" in err and "Traceback" not in err


def test_a_file_that_goes_away_while_it_is_read(tmp_path, monkeypatch):
    save_file({"layers.0.weight": torch.randn(16, 16)}, tmp_path / "model.safetensors")
    walk = analyze_module.checkpoint_weights

    def walk_then_delete(*args, **kwargs):
        entries = walk(*args, **kwargs)
        (tmp_path / "model.safetensors").unlink()
        return entries

    monkeypatch.setattr(analyze_module, "checkpoint_weights", walk_then_delete)
    with pytest.raises(AnalysisError, match="cannot read .*model.safetensors: tensor layers.0.weight"):
        alphalora.analyze(tmp_path, progress=False)


class Quantized(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.layers[1].weight = nn.Parameter(torch.randint(-127, 127, (32, 32), dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("estimator", ["ww", "xmin_peak"])
def test_integer_weights_are_skipped_as_quantized(tmp_path, estimator):
    live = alphalora.analyze(Quantized(), estimator=estimator, progress=False)
    save_file({"layers.0.weight": torch.randn(32, 32), "layers.1.weight": torch.randint(0, 255, (32, 32),
              dtype=torch.uint8)}, tmp_path / "model.safetensors")
    on_disk = alphalora.analyze(tmp_path, estimator=estimator, progress=False)
    for report in (live, on_disk):
        status = {m.name: m.status for m in report.matrices}
        assert status == {"layers.0": "success", "layers.1": "skipped: integer (quantized) weight"}
        # Block 1 keeps its place in the layers, without a score.
        assert [(layer.layer, layer.n_matrices) for layer in report.layers] == [(0, 1), (1, 0)]
        assert report.layers[1].alpha is None and report.layers[0].alpha == report.matrices[0].alpha


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
    assert [layer.layer for layer in report.layers] == [0, 1, 2, 3, 4]
    assert [layer.alpha is None for layer in report.layers] == [False, True, True, True, False]
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


def test_analysis_options_are_checked_and_numpy_scalars_read_as_numbers(tmp_path):
    """A numpy threshold used to stay in report.options and fail to_json after the analysis; a NaN one failed
    inside a kernel or was applied as "fewer than 2 eigenvalues above nan"; log_lower_bound was recorded for
    estimators that have no window to bound."""
    import numpy as np

    model = build("llama")
    report = alphalora.analyze(model, estimator="ww", evals_threshold=np.float32(0.25), progress=False)
    assert report.options["evals_threshold"] == 0.25 and type(report.options["evals_threshold"]) is float
    report.to_json(tmp_path / "r.json")
    plain = alphalora.analyze(model, estimator="ww", evals_threshold=0.25, progress=False)
    assert [m.alpha for m in report.matrices] == [m.alpha for m in plain.matrices]
    for threshold in (float("nan"), float("inf"), -1.0, "1e-5"):
        with pytest.raises(AnalysisError, match="evals_threshold must be a finite number >= 0"):
            alphalora.analyze(model, evals_threshold=threshold, progress=False)
    with pytest.raises(AnalysisError, match="xmin_peak estimator's window only; the ww estimator has none"):
        alphalora.analyze(model, estimator="ww", log_lower_bound=False, progress=False)
    with pytest.raises(AnalysisError, match="include_embeddings must be True or False"):
        alphalora.analyze(model, include_embeddings="no", progress=False)


def test_plots_of_a_report_loaded_from_json_skip_the_spectra_it_does_not_keep(tmp_path):
    from alphalora.spectral.plots import write_plots

    live = alphalora.analyze(build("llama"), progress=False)
    live.to_json(tmp_path / "r.json")
    loaded = SpectralReport.load(tmp_path / "r.json")
    assert [p.name for p in write_plots(loaded, tmp_path / "plots")] == ["layer_alpha.png"]
    with pytest.raises(ValueError, match="no spectrum to plot .* a report loaded from JSON"):
        write_plots(loaded, tmp_path / "more", [live.matrices[0].name])
    assert not (tmp_path / "more").exists()
    assert len(write_plots(live, tmp_path / "live")) == 3  # the layer plot and both alpha extremes' ESDs
