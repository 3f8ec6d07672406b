"""Plans: built by `allocate`, saved atomically, validated on load, and the CLI verb."""

from __future__ import annotations

import json

import pytest

import alphalora
from alphalora.allocation import AllocationError, Plan, PlanFormatError
from alphalora.cli import main
from tests.tiny_models import build


@pytest.fixture(scope="module")
def report():
    return alphalora.analyze(build("llama"), progress=False)


def test_alphalora_plan_from_a_report(report, tmp_path):
    plan = alphalora.allocate(report, budget=12, beta=2.5)
    assert plan.method == "alphalora" and plan.num_layers == 2 and plan.total_experts == 12
    high, low = (0, 1) if report.layers[0].alpha > report.layers[1].alpha else (1, 0)
    assert plan.experts_per_layer[high] >= plan.experts_per_layer[low]
    assert plan.top_k_per_layer == [min(2, n) for n in plan.experts_per_layer]
    assert plan.source["layer_alphas"] == report.layer_alphas()
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    data = json.loads(path.read_text())
    for key in ["format_version", "method", "base_model", "experts_per_layer", "top_k_per_layer",
                "target_modules", "rank", "lora_alpha", "lora_dropout", "router"]:
        assert key in data


def test_report_file_and_alphas_give_the_same_plan(report, tmp_path):
    report.to_json(tmp_path / "r.json")
    from_file = alphalora.allocate(tmp_path / "r.json", budget=10)
    from_alphas = alphalora.allocate(alphas=report.layer_alphas(), budget=10)
    assert from_file.experts_per_layer == from_alphas.experts_per_layer


def test_a_mola_preset_gives_its_literal_counts_in_python_as_on_the_command_line(tmp_path):
    """Six layers in four groups (2, 2, 1, 1 layers: earlier groups take the extra ones) of 2, 4, 6, 8 experts."""
    by_hand = [2, 2, 4, 4, 6, 8]
    assert alphalora.allocate(method="mola", preset="2468", num_layers=6).experts_per_layer == by_hand
    out = tmp_path / "plan.json"
    assert main(["allocate", "--method", "mola", "--preset", "2468", "--num-layers", "6", "--out", str(out)]) == 0
    assert Plan.load(out).experts_per_layer == by_hand
    # a budget still scales the pattern (shares 2:4:6:8 of 40 over the layers), and the default budget of the
    # other methods stays 160
    assert alphalora.allocate(method="mola", preset="2468", num_layers=8, budget=40).experts_per_layer == [
        2, 2, 4, 4, 6, 6, 8, 8]
    assert alphalora.allocate(method="uniform", num_layers=4).experts_per_layer == [40] * 4
    assert alphalora.allocate(alphas=[3.0, 3.0]).experts_per_layer == [80, 80]


