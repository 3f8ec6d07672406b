"""HeteroLoRA end to end: allocate on a model and data, train the plan, export, serve, re-select dynamically."""

from __future__ import annotations

import json

import pytest
import torch

import alphalora
from alphalora.adapters.io import CONFIG_NAME, load_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation import AllocationError, Plan, RouterSettings
from alphalora.allocation.hetero import Candidate, parameters_used
from alphalora.allocation.plots import hetero_ranks
from alphalora.cli import main
from alphalora.training import train
from tests.tiny_models import build, save_tiny

peft = pytest.importorskip("peft")
OVERRIDES = dict(initializer_range=0.2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), **OVERRIDES)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"prompt": "the cat sat on", "completion": "the mat"},
            {"prompt": "the dog sat on", "completion": "the log"},
            {"text": "one two three four five"}, {"text": "red green blue yellow"}] * 8
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_scalar_gate_is_no_candidate(data, tmp_path):
    """Qwen2-MoE's shared_expert_gate is an nn.Linear hidden -> 1 (a scalar gate on the shared expert): no rank
    fits it, so it is not a candidate role (it used to stop the search with "rank 8 is larger than ... allows")."""
    folder = save_tiny("qwen2_moe", tmp_path / "qwen2_moe", **OVERRIDES)
    plan = alphalora.allocate(method="hetero", model_dir=folder, data=data, proxy="grad-norm", budget=3000,
                              ranks=[4, 8], proxy_batches=2, proxy_batch_size=4, progress=False)
    assert not any("shared_expert_gate" in name for name in plan.target_modules)
    assert any(name.endswith("shared_expert.gate_proj") for name in plan.target_modules)  # its projections are


def _cost(plan: Plan, model) -> int:
    candidates = []
    for name, rank in hetero_ranks(plan).items():
        if rank and not name.startswith("layer"):
            module = model.get_submodule(name)
            candidates.append(Candidate(name, "lora", 0, module.in_features, module.out_features))
        elif rank:
            candidates.append(Candidate(name, "shortcut", 0, 32, 32))
    return parameters_used(candidates, {n: r for n, r in hetero_ranks(plan).items() if r})


