"""A training step's loss is computed without reading a value back to the host: on a GPU each such read makes
the host wait for the device to finish the work queued so far (here: the whole forward) before it can queue the
next kernel (the backward's), so the GPU idles while the host catches up."""

from __future__ import annotations

import json
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alphalora
from alphalora.allocation import Plan, RouterSettings
from alphalora.training import MoELoRATrainer, train
from tests.tiny_models import save_tiny

_TORCH = os.path.dirname(torch.__file__)
_PACKAGE = os.path.dirname(alphalora.__file__)


class _HostReads(TorchDispatchMode):
    """Records each read of a tensor's value by Python (`float(t)`, `t.item()`, `bool(t)`) that code of this
    package asked for (not transformers' own), as `file:line`."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # the innermost frame outside torch and this file: the code that asked for the value
            frames = [f for f in traceback.extract_stack() if f.filename != __file__ and _TORCH not in f.filename]
            if frames and _PACKAGE in frames[-1].filename:
                self.reads.append(f"{frames[-1].filename}:{frames[-1].lineno}")
        return func(*args, **(kwargs or {}))


def test_the_loss_with_its_load_balancing_term_reads_nothing_back(tmp_path, monkeypatch):
    """Oracle: the aux loss is still logged (read when the log is written, once per logging interval)."""
    model_dir = save_tiny("llama", tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"the cat {i}", "completion": "sat"}) for i in range(8)) + "\n")
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[4, 3], top_k_per_layer=[2, 2],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, router=RouterSettings(aux_loss_coef=0.01))
    watcher = _HostReads()
    compute_loss = MoELoRATrainer.compute_loss

    def watched(self, *args, **kwargs):
        with watcher:
            return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(MoELoRATrainer, "compute_loss", watched)
    result = train(model_dir, plan, data, tmp_path / "out", max_steps=2, batch_size=4, gradient_accumulation_steps=2,
                   logging_steps=1, save_steps=100, progress=False)
    assert watcher.reads == []
    assert [h["step"] for h in result.log_history if "aux_loss" in h] == [1, 2]