def test_max_experts_is_refused_where_it_would_be_ignored(tmp_path, capsys):
    for kwargs, where in [(dict(method="mola", preset="2468", num_layers=8), "--method mola"),
                          (dict(method="uniform", num_layers=4, budget=8), "--method uniform"),
                          (dict(alphas=[3.0, 4.0], budget=10, rounding="compat"), "--rounding compat")]:
        with pytest.raises(AllocationError, match=f"--max-experts .* {where} would ignore it"):
            alphalora.allocate(max_experts=4, **kwargs)
    capped = alphalora.allocate(alphas=[1.0, 1.0, 10.0], budget=10, beta=1.0, max_experts=4)
    assert capped.experts_per_layer == [3, 3, 4]  # shares 10/12, 10/12, 100/12 with the big layer pinned at 4
    out = tmp_path / "plan.json"
    for args in (["--method", "mola", "--preset", "2468", "--num-layers", "8"],
                 ["--alphas", "3,4", "--rounding", "compat", "--budget", "10"]):
        assert main(["allocate", *args, "--max-experts", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("--max-experts") == 2 and "Traceback" not in err and not out.exists()


def test_mola_and_uniform_plans():
    assert alphalora.allocate(method="mola", preset="2468", num_layers=8, budget=None).experts_per_layer == [
        2, 2, 4, 4, 6, 6, 8, 8]
    assert alphalora.allocate(method="uniform", num_layers=4, budget=8).experts_per_layer == [2, 2, 2, 2]
    with pytest.raises(AllocationError, match="preset"):
        alphalora.allocate(method="mola", num_layers=8)
    with pytest.raises(AllocationError, match="number of layers"):
        alphalora.allocate(method="uniform", budget=8)
    with pytest.raises(AllocationError, match="needs layer alphas"):
        alphalora.allocate(method="alphalora", num_layers=8)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 7}, "not supported"),
        ({"method": "magic"}, "method"),
        ({"experts_per_layer": [2, 0]}, "integers >= 1"),
        ({"top_k_per_layer": [2]}, "one entry per layer"),
        ({"top_k_per_layer": [3, 2]}, "between 1 and"),
        ({"rank": 0}, "rank"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"router": {"type": "hash"}}, "router.type"),
        ({"router": "shared"}, 'router must be an object such as {"type": "shared"'),
        ({"router": {"type": "shared", "renormalise": False}}, r"router has unknown fields \['renormalise'\]"),
        ({"router": {"renormalize": "no"}}, "router.renormalize must be true or false"),
        ({"router": {"aux_loss_coef": "0.01"}}, "router.aux_loss_coef must be a number"),
        ({"reallocation": 5}, "reallocation must be an object"),
        ({"reallocation": {"budget": 10}}, "reallocation: .*every"),
        ({"surprise": 1}, "unexpected keyword"),
        # a string was iterated as one-letter module names when the plan was built (it validated and reloaded)
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list of module names"),
        ({"base_model": None}, "base_model must be the model's name or folder"),
    ],
)
def test_invalid_plans_are_refused_on_load(change, message, tmp_path):
    good = Plan(method="uniform", base_model="m", experts_per_layer=[2, 2], top_k_per_layer=[2, 2]).to_dict()
    good.update(change)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(good))
    with pytest.raises(PlanFormatError, match=message):
        Plan.load(path)


