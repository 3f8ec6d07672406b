"""`alphalora train` under torchrun: two CPU processes (gloo) train what one process trains on the
same global batch, write the adapter once, and handle adapters that get no gradient."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from alphalora.allocation import Plan
from tests.tiny_models import save_tiny

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny("llama", root / "model", initializer_range=0.5)
    rows = [{"prompt": "the cat sat on", "completion": "the mat"},
            {"prompt": "the dog sat on", "completion": "the log"},
            {"instruction": "count", "input": "one two", "output": "three four five"}] * 8
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, model, data


def _plan(root, name, **fields):
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[4, 2], top_k_per_layer=[2, 2],
                target_modules=TARGETS, rank=4, lora_alpha=8.0, lora_dropout=0.0, **fields)
    path = root / f"{name}.json"
    plan.save(path)
    return path


def _train(command_prefix, model, plan, data, out, batch_size, *extra):
    result = subprocess.run(
        [*command_prefix, "-m", "alphalora.cli", "train", "--model", str(model), "--plan", str(plan),
         "--data", str(data), "--out", str(out), "--max-steps", "5", "--batch-size", str(batch_size),
         "--logging-steps", "1", "--lr", "1e-2", "--no-progress", *extra],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_processes_train_what_one_trains_on_the_same_global_batch(setup):
    """Data parallel over 2 x 4 examples against one process over 8: the same examples each step
    (Trainer shards one shuffled order), gradients averaged over the processes, so the same adapter."""
    root, model, data = setup
    plan = _plan(root, "plan")
    stdout = _train(TORCHRUN, model, plan, data, root / "ddp", 4)
    _train([sys.executable], model, plan, data, root / "single", 8)
    assert stdout.count("adapter: ") == 1  # one process reports (and writes)
    ddp, single = (load_file(root / name / "adapter_model.safetensors") for name in ("ddp", "single"))
    assert ddp.keys() == single.keys()
    for name in single:
        assert (ddp[name] - single[name]).abs().max() <= 1e-5 * max(1.0, single[name].abs().max()), name
    logs = [json.loads((root / name / "trainer_log.json").read_text())["log_history"] for name in ("ddp", "single")]
    assert [h["loss"] for h in logs[0] if "loss" in h] == pytest.approx([h["loss"] for h in logs[1] if "loss" in h],
                                                                        rel=1e-5)


def test_switched_off_modules_and_the_aux_loss_train_under_two_processes(setup):
    """A module HeteroLoRA switched off gets no gradient: data parallel must be told to look for such
    weights, or its second step fails. The load-balancing loss and checkpointed blocks ride along."""
    root, model, data = setup
    from alphalora.allocation.plan import RouterSettings

    plan = _plan(root, "idle", disabled_modules=["model.layers.0.self_attn.q_proj"],
                 router=RouterSettings(aux_loss_coef=0.01))
    stdout = _train(TORCHRUN, model, plan, data, root / "idle", 4, "--gradient-checkpointing")
    assert "training loss" in stdout
    weights = load_file(root / "idle" / "adapter_model.safetensors")
    assert not any("layers.0.self_attn.q_proj" in name for name in weights)  # switched off: not saved
    assert any("layers.1.self_attn.q_proj" in name for name in weights)
