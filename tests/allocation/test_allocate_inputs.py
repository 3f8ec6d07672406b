"""`allocate` refuses inputs that cannot give a valid plan, up front and with the fix in the message."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import alphalora
from alphalora.allocation import AllocationError, Plan, PlanFormatError
from alphalora.allocation.expert_counts import alpha_power_counts, authors_rounding
from alphalora.cli import main
from tests.tiny_models import build


def _analysed(dead_layer: int | None = None, quantized_layer: int | None = None, layers: int = 4):
    model = build("llama", num_hidden_layers=layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and f".layers.{dead_layer}." in name:
                module.weight.fill_(float("nan"))
            if isinstance(module, torch.nn.Linear) and f".layers.{quantized_layer}." in name:
                module.weight = torch.nn.Parameter(module.weight.detach().mul(100).to(torch.int8), requires_grad=False)
    return alphalora.analyze(model, progress=False)


@pytest.fixture(scope="module")
def healthy():
    return _analysed()


def test_a_block_without_alpha_is_refused_naming_the_layer_and_the_cause():
    report = _analysed(dead_layer=2)
    with pytest.raises(AllocationError, match=r"^layer 2 has no fitted alpha: none of its 7 matrices has a usable fit "
                                              r"\(7 x failed: weight has NaN or Inf values\)\..*--alphas"):
        alphalora.allocate(report)


def test_a_quantized_block_is_refused_for_alphalora_but_counted_by_mola(tmp_path):
    report = _analysed(quantized_layer=1)
    with pytest.raises(AllocationError, match=r"layer 1 has no fitted alpha: .*7 x skipped: integer \(quantized\)"):
        alphalora.allocate(report)
    plan = alphalora.allocate(report, method="mola", preset="2468")
    assert plan.experts_per_layer == [2, 4, 6, 8]  # all 4 layers: one per group
    assert plan.source["layer_alphas"][1] is None
    report.to_json(tmp_path / "r.json")
    assert alphalora.allocate(tmp_path / "r.json", method="uniform", budget=8).experts_per_layer == [2, 2, 2, 2]


def test_a_report_with_a_gap_in_its_layers_is_refused(healthy, tmp_path):
    data = healthy.to_dict()
    del data["layers"][1]  # what reports of blocks that failed entirely used to look like
    (tmp_path / "old.json").write_text(json.dumps(data))
    for method in ("alphalora", "uniform"):
        with pytest.raises(AllocationError, match=r"lists layers \[0, 2, 3\], not 0 to 3 in order \(layer\(s\) 1 "
                                                  r"missing\); re-create it with `alphalora analyze`"):
            alphalora.allocate(tmp_path / "old.json", method=method)


def test_cli_allocate_from_a_report_with_a_dead_block_is_one_line_and_writes_nothing(tmp_path, capsys):
    _analysed(dead_layer=0).to_json(tmp_path / "r.json")
    assert main(["allocate", "--report", str(tmp_path / "r.json"), "--out", str(tmp_path / "plan.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 0 has no fitted alpha" in err and "Traceback" not in err
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("options, message", [
    (dict(budget=10.5), r"the expert budget must be positive and whole, got 10.5"),
    (dict(budget="160"), r"the expert budget must be positive and whole, got '160'"),
    (dict(budget=True), r"the expert budget must be positive and whole, got True"),
    (dict(budget=12, max_experts=2.5), r"--max-experts \(max_experts\) must be positive and whole, got 2.5"),
    (dict(beta="2"), r"beta must be positive and finite, got '2'"),
    (dict(beta=math.inf), r"beta must be positive and finite, got inf"),
    (dict(top_k=1.5), r"--top-k \(top_k\) must be positive and whole, got 1.5"),
    (dict(method="uniform", num_layers=4.0, report=None), r"--num-layers \(num_layers\) must be positive and whole"),
    (dict(alphas="3,4", report=None), r"layer alphas \(--alphas\) must be positive numbers .* got '3,4'"),
    (dict(alphas=[True, 3.0], report=None), r"layer alphas \(--alphas\) must be positive numbers"),
])
def test_option_types_are_checked_up_front(healthy, options, message):
    report = options.pop("report", healthy)
    with pytest.raises(AllocationError, match=message):
        alphalora.allocate(report, **options)


def test_counts_respect_a_whole_budget_and_cap_given_as_numpy_integers(healthy, tmp_path):
    plan = alphalora.allocate(healthy, budget=np.int64(10), max_experts=np.int64(3))
    assert plan.total_experts == 10 and max(plan.experts_per_layer) <= 3
    assert plan.experts_per_layer == alphalora.allocate(healthy, budget=10, max_experts=3).experts_per_layer
    plan.save(tmp_path / "plan.json")  # plain ints in the JSON
    assert json.loads((tmp_path / "plan.json").read_text())["source"]["budget"] == 10


def test_adapter_settings_given_as_numpy_scalars_make_the_plan_python_values_make(healthy, tmp_path):
    given = alphalora.allocate(healthy, budget=10, rank=np.int64(4), lora_alpha=np.float32(8.0),
                               lora_dropout=np.float32(0.125), beta=np.float32(2.5))
    plain = alphalora.allocate(healthy, budget=10, rank=4, lora_alpha=8.0, lora_dropout=0.125, beta=2.5)
    assert given.to_dict() == plain.to_dict()
    given.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").to_dict() == plain.to_dict()


@pytest.mark.parametrize("rounding", ["largest-remainder", "compat"])
@pytest.mark.parametrize("alphas, beta", [([1e200, 2.0, 3.0], 2.5), ([3.0, 2.0, 3.0], 1000.0), ([1e-200, 3.0], 2.5)])
def test_alpha_power_out_of_float_range_is_a_clear_error(alphas, beta, rounding):
    with pytest.raises(AllocationError, match=r"alpha \*\* beta leaves the floating-point range .* use a smaller "
                                              r"--beta"):
        alphalora.allocate(alphas=alphas, beta=beta, rounding=rounding, budget=10)


def test_a_report_alpha_of_1e300_is_a_clear_error(healthy, tmp_path):
    data = healthy.to_dict()
    data["layers"][0]["alpha"] = 1e300
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(AllocationError, match="floating-point range"):
        alphalora.allocate(tmp_path / "r.json")


def test_cli_overflowing_alphas_are_one_line(tmp_path, capsys):
    for extra in ([], ["--rounding", "compat"]):
        assert main(["allocate", "--alphas", "3,2,3", "--beta", "1000", "--out", str(tmp_path / "p.json"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "floating-point range" in err and "Traceback" not in err


def test_the_authors_rounding_is_unchanged_on_ordinary_alphas():
    # Hand-checked: weights 2^2.5 = 5.657, 3^2.5 = 15.588, 4^2.5 = 32; shares of 10 are 1.06, 2.92, 6.02.
    assert alpha_power_counts([2.0, 3.0, 4.0], 10, 2.5, "compat") == [1, 3, 6]
    assert authors_rounding([5.656854249492381, 15.588457268119896, 32.0], 10) == [1, 3, 6]


def test_plans_refuse_non_finite_numbers(tmp_path):
    with pytest.raises(PlanFormatError, match="lora_alpha must be positive and finite, got inf"):
        Plan(method="uniform", base_model="m", experts_per_layer=[1], top_k_per_layer=[1], lora_alpha=math.inf)
    plan = Plan(method="uniform", base_model="m", experts_per_layer=[1], top_k_per_layer=[1],
                source={"scores": {"x": math.nan}})
    with pytest.raises(ValueError, match="JSON compliant"):
        plan.save(tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("method, options, unread", [
    ("alphalora", {"preset": "2468"}, "preset"),
    ("uniform", {"preset": "2468"}, "preset"),
    ("mola", {"preset": "24", "beta": 5.0}, "beta"),
    ("mola", {"preset": "24", "rounding": "compat"}, "rounding"),
    ("uniform", {"beta": 1.0, "rounding": "compat"}, "beta, rounding"),
    ("mola", {"preset": "24", "beta": 2.5}, "beta"),  # given, though equal to AlphaLoRA's default
    ("uniform", {"rounding": "largest-remainder"}, "rounding"),
])
def test_another_methods_options_are_refused_not_ignored(method, options, unread):
    with pytest.raises(AllocationError, match=f"^{unread}: not read by method '{method}'"):
        alphalora.allocate(alphas=[3.0, 4.0], method=method, **options)
    preset = {"preset": "24"} if method == "mola" else {}
    plan = alphalora.allocate(alphas=[3.0, 4.0], method=method, budget=8, **preset)
    assert plan.total_experts == 8  # the same call without the unread options goes through