def test_static_rank_levels_fit_the_budget_train_export_to_peft_and_serve(llama_dir, data, tmp_path):
    plan = alphalora.allocate(method="hetero", model_dir=llama_dir, data=data, proxy="grad-norm", budget=3000,
                              ranks=[2, 4, 8], proxy_batches=4, proxy_batch_size=4, progress=False)
    assert plan.method == "hetero" and plan.disabled_modules == [] and plan.reallocation is None
    assert len(set(plan.rank_pattern.values())) > 1  # rank levels, not on/off
    used = _cost(plan, build("llama", **OVERRIDES))
    assert used == plan.source["parameters"] <= 3000
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

    result = train(llama_dir, plan, data, tmp_path / "adapter", max_steps=4, learning_rate=1e-2, batch_size=8,
                   save_steps=100, progress=False)
    config = json.loads((result.adapter_dir / CONFIG_NAME).read_text())
    assert config["num_parameters"] == used
    ours = build("llama", **OVERRIDES)
    load_adapter(ours, result.adapter_dir)
    ids = torch.randint(3, 100, (2, 7))
    export_peft(result.adapter_dir, tmp_path / "peft")
    twin = peft.PeftModel.from_pretrained(build("llama", **OVERRIDES), tmp_path / "peft").eval()
    torch.testing.assert_close(twin(input_ids=ids).logits, ours.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    from alphalora.serving.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(build("llama", **OVERRIDES), tokenizer=None,
                    config=EngineConfig(max_num_seqs=2, block_size=4, adapters={"hetero": str(result.adapter_dir)}))
    prompt = ids[0].tolist()
    served = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), ["hetero"])
    expected = ours.generate(torch.tensor([prompt]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert served[0].output_ids == expected


def test_dynamic_reallocation_rescores_keeps_switched_off_weights_and_saves_the_final_choice(llama_dir, data,
                                                                                              tmp_path):
    plan = alphalora.allocate(method="hetero", model_dir=llama_dir, data=data, proxy="grad-norm", budget=1200,
                              ranks=[4], dynamic_every=2, proxy_batches=2, proxy_batch_size=4, shortcuts=True,
                              progress=False)
    assert plan.reallocation.every == 2 and plan.disabled_modules  # every candidate built, most switched off
    result = train(llama_dir, plan, data, tmp_path / "adapter", max_steps=6, learning_rate=1e-2, batch_size=4,
                   save_steps=6, progress=False)
    rounds = result.reallocations
    assert [r["step"] for r in rounds] == [0, 2, 4]
    # A candidate never switched on kept its initial weights: B is still exactly zero in the checkpoint.
    from safetensors.torch import load_file

    ever_on = {name for r in rounds for name in r["enabled"]}
    checkpoint = load_file(str(next((tmp_path / "adapter" / "checkpoints").glob("checkpoint-*"))
                               / "adapter_model.safetensors"))
    never = [n for n in plan.disabled_modules if n not in ever_on and not n.startswith("layer")]
    assert never and all(not checkpoint[f"{n}.lora_B"].any() for n in never)
    assert any(checkpoint[f"{n}.lora_B"].any() for n in ever_on if not n.startswith("layer"))
    # The finished adapter holds exactly the last round's choice, as a static plan.
    saved = json.loads((result.adapter_dir / CONFIG_NAME).read_text())
    final = Plan.from_dict(saved["plan"])
    assert final.reallocation is None and final.disabled_modules == []
    assert sorted(final.target_modules + list(final.shortcuts)) == rounds[-1]["enabled"]


def test_a_dynamic_run_whose_weights_turn_nan_stops_at_its_next_round_naming_the_proxy(llama_dir, data, tmp_path):
    """A diverged run's proxy scores are all NaN: re-selecting on them would be the tie-break's choice."""
    from transformers import TrainerCallback

    plan = alphalora.allocate(method="hetero", model_dir=llama_dir, data=data, proxy="grad-norm", budget=1500,
                              ranks=[4], dynamic_every=2, proxy_batches=2, proxy_batch_size=4, progress=False)

    class DivergeAfterStepOne(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        if name.endswith("lora_A"):
                            param.fill_(float("nan"))

    with pytest.raises(AllocationError, match="the grad-norm proxy scored .* candidates NaN or Inf"):
        train(llama_dir, plan, data, tmp_path / "adapter", max_steps=4, learning_rate=1e-2, batch_size=4,
              save_steps=100, progress=False, callbacks=[DivergeAfterStepOne()])


def test_dynamic_run_resumes_to_the_uninterrupted_loss_curve(llama_dir, data, tmp_path):
    plan = alphalora.allocate(method="hetero", model_dir=llama_dir, data=data, proxy="snip", budget=1500, ranks=[4],
                              dynamic_every=2, proxy_batches=2, proxy_batch_size=4, progress=False)

    from transformers import TrainerCallback

    class StopAfterCheckpoint(TrainerCallback):  # the run dies right after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 3

    def run(folder, resume=False, callbacks=None):
        return train(llama_dir, plan, data, folder, max_steps=6, learning_rate=1e-2, batch_size=4, save_steps=3,
                     logging_steps=1, resume=resume, progress=False, callbacks=callbacks)

    full = run(tmp_path / "full")
    run(tmp_path / "cut", callbacks=[StopAfterCheckpoint()])
    resumed = run(tmp_path / "cut", resume=True)
    # the rounds before the cut come back from the checkpoint: the record equals the uninterrupted run's
    assert [r["step"] for r in resumed.reallocations] == [r["step"] for r in full.reallocations] == [0, 2, 4]
    losses = lambda result: [h["loss"] for h in result.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], rel=1e-6)
    assert resumed.reallocations[-1]["enabled"] == full.reallocations[-1]["enabled"]


def test_cli_allocate_hetero_writes_plan_and_plot_and_refuses_bad_input(llama_dir, data, tmp_path, capsys):
    out, plot = tmp_path / "plan.json", tmp_path / "hetero.png"
    assert main(["allocate", "--method", "hetero", "--model", str(llama_dir), "--data", str(data), "--budget",
                 "2000", "--proxy", "fisher", "--shortcuts", "--proxy-batches", "2", "--proxy-batch-size", "4",
                 "--out", str(out), "--plot", str(plot), "--no-progress"]) == 0
    assert Plan.load(out).source["proxy"] == "fisher" and plot.stat().st_size > 0
    assert "1 backward" not in capsys.readouterr().out  # fisher costs k passes: "2 forward + 2 backward"
    bad = {
        "smaller than one module": ["--budget", "10"],
        "larger than module": ["--budget", "5000", "--ranks", "4,64"],
        "reads 32 minibatches of 8": ["--budget", "5000"],
        "one candidate rank": ["--budget", "5000", "--ranks", "2,4", "--dynamic-every", "3"],
    }
    for message, extra in bad.items():
        assert main(["allocate", "--method", "hetero", "--model", str(llama_dir), "--data", str(data),
                     "--out", str(tmp_path / "x.json"), "--no-progress",
                     *(["--proxy-batches", "2"] if message != "reads 32 minibatches of 8" else []), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["allocate", "--method", "hetero", "--budget", "100"]) == 2
    assert "needs --model, --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["allocate", "--method", "hetero", "--proxy", "jacob_cov"])


def test_options_of_hetero_are_refused_for_other_methods():
    with pytest.raises(AllocationError, match="apply only to method='hetero'"):
        alphalora.allocate(alphas=[2.0, 3.0], proxy="snip")


def test_cli_refuses_hetero_options_given_to_other_methods(tmp_path, capsys):
    from alphalora.cli import main

    plan = tmp_path / "plan.json"
    base = ["allocate", "--method", "mola", "--preset", "24", "--num-layers", "4", "--out", str(plan)]
    assert main([*base, "--ranks", "4", "--shortcuts"]) == 2
    assert "--ranks, --shortcuts: HeteroLoRA options, read only with --method hetero" in capsys.readouterr().err
    assert not plan.exists()
    assert main([*base, "--no-progress"]) == 0 and plan.exists()  # only options that change the plan count


def test_shortcut_plans_refuse_gradient_checkpointing_before_training(llama_dir, data, tmp_path):
    from alphalora.adapters import AdapterError

    plan = Plan(method="hetero", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=[], shortcuts={"layer1.shortcut2": 2})
    with pytest.raises(AdapterError, match="without --gradient-checkpointing"):
        train(llama_dir, plan, data, tmp_path / "adapter", max_steps=1, gradient_checkpointing=True, progress=False)
    assert not (tmp_path / "adapter").exists()


def test_cli_allocate_hetero_refuses_bad_and_misplaced_options_with_clean_errors(llama_dir, data, tmp_path, capsys):
    bad = {
        "candidate ranks (--ranks) must be positive integers, e.g. 8 or 2,4,8, got [0]": ["--ranks", "0"],
        "candidate ranks (--ranks) must be positive integers, e.g. 8 or 2,4,8, got []": ["--ranks", ""],
        "--lora-alpha (lora_alpha) must be a positive number": ["--lora-alpha", "0"],
        "--shortcut-alpha (shortcut_alpha) must be a positive number": ["--shortcuts", "--shortcut-alpha", "-1"],
        "invalid plan: lora_dropout must be in [0, 1)": ["--lora-dropout", "1.5"],
        "budget 300 buys no module in either pool after the --pools separate split": [
            "--budget", "300", "--ranks", "4", "--target-modules", "gate", "--shortcuts", "--pools", "separate"],
        "candidate rank 64 is larger than a shortcut connection allows (32 x 32, rank at most 32); pass smaller "
        "--ranks": ["--ranks", "4,64", "--shortcuts"],
        "--shortcut-share (shortcut_share) is the shortcuts' budget share with --pools separate and --shortcuts": [
            "--shortcuts", "--shortcut-share", "0.5"],
        "--shortcut-share (shortcut_share) is the shortcuts' budget share": [
            "--pools", "separate", "--shortcut-share", "0.5"],
        "--pools separate splits the budget between modules and shortcut connections; without --shortcuts": [
            "--pools", "separate"],
        "--dynamic-every with --proxy constant would never change the selection": [
            "--proxy", "constant", "--dynamic-every", "2"],
        "--dynamic-every with --proxy alpha would never change the selection": [
            "--proxy", "alpha", "--dynamic-every", "2"],
        "--rank (rank) applies to alphalora, mola and uniform; for hetero pass --ranks": ["--rank", "4"],
        "--report (report) gives alphalora, mola and uniform their layer alphas": ["--report", "/nonexistent.json"],
        "--alphas (alphas) applies to alphalora, mola and uniform": ["--alphas", "3,4"],
        "--top-k (top_k) applies to alphalora, mola and uniform": ["--top-k", "3"],
        "--beta (beta) applies to alphalora": ["--beta", "2.5"],
        "--rounding (rounding) applies to alphalora": ["--rounding", "largest-remainder"],
        "--router and --aux-loss-coef (router) apply to alphalora, mola and uniform": ["--router", "shared"],
        "--router and --aux-loss-coef (router)": ["--aux-loss-coef", "0.01"],
    }
    for message, extra in bad.items():
        argv = ["allocate", "--method", "hetero", "--model", str(llama_dir), "--data", str(data), "--budget", "300000",
                "--proxy-batches", "2", "--proxy-batch-size", "4", "--out", str(tmp_path / "x.json"), "--no-progress"]
        assert main(argv + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x.json").exists()


def test_python_hetero_allocation_refuses_options_it_would_ignore():
    common = dict(method="hetero", model_dir="unused", data="unused", budget=1000)
    with pytest.raises(AllocationError, match=r"--rank \(rank\) applies to .*for hetero pass --ranks"):
        alphalora.allocate(**common, rank=4)
    with pytest.raises(AllocationError, match=r"--report \(report\).*--top-k \(top_k\)"):
        alphalora.allocate("report.json", **common, top_k=3)
    with pytest.raises(AllocationError, match=r"--router and --aux-loss-coef \(router\)"):
        alphalora.allocate(**common, router=RouterSettings(aux_loss_coef=0.01))
    with pytest.raises(AllocationError, match=r"--shortcut-share \(shortcut_share\) is the shortcuts' budget share"):
        alphalora.allocate(**common, shortcuts=True, shortcut_share=0.3)
    with pytest.raises(AllocationError, match="--dynamic-every with --proxy alpha would never change"):
        alphalora.allocate(**common, proxy="alpha", dynamic_every=3)


def test_synflow_needs_and_records_one_minibatch(llama_dir, data, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(data.read_text().splitlines()[:5]) + "\n")
    plan = alphalora.allocate(method="hetero", model_dir=llama_dir, data=short, proxy="synflow", budget=3000,
                              proxy_batch_size=4, progress=False)  # the default 32 proxy batches: synflow reads one
    assert plan.source["proxy_batches"] == 1 and plan.source["parameters"] > 0
    dynamic = alphalora.allocate(method="hetero", model_dir=llama_dir, data=short, proxy="synflow", budget=3000,
                                 ranks=[4], dynamic_every=2, proxy_batch_size=4, progress=False)
    assert dynamic.reallocation.batches == 1
    with pytest.raises(AllocationError, match=r"the synflow proxy reads 1 minibatch of 8 \(8 examples\) but .* has "
                       r"only 5; pass a smaller --proxy-batch-size, or more data"):
        alphalora.allocate(method="hetero", model_dir=llama_dir, data=short, proxy="synflow", budget=3000,
                           proxy_batch_size=8, progress=False)
    from alphalora.allocation.hetero import first_minibatches

    examples = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1, 2]}] * 4
    assert len(first_minibatches(examples, 0, 32, 4, "synflow")) == 1


def test_cli_allocate_hetero_truncates_long_rows_when_asked(llama_dir, data, tmp_path, capsys):
    argv = ["allocate", "--method", "hetero", "--model", str(llama_dir), "--data", str(data), "--budget", "3000",
            "--max-length", "4", "--proxy-batches", "2", "--proxy-batch-size", "4", "--out", str(tmp_path / "p.json"),
            "--no-progress"]
    assert main(argv) == 2
    assert "pass --truncate" in capsys.readouterr().err
    assert main([*argv, "--truncate"]) == 0
    assert Plan.load(tmp_path / "p.json").source["proxy"] == "grad-norm"


@pytest.fixture(scope="module")
def nan_llama_dir(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    folder = save_tiny("llama", tmp_path_factory.mktemp("nan-llama"), **OVERRIDES)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("proxy", ["grad-norm", "snip"])
def test_non_finite_proxy_scores_are_refused_naming_the_proxy_and_the_cause(nan_llama_dir, data, proxy):
    with pytest.raises(AllocationError, match=rf"^the {proxy} proxy scored \d+ of \d+ candidates NaN or Inf .*"
                                              r"weights likely hold NaN/Inf values.*diverges"):
        alphalora.allocate(method="hetero", model_dir=nan_llama_dir, data=data, proxy=proxy, budget=2000,
                           proxy_batches=1, progress=False)


def test_cli_hetero_on_nan_weights_writes_no_plan(nan_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["allocate", "--method", "hetero", "--model", str(nan_llama_dir), "--data", str(data), "--budget",
                 "2000", "--proxy-batches", "1", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the grad-norm proxy scored" in err and "NaN or Inf" in err and "Traceback" not in err
    assert not out.exists()


def test_a_hetero_plan_records_its_models_fingerprint_which_decides_the_other_model_warning(llama_dir, data,
                                                                                          tmp_path, caplog):
    import shutil

    from alphalora.adapters.io import base_fingerprint
    from alphalora.training.model import warn_if_plan_for_another_model

    plan = alphalora.allocate(method="hetero", model_dir=llama_dir, data=data, proxy="constant", budget=1500,
                              ranks=[4], progress=False)
    base = build("llama", **OVERRIDES)
    assert plan.source["base_fingerprint"] == base_fingerprint(base)
    renamed = tmp_path / "another-name"  # the same model under another name: the fingerprint says it is the same
    shutil.copytree(llama_dir, renamed)
    assert not warn_if_plan_for_another_model(plan, renamed, base)
    other = build("llama", **{**OVERRIDES, "rope_theta": 500.0})  # same shapes, another model
    assert warn_if_plan_for_another_model(plan, llama_dir, other)


def test_candidate_ranks_given_as_numpy_integers_choose_what_python_ints_choose(llama_dir, data):
    import numpy as np

    options = dict(method="hetero", model_dir=llama_dir, data=data, proxy="grad-norm", budget=3000, proxy_batches=2,
                   proxy_batch_size=4, progress=False)
    plans = [alphalora.allocate(ranks=ranks, **options).to_dict() for ranks in (np.array([2, 4, 8]), [2, 4, 8])]
    for plan in plans:
        plan["source"].pop("proxy_seconds")
    assert plans[0] == plans[1]
    json.dumps(plans[0])  # plain ints in the plan
