"""train() from a notebook: numpy scalars (a grid of learning rates, np.int64 step counts) are numbers as any."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alphalora.allocation import Plan
from alphalora.training import DataError, train
from tests.tiny_models import save_tiny


def _plan() -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=[2, 1], top_k_per_layer=[2, 1],
                target_modules=["q", "v"], rank=4, lora_alpha=8.0, lora_dropout=0.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), initializer_range=0.5)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    rows = [{"prompt": "the cat sat on", "completion": "the mat"}, {"text": "red green blue yellow"}] * 8
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_numpy_scalars_train_exactly_as_the_python_numbers_they_hold(llama_dir, lm_data, tmp_path):
    """np.int64 step counts, np.float32 rates and np.bool_ flags used to be refused ("max_steps must be a positive
    number of steps ... got np.int64(3)"); they now train the run the equal Python values train."""
    common = dict(batch_size=8, logging_steps=1, save_steps=100, progress=False)
    plain = train(llama_dir, _plan(), lm_data, tmp_path / "plain", max_steps=3, learning_rate=float(np.float32(1e-2)),
                  warmup_ratio=0.25, seed=3, truncate=False, **common)
    numpy = train(llama_dir, _plan(), lm_data, tmp_path / "numpy", max_steps=np.int64(3),
                  learning_rate=np.float32(1e-2), warmup_ratio=np.float32(0.25), seed=np.int64(3),
                  truncate=np.False_, batch_size=np.int32(8), logging_steps=np.int64(1), save_steps=np.int64(100),
                  epochs=np.float32(1.0), weight_decay=np.float64(0.0), gradient_accumulation_steps=np.uint8(1),
                  max_length=np.int64(64), progress=np.False_)
    losses = [[h["loss"] for h in run.log_history if "loss" in h] for run in (plain, numpy)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    rates = [[h["learning_rate"] for h in run.log_history if "learning_rate" in h] for run in (plain, numpy)]
    assert rates[0] == rates[1]
    weights = [load_file(str(run.adapter_dir / "adapter_model.safetensors")) for run in (plain, numpy)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_numpy_values_are_still_checked(llama_dir, lm_data, tmp_path):
    for kwargs, message in [(dict(max_steps=np.int64(0)), "max_steps must be a positive number of steps"),
                            (dict(learning_rate=np.float32("nan")), "learning_rate must be a finite number"),
                            (dict(batch_size=np.float32(8)), "batch_size must be a positive integer"),
                            (dict(seed=np.int64(-1)), "seed must be an integer"),
                            (dict(bf16=np.int64(1)), "bf16 must be True or False"),
                            (dict(max_steps=np.array([3])), "max_steps must be")]:
        with pytest.raises(DataError, match=message):
            train(llama_dir, _plan(), lm_data, tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()
