"""A training run killed midway resumes from its last checkpoint onto the same loss curve."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from transformers import TrainerCallback

from tests.tiny_models import save_tiny
from tests.training.callbacks import StopAt

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from transformers import TrainerCallback
    from alphalora.allocation import Plan, RouterSettings
    from alphalora.training import train

    model_dir, data, out, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"

    executed = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            executed.append(state.global_step)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os._exit(137)  # as abrupt as SIGKILL: no cleanup, no final save

    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[4, 2], top_k_per_layer=[2, 2], rank=4,
                lora_alpha=8.0, lora_dropout=0.1, router=RouterSettings(aux_loss_coef=0.01))
    result = train(model_dir, plan, data, out, max_steps=16, learning_rate=1e-2, batch_size=4, logging_steps=1,
                   save_steps=5, seed=3, resume=resume, progress=False, callbacks=[Record(), Kill()])
    losses = {h["step"]: h["loss"] for h in result.log_history if "loss" in h}
    print(json.dumps({"losses": losses, "executed": executed}))
    """
)


def _run(*args):
    return subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_the_uninterrupted_loss_curve(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "model", initializer_range=0.5)
    rows = [{"prompt": "the cat sat on", "completion": "the mat"}, {"prompt": "one two", "completion": "three four"},
            {"text": "red green blue yellow"}, {"text": "a bird sang in the tree"}] * 6
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))

    full = _run(model_dir, data, tmp_path / "full", 0, 0)
    assert full.returncode == 0, full.stderr[-2000:]
    expected = json.loads(full.stdout.strip().splitlines()[-1])["losses"]
    assert len(expected) == 16

    killed = _run(model_dir, data, tmp_path / "run", 12, 0)
    assert killed.returncode == 137
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-10").is_dir()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()

    resumed = _run(model_dir, data, tmp_path / "run", 0, 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert got["executed"] == list(range(11, 17))  # continued after checkpoint-10, not from the start
    assert sorted(got["losses"], key=int) == sorted(expected, key=int)
    for step, loss in got["losses"].items():
        assert abs(loss - expected[step]) < 1e-6, (step, loss, expected[step])


def _partial_run_setup(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "model", initializer_range=0.5)
    rows = [{"prompt": "the cat sat on", "completion": "the mat"}, {"text": "red green blue yellow"},
            {"prompt": "one two", "completion": "three four"}, {"text": "a bird sang in the tree"}] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return model_dir, data


def _train_in_process(model_dir, data, out, max_steps, resume=False, callbacks=None):
    from alphalora.allocation import Plan
    from alphalora.training import train

    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[2, 2], top_k_per_layer=[2, 2],
                target_modules=["q", "v"], rank=2, lora_alpha=4.0, lora_dropout=0.0)
    return train(model_dir, plan, data, out, max_steps=max_steps, save_steps=2, batch_size=4, logging_steps=1,
                 learning_rate=1e-2, lr_scheduler="constant", seed=1, resume=resume, progress=False,
                 callbacks=callbacks)


def test_a_checkpoint_cut_short_while_saving_is_skipped_for_the_newest_complete_one(tmp_path, capsys):
    """A kill while Trainer writes checkpoint-4 (adapter written, optimizer, scheduler, RNG and trainer state not
    yet): --resume goes on from checkpoint-2, says so, and reproduces the uninterrupted run's losses."""
    model_dir, data = _partial_run_setup(tmp_path)
    uninterrupted = _train_in_process(model_dir, data, tmp_path / "full", 6)
    expected = {h["step"]: h["loss"] for h in uninterrupted.log_history if "loss" in h}

    _train_in_process(model_dir, data, tmp_path / "run", 4)
    newest = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (newest / name).unlink()
    capsys.readouterr()

    executed = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            executed.append(state.global_step)

    resumed = _train_in_process(model_dir, data, tmp_path / "run", 6, resume=True, callbacks=[Record()])
    printed = capsys.readouterr().out
    assert "checkpoint-4 is incomplete (no optimizer.pt, scheduler.pt, trainer_state.json, rng_state.pth" in printed
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'checkpoint-2'}" in printed
    assert executed == [3, 4, 5, 6]
    got = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h}
    for step in (3, 4, 5, 6):
        assert abs(got[step] - expected[step]) < 1e-6, (step, got[step], expected[step])


