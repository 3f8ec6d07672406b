"""The report on disk: every block keeps its layer entry, standard JSON, and validation on load."""

from __future__ import annotations

import io
import json
import math
import statistics

import pytest
import torch

import alphalora
from alphalora.cli import print_layer_table
from alphalora.spectral import ReportFormatError, SpectralReport
from tests.tiny_models import build


def _refuse_constant(name: str):
    raise AssertionError(f"non-standard JSON constant {name} in the report")


@pytest.fixture(scope="module")
def report_with_a_dead_block():
    """A 3-block Llama whose block 1 has only NaN weights."""
    model = build("llama", num_hidden_layers=3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".layers.1." in name and parameter.dim() == 2:
                parameter.fill_(float("nan"))
    return alphalora.analyze(model, progress=False)


def test_a_block_whose_matrices_all_fail_keeps_its_layer_entry(report_with_a_dead_block):
    report = report_with_a_dead_block
    assert [layer.layer for layer in report.layers] == [0, 1, 2]
    dead = report.layers[1]
    assert dead.alpha is None and dead.n_matrices == 0 and dead.alphas_by_role == {}
    assert all(m.status == "failed: weight has NaN or Inf values" for m in report.matrices if m.layer == 1)
    for layer in (0, 2):
        alphas = [m.alpha for m in report.matrices if m.layer == layer]
        assert len(alphas) == 7 and report.layers[layer].alpha == pytest.approx(statistics.fmean(alphas))


def test_the_layer_table_prints_a_dash_for_a_block_without_alpha(report_with_a_dead_block):
    out = io.StringIO()
    print_layer_table(report_with_a_dead_block, out)
    rows = {line.split()[0]: line.split() for line in out.getvalue().splitlines()[1:4]}
    assert rows["1"][1:3] == ["-", "0"] and set(rows["1"][3:]) == {"-"}
    assert rows["0"][1] == f"{report_with_a_dead_block.layers[0].alpha:.3f}"


def test_json_is_standard_and_non_finite_values_come_back_as_null(report_with_a_dead_block, tmp_path):
    report = report_with_a_dead_block
    report.matrices[0].log_alpha_norm = math.inf  # what a huge alpha gave before log_alpha_norm was overflow-free
    report.matrices[1].entropy = math.nan
    try:
        report.to_json(tmp_path / "r.json")
        report.to_csv(tmp_path / "r.csv")
    finally:
        report.matrices[0].log_alpha_norm = report.matrices[1].entropy = None
    text = (tmp_path / "r.json").read_text()
    data = json.loads(text, parse_constant=_refuse_constant)
    assert data["matrices"][0]["log_alpha_norm"] is None and data["matrices"][1]["entropy"] is None
    assert data["layers"][1] == {"layer": 1, "alpha": None, "n_matrices": 0, "alphas_by_role": {}}
    loaded = SpectralReport.load(tmp_path / "r.json")
    assert loaded.layers == report.layers and loaded.matrices == report.matrices
    assert loaded.layer_alphas() == [report.layers[0].alpha, None, report.layers[2].alpha]
    row = (tmp_path / "r.csv").read_text().splitlines()[1].split(",")
    assert "inf" not in row and "nan" not in row


def test_an_older_report_with_infinity_reads_it_as_null(report_with_a_dead_block, tmp_path):
    data = report_with_a_dead_block.to_dict()
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data).replace('"log_alpha_norm": null', '"log_alpha_norm": Infinity', 1))
    assert "Infinity" in path.read_text()
    loaded = SpectralReport.load(path)
    first_null = next(i for i, m in enumerate(data["matrices"]) if m["log_alpha_norm"] is None)
    assert loaded.matrices[first_null].log_alpha_norm is None


def _layer(field, value):
    def edit(data):
        data["layers"][0][field] = value
    return edit


def _matrix(field, value):
    def edit(data):
        data["matrices"][0][field] = value
    return edit


MALFORMED = [
    (_layer("alpha", "abc"), r"layers\[0\]: `alpha` must be a number or null, got 'abc'"),
    (_layer("alpha", True), r"layers\[0\]: `alpha` must be a number or null, got True"),
    (_layer("alpha", None), r"layers\[0\] \(layer 0\) has no alpha \(null, NaN or Inf\) although 7 matrices"),
    (_layer("alpha", math.nan), r"layers\[0\] \(layer 0\) has no alpha \(null, NaN or Inf\)"),
    (_layer("n_matrices", 2.5), r"`n_matrices` must be an integer, got 2.5"),
    (_layer("n_matrices", -1), r"`n_matrices` must be at least 0, got -1"),
    (_layer("alphas_by_role", {"q": "x"}), r"`alphas_by_role` must be an object of numbers"),
    (_matrix("shape", [32, "32"]), r"matrices\[0\] \(model.layers.0.\S+\): `shape` must be a list of integers"),
    (_matrix("alpha", "2.5"), r"`alpha` must be a number or null, got '2.5'"),
    (_matrix("bogus", 1), r"unknown field\(s\) \['bogus'\]"),
    (lambda data: data["matrices"][0].pop("status"), r"has no `status`"),
    (lambda data: data.__setitem__("layers", "oops"), r"`layers` must be a list of objects, got 'oops'"),
    (lambda data: data.__setitem__("matrices", [1, 2]), r"`matrices` must be a list of objects"),
    (lambda data: data.pop("model"), r"the report has no `model`"),
    (lambda data: data.__setitem__("options", []), r"`options` must be an object, got \[\]"),
]


@pytest.mark.parametrize("edit, message", MALFORMED)
def test_a_malformed_report_names_the_field_and_the_fix(tmp_path, edit, message):
    data = alphalora.analyze(build("llama"), progress=False).to_dict()
    edit(data)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ReportFormatError, match=message) as error:
        SpectralReport.load(path)
    assert str(error.value).endswith("re-create the report with `alphalora analyze`")


def test_a_plan_given_as_a_report_is_named(tmp_path):
    plan = alphalora.allocate(alphas=[3.0, 4.0], budget=4)
    plan.save(tmp_path / "plan.json")
    with pytest.raises(ReportFormatError, match=r"this is an adapter plan .* not an analysis report"):
        SpectralReport.load(tmp_path / "plan.json")
