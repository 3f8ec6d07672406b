"""A training run killed midway resumes from its last checkpoint onto the same loss curve."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.tiny_models import save_tiny

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