def test_cli_allocate(report, tmp_path, capsys):
    report.to_json(tmp_path / "r.json")
    out, plot = tmp_path / "plan.json", tmp_path / "alloc.png"
    assert main(["allocate", "--report", str(tmp_path / "r.json"), "--budget", "9", "--out", str(out),
                 "--plot", str(plot)]) == 0
    assert Plan.load(out).total_experts == 9
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["allocate", "--alphas", "3,4,5", "--method", "mola", "--preset", "842", "--out", str(out)]) == 0
    assert Plan.load(out).experts_per_layer == [8, 4, 2]
    assert main(["allocate", "--alphas", "3,4", "--budget", "-3", "--out", str(out)]) == 2
    assert main(["allocate", "--alphas", "3,x", "--out", str(out)]) == 2
    assert main(["allocate", "--alphas", "3,4", "--beta", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "budget must be positive" in err and "beta must be positive" in err and "Traceback" not in err


def test_default_targets_are_the_roles_the_report_found():
    bert = alphalora.analyze(build("bert"), progress=False)
    assert alphalora.allocate(bert, budget=4).target_modules == ["q", "k", "v", "o", "up", "down"]
    gpt2 = alphalora.analyze(build("gpt2"), progress=False)
    assert alphalora.allocate(gpt2, budget=4).target_modules == ["qkv", "o", "up", "down"]
    assert alphalora.allocate(alphas=[3.0, 4.0], budget=4).target_modules == [
        "q", "k", "v", "o", "gate", "up", "down"]


def test_a_string_of_targets_is_read_as_the_cli_reads_it_not_as_characters():
    assert alphalora.allocate(alphas=[2.0, 3.0], budget=4, target_modules="q_proj").target_modules == ["q_proj"]
    assert alphalora.allocate(alphas=[2.0, 3.0], budget=4, target_modules="q, v").target_modules == ["q", "v"]


def test_hetero_fields_are_validated_with_the_field_named():
    base = dict(method="hetero", base_model="m", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q"])
    cases = {
        "shortcut 'block1.residual1' must be layer<N>.<kind>": dict(shortcuts={"block1.residual1": 4}),
        "shortcut 'layer0.shortcut2' does not exist": dict(shortcuts={"layer0.shortcut2": 4}),
        "shortcut 'layer5.residual2' does not exist in a 2-layer model": dict(shortcuts={"layer5.residual2": 4}),
        "reallocation.proxy 'jacob_cov'": dict(reallocation={"every": 2, "proxy": "jacob_cov", "budget": 10}),
        "reallocation.every must be a positive": dict(reallocation={"every": 0, "budget": 10}),
        "target_modules must be a non-empty list": dict(target_modules=[]),
    }
    for message, fields in cases.items():
        with pytest.raises(PlanFormatError, match=message.replace("(", r"\(")):
            Plan(**{**base, **fields})
    shortcuts_only = Plan(**{**base, "target_modules": [], "shortcuts": {"layer1.shortcut2": 4}})
    assert Plan.from_dict(shortcuts_only.to_dict()) == shortcuts_only


DYNAMIC = dict(method="hetero", base_model="m", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
               target_modules=["q"], rank=4, shortcuts={"layer1.residual1": 4},
               reallocation={"every": 2, "proxy": "grad-norm", "budget": 1000})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shortcuts": ["layer1.residual1"]}, "shortcuts must map shortcut names to ranks"),
        ({"shortcuts": {"layer1.residual1": True}}, "shortcut 'layer1.residual1': rank must be a positive integer"),
        ({"shortcut_alpha": True}, "shortcut_alpha must be positive"),
        ({"rank": True}, "rank must be a positive integer, got True"),
        ({"rank_pattern": {"q": True}}, "rank_pattern must map"),
        ({"experts_per_layer": [True, 1]}, "experts_per_layer must be a non-empty list of integers"),
        ({"disabled_modules": ["layer1.residual1", "layer1.residual1"]},
         r"disabled_modules lists \['layer1.residual1'\] more than once"),
        ({"method": "mola", "reallocation": None}, "shortcuts are HeteroLoRA's: a plan with method mola"),
        ({"method": "alphalora", "shortcuts": {}}, "reallocation .* needs method hetero and one expert per layer"),
        ({"experts_per_layer": [3, 3], "top_k_per_layer": [2, 2]}, "needs method hetero and one expert per layer"),
        ({"rank_pattern": {"q": 2}}, "rank_pattern must be empty"),
        ({"shortcuts": {"layer1.residual1": 2}}, "every shortcut at that rank"),
        ({"reallocation.every": True}, "reallocation.every must be a positive number of steps, got True"),
        ({"reallocation.budget": True}, "reallocation.budget must be a positive parameter count, got True"),
        ({"reallocation.batches": "4"}, "reallocation.batches must be a positive number of minibatches, got '4'"),
        ({"reallocation.batch_size": 2.5}, "reallocation.batch_size must be a positive number of examples, got 2.5"),
        ({"reallocation.pools": "separate", "reallocation.shortcut_share": 5},
         "reallocation.shortcut_share must be a number between 0 and 1"),
        ({"reallocation.shortcut_share": True}, "reallocation.shortcut_share must be a number between 0 and 1"),
        ({"reallocation.seed": "x"}, "reallocation.seed must be an integer, got 'x'"),
        ({"reallocation.proxy": "constant"}, "reallocation.proxy 'constant' scores every round the same"),
        ({"reallocation.proxy": "alpha"}, "reallocation.proxy 'alpha' scores every round the same"),
    ],
)
def test_hetero_plans_with_wrong_types_or_misplaced_fields_are_refused_on_load(change, message):
    data = json.loads(json.dumps(Plan(**DYNAMIC).to_dict()))
    for key, value in change.items():
        section, _, field_name = key.rpartition(".")
        (data[section] if section else data)[field_name] = value
    with pytest.raises(PlanFormatError, match=message):
        Plan.from_dict(data)


def _other_json_files(report, tmp_path) -> dict[str, tuple[str, str]]:
    """JSON files people pass for a plan by mistake: name -> (path, what its message must say)."""
    from alphalora.adapters.inject import inject_adapters
    from alphalora.adapters.io import save_adapter

    report.to_json(tmp_path / "report.json")
    model = build("llama")
    model.save_pretrained(tmp_path / "model")
    inject_adapters(model, Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1],
                                top_k_per_layer=[1, 1], target_modules=["o"], rank=2))
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    return {
        "report": (tmp_path / "report.json", "is an analysis report (from `alphalora analyze`), not an adapter plan; "
                   f"make a plan from it with `alphalora allocate --report {tmp_path / 'report.json'} --out "
                   "plan.json` and pass that"),
        "adapter config": (tmp_path / "adapter" / "alphalora_config.json",
                           "is a trained adapter's config (written by `alphalora train`), not an adapter plan; pass "
                           "the plan it was trained from"),
        "adapter folder": (tmp_path / "adapter", "is a trained adapter's folder (from `alphalora train`), not an "
                           "adapter plan; pass the plan JSON it was trained from"),
        "PEFT config": (tmp_path / "adapter_config.json", "is a PEFT adapter's config, not an alphalora adapter plan; "
                        "make a plan with `alphalora allocate`, e.g. `alphalora allocate --method uniform "
                        "--num-layers N --budget N --rank 16`"),
        "model config": (tmp_path / "model" / "config.json", "is a transformers model's config, not an adapter plan; "
                         "pass its folder as the model to train"),
    }


