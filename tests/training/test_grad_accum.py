"""Gradient accumulation: batch 8 in one step and batch 4 accumulated over two are the same step, task loss
and load-balancing loss alike, for a causal LM and a sequence classifier."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback

from alphalora.adapters import adapter_parameters
from alphalora.allocation import Plan, RouterSettings
from alphalora.training import MoELoRATrainer, train
from tests.tiny_models import save_tiny

# Two different rows, alternating: in order, every micro-batch of 4 holds the same rows as the batch of 8, so
# their routing statistics (the aux loss) and padding are the same, and the accumulated step must equal the
# single one exactly (with dropout 0).
ROWS = {
    "causal-lm": [{"prompt": "the cat sat on", "completion": "the mat"}, {"text": "red green blue yellow"}],
    "classification": [{"text": "the cat sat on the mat", "label": "animal"},
                       {"text": "red green blue", "label": "colour"}],
}


class _Gradients(TrainerCallback):
    """The adapter's gradients as the optimizer is about to step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in adapter_parameters(model).items() if p.grad is not None}


def _step(model_dir, data, out, task, batch_size, accumulation):
    record = _Gradients()
    result = train(model_dir, _plan(task), data, out, task=task, max_steps=1, learning_rate=0.0, batch_size=batch_size,
                   gradient_accumulation_steps=accumulation, logging_steps=1, save_steps=100, progress=False,
                   callbacks=[record])
    logged = next(h for h in result.log_history if "loss" in h)
    return record.grads, logged


def _plan(task) -> Plan:
    targets = ["q", "v", "up"] if task == "classification" else ["q", "v", "gate"]
    return Plan(method="uniform", base_model="tiny", experts_per_layer=[4, 3], top_k_per_layer=[2, 2],
                target_modules=targets, rank=4, lora_alpha=8.0, lora_dropout=0.0,
                router=RouterSettings(aux_loss_coef=1.0))


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_batch_8_equals_batch_4_accumulated_twice(task, tmp_path, monkeypatch):
    in_order = lambda self, *args, **kwargs: SequentialSampler(self.train_dataset)  # noqa: E731
    monkeypatch.setattr(MoELoRATrainer, "_get_train_sampler", in_order)
    if task == "classification":
        model_dir = save_tiny("bert", tmp_path / "model", initializer_range=0.5, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    else:
        model_dir = save_tiny("llama", tmp_path / "model", initializer_range=0.5)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS[task] * 4) + "\n")

    whole_grads, whole = _step(model_dir, data, tmp_path / "whole", task, 8, 1)
    split_grads, split = _step(model_dir, data, tmp_path / "split", task, 4, 2)

    assert whole["aux_loss"] > 1.0  # the load-balancing loss is in play (1.0 would be perfect balance)
    for key in ("loss", "aux_loss", "grad_norm"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5), (key, whole, split)
    assert whole_grads.keys() == split_grads.keys() and len(whole_grads) > 0
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("accepts_loss_kwargs", [False, True])
@pytest.mark.parametrize("num_items_in_batch", [None, 29])
@pytest.mark.parametrize("compute_loss_func", [None, len])
def test_the_scaling_rule_holds_on_a_trainer_without_loss_is_scaled_for_ga(accepts_loss_kwargs, num_items_in_batch,
                                                                           compute_loss_func):
    """transformers 5.17 (the GPU machine's) has no `loss_is_scaled_for_ga`; its training_step divides the loss by
    the accumulation steps when `(not model_accepts_loss_kwargs or num_items_in_batch is None) and compute_loss_func
    is None`, so the loss is already scaled exactly when that does not hold."""
    older = types.SimpleNamespace(model_accepts_loss_kwargs=accepts_loss_kwargs, compute_loss_func=compute_loss_func)
    divided_by_training_step = (not accepts_loss_kwargs or num_items_in_batch is None) and compute_loss_func is None
    assert MoELoRATrainer._task_loss_scaled_for_ga(older, num_items_in_batch) is (not divided_by_training_step)
    stated = types.SimpleNamespace(**vars(older), loss_is_scaled_for_ga=divided_by_training_step)
    assert MoELoRATrainer._task_loss_scaled_for_ga(stated, num_items_in_batch) is divided_by_training_step
