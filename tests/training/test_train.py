"""Training through the Python API: loss falls, adapters round-trip, bad input fails early."""

from __future__ import annotations

import json
import re

import pytest
import torch

import alphalora
from alphalora.adapters import AdapterError
from alphalora.adapters.io import load_adapter
from alphalora.allocation import Plan, RouterSettings
from alphalora.training import DataError, train
from tests.conftest import requires_cuda
from tests.tiny_models import save_tiny


def _plan(layers=2, experts=(4, 2), aux=0.01, targets=("q", "k", "v", "o", "gate", "up", "down")) -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=list(experts)[:layers],
                top_k_per_layer=[min(2, e) for e in experts][:layers], target_modules=list(targets), rank=4,
                lora_alpha=8.0, lora_dropout=0.0, router=RouterSettings(aux_loss_coef=aux))


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.5)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    rows = [{"prompt": "the cat sat on", "completion": "the mat"},
            {"prompt": "the dog sat on", "completion": "the log"},
            {"instruction": "count", "input": "one two", "output": "three four five"},
            {"text": "red green blue yellow"}] * 8
    return _write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def test_causal_lm_loss_falls_and_the_adapter_reloads(llama_dir, lm_data, tmp_path):
    result = train(llama_dir, _plan(), lm_data, tmp_path / "adapter", max_steps=60, learning_rate=2e-2,
                   batch_size=8, logging_steps=5, save_steps=100, progress=False)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    assert any("aux_loss" in h for h in result.log_history)
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 6, 7, 8]])
    trained = AutoModelForCausalLM.from_pretrained(llama_dir)
    load_adapter(trained, result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert not torch.allclose(trained(input_ids=ids).logits, base(input_ids=ids).logits)


def test_classification_trains_the_head_with_the_adapter(tmp_path):
    model_dir = save_tiny("bert", tmp_path / "tiny-bert")
    rows = [{"text": "the cat sat on the mat", "label": "animal"}, {"text": "red green blue", "label": "colour"},
            {"text": "the dog sat on the log", "label": "animal"}, {"text": "blue yellow red", "label": "colour"}] * 6
    data = _write_jsonl(tmp_path / "cls.jsonl", rows)
    result = train(model_dir, _plan(targets=("q", "v", "up")), data, tmp_path / "adapter", task="classification",
                   max_steps=30, learning_rate=5e-3, batch_size=8, logging_steps=5, progress=False)
    assert result.label_names == ["animal", "colour"]
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    config = json.loads((result.adapter_dir / "alphalora_config.json").read_text())
    assert config["plan"]["modules_to_save"] == ["classifier"]


def test_classification_evaluation_logs_accuracy(tmp_path):
    """eval_accuracy beside eval_loss, equal to the share of evaluation texts the saved adapter labels
    right when run on its own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = save_tiny("bert", tmp_path / "tiny-bert")
    rows = [{"text": "the cat sat on the mat", "label": "animal"}, {"text": "red green blue", "label": "colour"},
            {"text": "the dog sat on the log", "label": "animal"}, {"text": "blue yellow red", "label": "colour"}]
    data = _write_jsonl(tmp_path / "cls.jsonl", rows * 6)
    held_out = rows + [{"text": "the cat sat", "label": "animal"}, {"text": "green red", "label": "colour"},
                       {"text": "the log", "label": "animal"}]
    evaluation = _write_jsonl(tmp_path / "eval.jsonl", held_out)
    result = train(model_dir, _plan(targets=("q", "v")), data, tmp_path / "adapter", task="classification",
                   eval_data=evaluation, epochs=1, learning_rate=5e-3, batch_size=8, progress=False)
    (logged,) = [h for h in result.log_history if "eval_accuracy" in h]
    assert "eval_loss" in logged
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    load_adapter(model, result.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        predicted = [int(model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax()) for r in held_out]
    labels = [result.label_names.index(r["label"]) for r in held_out]
    right = sum(p == y for p, y in zip(predicted, labels, strict=True))
    assert logged["eval_accuracy"] == pytest.approx(right / len(labels))


def test_bad_input_fails_before_training(llama_dir, lm_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(llama_dir, _plan(), tmp_path / "missing.jsonl", tmp_path / "a")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        train(llama_dir, _plan(), empty, tmp_path / "a")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{nope\n')
    with pytest.raises(DataError, match="broken.jsonl:2 is not valid JSON"):
        train(llama_dir, _plan(), broken, tmp_path / "a")
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match="needs prompt/completion"):
        train(llama_dir, _plan(), wrong, tmp_path / "a")
    long = _write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["cat"] * 200)}])
    with pytest.raises(DataError, match=r"longer than the 64 allowed .*pass --truncate"):
        train(llama_dir, _plan(), long, tmp_path / "a")
    with pytest.raises(AdapterError, match="plan has 3 layers"):
        train(llama_dir, _plan(layers=3, experts=(2, 2, 2)), lm_data, tmp_path / "a", max_steps=1)
    with pytest.raises(AdapterError, match="match nothing"):
        train(llama_dir, _plan(targets=("q", "mlp_in")), lm_data, tmp_path / "a", max_steps=1)
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_plan_from_analysis_trains(llama_dir, lm_data, tmp_path):
    report = alphalora.analyze(llama_dir, progress=False)
    plan = alphalora.allocate(report, budget=6)
    result = train(llama_dir, plan, lm_data, tmp_path / "adapter", max_steps=4, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_cli_train_end_to_end(llama_dir, lm_data, tmp_path, capsys):
    from alphalora.cli import main

    plan = tmp_path / "plan.json"
    assert main(["allocate", "--method", "mola", "--preset", "42", "--num-layers", "2", "--out", str(plan)]) == 0
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(llama_dir), "--plan", str(plan), "--data", str(lm_data), "--out", str(out),
                 "--max-steps", "3", "--no-progress"]) == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "alphalora_config.json").exists()
    assert "adapter:" in capsys.readouterr().out
    assert main(["train", "--model", str(llama_dir), "--plan", str(tmp_path / "none.json"), "--data", str(lm_data),
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_datasets_folder_and_eval_loss(llama_dir, tmp_path):
    import datasets

    # Every row has every column, null where its shape lacks it, as datasets.load_dataset("json") makes them
    # (Dataset.from_list would keep only the first row's columns).
    rows = [{"prompt": "the cat sat on", "completion": "the mat", "text": None},
            {"prompt": None, "completion": None, "text": "one two three four five"}] * 6
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                   "validation": datasets.Dataset.from_list(rows[:4])})
    splits.save_to_disk(str(tmp_path / "ds"))
    splits["validation"].save_to_disk(str(tmp_path / "eval"))
    result = train(llama_dir, _plan(), tmp_path / "ds", tmp_path / "adapter", eval_data=tmp_path / "eval",
                   epochs=2, batch_size=4, logging_steps=1, progress=False)
    assert [h["epoch"] for h in result.log_history if "eval_loss" in h] == [1.0, 2.0]
    with pytest.raises(DataError, match="no 'train' split"):
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "nosplit"))
        train(llama_dir, _plan(), tmp_path / "nosplit", tmp_path / "a")


def test_the_same_seed_gives_the_same_classification_run_whatever_ran_before(tmp_path):
    bert = save_tiny("bert", tmp_path / "bert")
    rows = [{"text": "the cat sat on the mat", "label": "cat"}, {"text": "the dog sat on the log", "label": "dog"}] * 4
    data = _write_jsonl(tmp_path / "cls.jsonl", rows)
    plan = _plan(experts=(1, 1), aux=0.0, targets=("q", "v"))

    def run(name):
        result = train(bert, plan, data, tmp_path / name, task="classification", max_steps=2, batch_size=4,
                       seed=3, save_steps=100, logging_steps=1, progress=False)
        return [h["loss"] for h in result.log_history if "loss" in h]

    first = run("first")
    torch.rand(1000)  # the global generator moves on, as another run in the same process would move it
    assert run("second") == first


def test_gradient_checkpointing_follows_the_same_loss_curve(llama_dir, lm_data, tmp_path):
    """Checkpointed blocks re-run their forwards during backward; the routers' aux loss must still
    count each forward once (it used to collect the re-runs into the next step and fail)."""
    def losses(checkpointing, folder):
        result = train(llama_dir, _plan(aux=0.1), lm_data, tmp_path / folder, max_steps=8, learning_rate=2e-2,
                       batch_size=8, logging_steps=1, save_steps=100, gradient_checkpointing=checkpointing,
                       progress=False)
        return [value for h in result.log_history if "loss" in h for value in (h["loss"], h["aux_loss"])]

    plain, checkpointed = losses(False, "plain"), losses(True, "checkpointed")
    assert len(plain) == 16
    assert checkpointed == pytest.approx(plain, rel=1e-4, abs=1e-5)


@requires_cuda
def test_cuda_bf16_training_with_checkpointing_lowers_the_loss_and_reloads_on_cpu(llama_dir, lm_data, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(llama_dir, _plan(), lm_data, tmp_path / "adapter", max_steps=60, learning_rate=2e-2,
                   batch_size=8, logging_steps=5, save_steps=100, bf16=True, gradient_checkpointing=True,
                   progress=False)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    trained = AutoModelForCausalLM.from_pretrained(llama_dir)
    load_adapter(trained, result.adapter_dir)  # saved from the GPU, loaded on the CPU
    on_gpu = AutoModelForCausalLM.from_pretrained(llama_dir)
    load_adapter(on_gpu, result.adapter_dir)
    on_gpu = on_gpu.cuda()
    with torch.no_grad():
        cpu_logits, gpu_logits = trained(input_ids=ids).logits, on_gpu(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert not torch.allclose(cpu_logits, base(input_ids=ids).logits)


def test_learning_rate_schedules_follow_transformers_schedulers(llama_dir, lm_data, tmp_path):
    """--lr-scheduler / --warmup-ratio: the logged learning rate of every step against transformers'
    own schedule for the same steps; a bad name or ratio is refused before training."""
    from transformers import get_scheduler

    steps = 10
    for name in ("cosine", "constant_with_warmup"):
        result = train(llama_dir, _plan(), lm_data, tmp_path / name, max_steps=steps, learning_rate=1e-2,
                       lr_scheduler=name, warmup_ratio=0.3, weight_decay=0.01, batch_size=8, logging_steps=1,
                       save_steps=100, progress=False)
        logged = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
        schedule = get_scheduler(name, optimizer, num_warmup_steps=3, num_training_steps=steps)
        expected = []
        for _ in range(steps):
            expected.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        assert logged == pytest.approx(expected, rel=1e-6, abs=1e-12), name
    with pytest.raises(DataError, match="unknown lr_scheduler"):
        train(llama_dir, _plan(), lm_data, tmp_path / "bad", lr_scheduler="exotic")
    with pytest.raises(DataError, match="warmup_ratio"):
        train(llama_dir, _plan(), lm_data, tmp_path / "bad", warmup_ratio=1.5)


def test_counts_and_rates_are_checked_before_training(llama_dir, lm_data, tmp_path, capsys):
    """Zero batch size or accumulation steps (and the like) are refused with the argument named, from Python
    and from the command line, where they used to end in transformers' tracebacks."""
    from alphalora.cli import main

    for kwargs, message in [(dict(batch_size=0), "batch_size must be a positive integer, got 0"),
                            (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a positive"),
                            (dict(save_steps=-5), "save_steps must be"), (dict(logging_steps=0), "logging_steps"),
                            (dict(max_steps=0), "max_steps must be a positive number of steps, or -1"),
                            (dict(epochs=0), "epochs must be positive"), (dict(learning_rate=-1.0), "learning_rate"),
                            (dict(max_length=0), "max_length must be a positive")]:
        with pytest.raises(DataError, match=message):
            train(llama_dir, _plan(), lm_data, tmp_path / "a", **kwargs)
    plan = tmp_path / "plan.json"
    _plan().save(plan)
    base = ["train", "--model", str(llama_dir), "--plan", str(plan), "--data", str(lm_data), "--out", str(tmp_path)]
    for flag, value in [("--batch-size", "0"), ("--grad-accum", "0"), ("--grad-accum", "1.5"), ("--max-steps", "0"),
                        ("--epochs", "-1"), ("--lr", "-3e-4"), ("--max-length", "0"), ("--save-steps", "x")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, f"{flag}={value}"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument {flag}: must be" in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists()


def test_a_dynamic_plan_that_does_not_fit_the_model_or_data_fails_before_training(llama_dir, lm_data, tmp_path,
                                                                                   capsys):
    from alphalora.allocation import AllocationError
    from alphalora.cli import main

    def dynamic(**settings) -> Plan:
        return Plan(method="hetero", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                    target_modules=["q", "v"], rank=4,
                    reallocation={"every": 2, "budget": 1000, "batches": 2, "batch_size": 4, **settings})

    out = tmp_path / "adapter"
    with pytest.raises(AllocationError, match="dynamic reallocation does not fit this model: budget 1 is smaller "
                       "than one module.*edit the plan's rank and reallocation fields"):
        train(llama_dir, dynamic(budget=1), lm_data, out, max_steps=2, progress=False)
    with pytest.raises(DataError, match=r"reads 100 minibatches of 8 \(800 examples\) but the data has only 32; "
                       r"re-allocate .* lower the plan's reallocation.batches or reallocation.batch_size"):
        train(llama_dir, dynamic(batches=100, batch_size=8), lm_data, out, max_steps=2, progress=False)
    assert not out.exists()  # no checkpoints folder either
    dynamic(budget=1).save(tmp_path / "plan.json")
    assert main(["train", "--model", str(llama_dir), "--plan", str(tmp_path / "plan.json"), "--data", str(lm_data),
                 "--out", str(out), "--max-steps", "2", "--no-progress"]) == 2
    assert "does not fit this model: budget 1 is smaller than one module" in capsys.readouterr().err
    assert not out.exists()


def test_python_arguments_of_the_wrong_type_are_refused_before_anything_is_loaded(llama_dir, lm_data, tmp_path):
    """From Python, a string, None or a bool where a number goes used to end in a TypeError inside transformers
    (or a comparison); each is now a DataError naming the argument."""
    from alphalora.allocation import PlanFormatError

    for kwargs, message in [(dict(epochs="2"), "epochs must be a finite number, got '2'"),
                            (dict(epochs=float("inf")), "epochs must be a finite number"),
                            (dict(seed=None), r"seed must be an integer from 0 to 2\*\*32 - 1, got None"),
                            (dict(seed=-1), "seed must be an integer"), (dict(learning_rate="3e-4"), "learning_rate"),
                            (dict(warmup_ratio=None), "warmup_ratio must be a finite number"),
                            (dict(weight_decay="0"), "weight_decay must be"), (dict(max_length=True), "max_length"),
                            (dict(bf16="yes"), "bf16 must be True or False"), (dict(resume=1), "resume must be"),
                            (dict(eval_data=3), "eval_data must be a path"), (dict(callbacks="x"), "callbacks must")]:
        with pytest.raises(DataError, match=message):
            train(llama_dir, _plan(), lm_data, tmp_path / "a", **kwargs)
    with pytest.raises(DataError, match="out_dir must be a path"):
        train(llama_dir, _plan(), lm_data, None)
    with pytest.raises(PlanFormatError, match="plan must be a Plan, a dict .* or the path of a plan JSON, got int"):
        train(llama_dir, 42, lm_data, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_plan_given_as_a_dict_trains_like_the_plan(llama_dir, lm_data, tmp_path):
    plan = _plan(experts=(2, 2), targets=("q", "v"))
    runs = [train(llama_dir, given, lm_data, tmp_path / name, max_steps=2, batch_size=8, logging_steps=1,
                  save_steps=100, progress=False) for name, given in (("plan", plan), ("dict", plan.to_dict()))]
    losses = [[h["loss"] for h in run.log_history if "loss" in h] for run in runs]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    saved = [json.loads((run.adapter_dir / "alphalora_config.json").read_text())["plan"] for run in runs]
    assert saved[0] == saved[1] == plan.to_dict()


def _broken_model(tmp_path, name, damage):
    folder = save_tiny("llama", tmp_path / name)
    damage(folder)
    return folder


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _remove_tokenizer(folder):
    for path in folder.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            path.unlink()


def test_a_broken_model_folder_is_a_clear_error_in_train_and_hetero_allocate(lm_data, tmp_path, capsys):
    """A truncated safetensors file and missing tokenizer files used to end in safetensors' and transformers'
    tracebacks, in `train` and in `allocate --method hetero` (which loads through the same function)."""
    from alphalora.cli import main

    truncated = _broken_model(tmp_path, "truncated", _truncate_weights)
    no_tokenizer = _broken_model(tmp_path, "no-tokenizer", _remove_tokenizer)
    cases = [(truncated, r"truncated/model.safetensors is truncated or corrupt \(.*\); download or copy the model "
                         "again"),
             (no_tokenizer, r"could not load a tokenizer from .*no-tokenizer: it has no tokenizer.json or "
                            r"tokenizer_config.json; copy the model's tokenizer files \(tokenizer.json")]
    _plan().save(tmp_path / "plan.json")
    for folder, message in cases:
        with pytest.raises(DataError, match=message):
            train(folder, _plan(), lm_data, tmp_path / "a", max_steps=1, progress=False)
        assert main(["train", "--model", str(folder), "--plan", str(tmp_path / "plan.json"), "--data", str(lm_data),
                     "--out", str(tmp_path / "a"), "--max-steps", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(message, err), err
        assert main(["allocate", "--method", "hetero", "--model", str(folder), "--data", str(lm_data), "--budget",
                     "1000", "--proxy-batches", "1", "--proxy-batch-size", "2", "--out", str(tmp_path / "p.json"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(message, err), err
    assert not (tmp_path / "a").exists() and not (tmp_path / "p.json").exists()


def test_a_plan_made_for_another_model_trains_with_one_warning(llama_dir, lm_data, tmp_path, caplog):
    """A Llama plan on a Qwen2 of the same depth and roles fits, so it trains, but says so; the same model under
    another name (a Hub id's last part, a Hub cache snapshot) or with the config fingerprint the plan records is
    not warned about."""
    import dataclasses

    from alphalora.adapters.io import base_fingerprint
    from alphalora.training.model import same_model_name, warn_if_plan_for_another_model
    from tests.tiny_models import build

    qwen = save_tiny("qwen2", tmp_path / "qwen2-tiny", initializer_range=0.5)
    llama_plan = dataclasses.replace(_plan(), base_model=str(llama_dir))
    with caplog.at_level("WARNING", logger="alphalora.training"):
        result = train(qwen, llama_plan, lm_data, tmp_path / "a", max_steps=1, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("alphalora")]
    assert warning.startswith(f"plan made for another model: the plan names {str(llama_dir)!r}, this run trains "
                              f"{str(qwen)!r}") and "re-allocate on this one" in warning and "\n" not in warning

    model = build("qwen2")
    caplog.clear()
    with caplog.at_level("WARNING", logger="alphalora.training"):
        assert not warn_if_plan_for_another_model(dataclasses.replace(llama_plan, base_model=str(qwen)), qwen, model)
        assert not warn_if_plan_for_another_model(dataclasses.replace(llama_plan, base_model=""), qwen, model)
        same_config = dataclasses.replace(llama_plan, source={"base_fingerprint": base_fingerprint(model)})
        assert not warn_if_plan_for_another_model(same_config, qwen, model)  # the fingerprint decides
        other_config = dataclasses.replace(llama_plan, base_model=str(qwen),
                                           source={"base_fingerprint": base_fingerprint(build("llama"))})
        assert warn_if_plan_for_another_model(other_config, qwen, model)
    assert len(caplog.records) == 1
    caplog.clear()
    deeper = dataclasses.replace(llama_plan, experts_per_layer=[1, 1, 1], top_k_per_layer=[1, 1, 1])
    with caplog.at_level("WARNING", logger="alphalora.training"), pytest.raises(AdapterError, match="3 layers"):
        train(qwen, deeper, lm_data, tmp_path / "b", max_steps=1, progress=False)
    assert not caplog.records  # no "it trains because it fits" before the error saying it does not
    assert same_model_name("Qwen/Qwen2-0.5B", "/models/Qwen2-0.5B")
    assert same_model_name("Qwen/Qwen2-0.5B", "/cache/hub/models--Qwen--Qwen2-0.5B/snapshots/0123abc")
    assert not same_model_name("meta-llama/Llama-3.2-1B", "Qwen/Qwen2-0.5B")
    assert not same_model_name(str(llama_dir), str(qwen))