def test_other_json_files_passed_for_a_plan_say_what_they_are_and_what_to_pass(report, tmp_path, capsys):
    """A report, an adapter (its config or folder), a PEFT adapter config or a model config given as the plan is
    named as what it is, with the fix, not "Plan.__init__() got an unexpected keyword argument 'model'"; in
    Python, from the CLI's train, and as a dict (named "this")."""
    files = _other_json_files(report, tmp_path)
    capsys.readouterr()
    for kind, (path, message) in files.items():
        with pytest.raises(PlanFormatError) as refused:
            Plan.load(path)
        assert str(refused.value).startswith(f"{path} {message}"), kind
        assert main(["train", "--model", str(tmp_path / "model"), "--plan", str(path), "--data", str(path),
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        assert capsys.readouterr().err.startswith(f"alphalora train: error: {path} {message}"), kind
        if path.is_file():
            with pytest.raises(PlanFormatError, match=r"^this is an? "):
                Plan.from_dict(json.loads(path.read_text()))
    assert not (tmp_path / "out").exists()


def test_a_report_given_as_a_dict_names_the_command_that_makes_a_plan(report):
    with pytest.raises(PlanFormatError, match=r"^this is an analysis report .*`alphalora allocate --report "
                                              r"REPORT\.json --out plan\.json`"):
        Plan.from_dict(report.to_dict())


def test_a_plan_is_told_from_the_other_files_by_its_experts_per_layer(report, tmp_path):
    """A plan with a stray field named like another file's is still read as a plan: the field is refused by name."""
    data = {**Plan(method="uniform", base_model="m", experts_per_layer=[2], top_k_per_layer=[1]).to_dict(),
            "matrices": [], "layers": []}
    with pytest.raises(PlanFormatError, match="unexpected keyword argument 'matrices'"):
        Plan.from_dict(data)
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(PlanFormatError, match=r"is a folder; pass the plan JSON file `alphalora allocate` wrote"):
        Plan.load(folder)
