"""One run per output folder: training refuses a folder holding an earlier run unless resuming, and resuming
continues only the run the checkpoint recorded."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from transformers import TrainerCallback

from alphalora.allocation import Plan
from alphalora.training import CheckpointError, train
from alphalora.training.runs import RUN_RECORD_NAME
from tests.tiny_models import save_tiny
from tests.training.callbacks import StopAt

ROWS = [{"prompt": "the cat sat on", "completion": "the mat"}, {"text": "red green blue yellow"},
        {"prompt": "one two", "completion": "three four"}, {"text": "a bird sang in the tree"}] * 2


class Record(TrainerCallback):
    def __init__(self):
        self.executed = []

    def on_step_end(self, args, state, control, **kwargs):
        self.executed.append(state.global_step)


def _plan(model_dir, rank=2) -> Plan:
    return Plan(method="uniform", base_model=str(model_dir), experts_per_layer=[2, 2], top_k_per_layer=[1, 1],
                target_modules=["q", "v"], rank=rank, lora_alpha=4.0, lora_dropout=0.0)


@pytest.fixture
def setup(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "model", initializer_range=0.5)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return model_dir, data


def _train(model_dir, data, out, *, plan=None, max_steps=4, stop_at=None, learning_rate=1e-2, lr_scheduler="constant",
           seed=1, **kwargs):
    callbacks = kwargs.pop("callbacks", [])
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    return train(model_dir, plan or _plan(model_dir), data, out, max_steps=max_steps, save_steps=2, batch_size=4,
                 logging_steps=1, learning_rate=learning_rate, lr_scheduler=lr_scheduler, seed=seed, progress=False,
                 callbacks=callbacks, **kwargs)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_earlier_runs_folder_is_refused_without_resume_and_left_as_it_was(setup, tmp_path, capsys):
    from alphalora.cli import main

    model_dir, data = setup
    out = tmp_path / "run"
    _train(model_dir, data, out, max_steps=2)
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=r"run already holds an adapter \(alphalora_config.json, "
                       r"adapter_model.safetensors\) and checkpoints \(checkpoint-2\) of an earlier run; pass "
                       r"--resume .* to continue that run, or choose another --out \(or delete .*run\)"):
        _train(model_dir, data, out, learning_rate=1e-3)
    for name in ("alphalora_config.json", "adapter_model.safetensors"):  # a run killed before it finished
        (out / name).unlink()
    with pytest.raises(CheckpointError, match=r"run already holds checkpoints \(checkpoint-2\) of an earlier run"):
        _train(model_dir, data, out, learning_rate=1e-3)
    plan = tmp_path / "plan.json"
    _plan(model_dir).save(plan)
    code = main(["train", "--model", str(model_dir), "--plan", str(plan), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "of an earlier run; pass --resume" in err and "Traceback" not in err
    finished = {Path("alphalora_config.json"), Path("adapter_model.safetensors")}
    assert _snapshot(out) == {k: v for k, v in before.items() if k not in finished}
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="a_file is a file; pass a folder"):
        _train(model_dir, data, tmp_path / "a_file")


def test_resume_refuses_a_checkpoint_of_a_run_with_other_settings(setup, tmp_path):
    """The audit's case: a folder whose checkpoints belong to another run. Each differing setting is named; the
    folder is left as it was; the same settings resume."""
    model_dir, data = setup
    out = tmp_path / "run"
    _train(model_dir, data, out, stop_at=2)
    before = _snapshot(out)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("\n".join(json.dumps(r) for r in ROWS[:4]))
    for changes, named in [
        (dict(learning_rate=1e-3), r"learning_rate: 0.01 -> 0.001"),
        (dict(max_steps=6, lr_scheduler="linear"), r"lr_scheduler: 'constant' -> 'linear'; max_steps: None -> 6"),
        (dict(plan=_plan(model_dir, rank=4)), r"plan.rank: 2 -> 4"),
        (dict(data=other_data), r"train_examples_sha256: '[0-9a-f]+' -> '[0-9a-f]+'"),
        (dict(gradient_accumulation_steps=2, seed=2), r"gradient_accumulation_steps: 1 -> 2; seed: 1 -> 2"),
    ]:
        arguments = {"data": data, **changes}
        with pytest.raises(CheckpointError, match=f"checkpoint-2 belongs to a run with other settings \\(checkpoint "
                                                  f"-> this run: {named}\\); resume with that run's settings"):
            _train(model_dir, arguments.pop("data"), out, resume=True, **arguments)
    assert _snapshot(out) == before
    record = Record()
    moved = tmp_path / "moved-model"  # the same base model at another path: its config's fingerprint decides
    shutil.copytree(model_dir, moved)
    remade = dataclasses.replace(_plan(model_dir), source={"proxy_seconds": 9.9})  # made again: other provenance
    _train(moved, data, out, plan=remade, resume=True, callbacks=[record])
    assert record.executed == [3, 4]


def test_with_a_constant_rate_a_resumed_run_may_go_further(setup, tmp_path):
    """The step count only says where a constant-rate run stops: resuming with more steps continues it onto the
    curve of a run that was given those steps from the start."""
    model_dir, data = setup
    full = _train(model_dir, data, tmp_path / "full", max_steps=4)
    _train(model_dir, data, tmp_path / "run", max_steps=2)
    resumed = _train(model_dir, data, tmp_path / "run", max_steps=4, resume=True)
    losses = lambda result: {h["step"]: h["loss"] for h in result.log_history if "loss" in h}  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-6)


def test_checkpoints_from_before_run_records_still_resume(setup, tmp_path, capsys):
    model_dir, data = setup
    full = _train(model_dir, data, tmp_path / "full")
    _train(model_dir, data, tmp_path / "run", stop_at=2)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    (checkpoint / RUN_RECORD_NAME).unlink()
    capsys.readouterr()
    record = Record()
    resumed = _train(model_dir, data, tmp_path / "run", resume=True, callbacks=[record])
    assert "checkpoint-2 does not record its run's settings" in capsys.readouterr().out
    assert record.executed == [3, 4]
    losses = lambda result: {h["step"]: h["loss"] for h in result.log_history if "loss" in h}  # noqa: E731
    assert {s: v for s, v in losses(resumed).items() if s > 2} == pytest.approx(
        {s: v for s, v in losses(full).items() if s > 2}, rel=1e-6)


def test_a_folder_whose_checkpoints_are_all_incomplete_is_not_sent_round_in_circles(setup, tmp_path):
    """Neither message may point at the other way: without --resume the folder is refused (not "pass --resume"),
    with --resume there is nothing to resume (not "train without --resume"); both say to delete or move on."""
    model_dir, data = setup
    out = tmp_path / "run"
    cut = out / "checkpoints" / "checkpoint-2"
    cut.mkdir(parents=True)
    (cut / "adapter_model.safetensors").write_bytes(b"cut short")
    with pytest.raises(CheckpointError) as fresh:
        _train(model_dir, data, out)
    assert "none of its checkpoints is complete enough to resume" in str(fresh.value)
    assert "--resume" not in str(fresh.value) and f"delete {out}" in str(fresh.value)
    with pytest.raises(CheckpointError) as resumed:
        _train(model_dir, data, out, resume=True)
    assert "without --resume" not in str(resumed.value) and f"delete {out / 'checkpoints'}" in str(resumed.value)