def test_resume_with_no_complete_checkpoint_is_a_clear_error(tmp_path, capsys):
    from alphalora.cli import main
    from alphalora.training import CheckpointError

    model_dir, data = _partial_run_setup(tmp_path)
    partial = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"")
    (partial / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from .* checkpoint-2 lack"):
        _train_in_process(model_dir, data, tmp_path / "run", 4, resume=True)
    printed = capsys.readouterr().out
    assert "checkpoint-2 is incomplete" in printed and "a readable trainer_state.json" in printed
    plan = tmp_path / "plan.json"
    assert main(["allocate", "--method", "uniform", "--num-layers", "2", "--budget", "4", "--target-modules", "q",
                 "--out", str(plan)]) == 0
    code = main(["train", "--model", str(model_dir), "--plan", str(plan), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "no complete checkpoint to resume from" in err and "Traceback" not in err


def test_the_first_aux_loss_logged_after_resuming_averages_the_micro_batches_since_the_resume(tmp_path):
    """Oracle: an uninterrupted run logging every step gives each step's aux loss. Resumed from checkpoint-3 and
    logging every 2 steps (over 2 micro-batches each), the run logs at step 4 the aux loss of step 4 alone (it
    used to be halved: divided by the 2 x 2 micro-batches of a whole logging interval), and at step 6 the mean
    of steps 5 and 6."""
    from alphalora.allocation import Plan, RouterSettings
    from alphalora.training import train

    model_dir, data = _partial_run_setup(tmp_path)
    plan = Plan(method="uniform", base_model=str(model_dir), experts_per_layer=[4, 3], top_k_per_layer=[2, 2],
                target_modules=["q", "v"], rank=2, lora_alpha=4.0, lora_dropout=0.0,
                router=RouterSettings(aux_loss_coef=0.5))

    def run(out, logging_steps, resume=False, callbacks=None):
        return train(model_dir, plan, data, out, max_steps=6, save_steps=3, batch_size=2, gradient_accumulation_steps=2,
                     logging_steps=logging_steps, learning_rate=1e-2, lr_scheduler="constant", seed=1, resume=resume,
                     progress=False, callbacks=callbacks)

    every_step = {h["step"]: h["aux_loss"] for h in run(tmp_path / "full", 1).log_history if "aux_loss" in h}
    run(tmp_path / "run", 2, callbacks=[StopAt(3)])
    resumed = {h["step"]: h["aux_loss"] for h in run(tmp_path / "run", 2, resume=True).log_history if "aux_loss" in h}
    assert resumed[4] == pytest.approx(every_step[4], abs=2e-6)
    assert resumed[6] == pytest.approx((every_step[5] + every_step[6]) / 2, abs=2e-6)
    assert every_step[4] > 1.0  # the routers are unbalanced enough for a wrong divisor to show


def test_a_resumed_dynamic_run_keeps_its_earlier_reallocation_rounds(tmp_path):
    """Dynamic HeteroLoRA's rounds before the checkpoint come back with it: trainer_log.json and the result list
    the same rounds (steps and selections) as an uninterrupted run's (a resumed run used to list only its own)."""
    from alphalora.allocation import Plan
    from alphalora.training import train

    model_dir, data = _partial_run_setup(tmp_path)
    plan = Plan(method="hetero", base_model=str(model_dir), experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v"], rank=4,
                reallocation={"every": 2, "budget": 500, "batches": 2, "batch_size": 4})

    def run(out, resume=False, callbacks=None):
        return train(model_dir, plan, data, out, max_steps=6, save_steps=3, batch_size=4, logging_steps=1,
                     learning_rate=1e-2, seed=1, resume=resume, progress=False, callbacks=callbacks)

    full = run(tmp_path / "full")
    run(tmp_path / "run", callbacks=[StopAt(3)])
    resumed = run(tmp_path / "run", resume=True)
    assert [r["step"] for r in full.reallocations] == [0, 2, 4]
    chosen = lambda rounds: [(r["step"], r["enabled"]) for r in rounds]  # noqa: E731
    assert chosen(resumed.reallocations) == chosen(full.reallocations)
    logged = json.loads((tmp_path / "run" / "trainer_log.json").read_text())["reallocations"]
    assert chosen(logged) == chosen(full.reallocations)
