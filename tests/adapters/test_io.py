"""Saving and loading adapters: identical logits, and every bad folder refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch

from alphalora.adapters import AdapterError
from alphalora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from alphalora.allocation import Plan
from tests.tiny_models import build, with_random_adapter


def _trained(family="llama"):
    model = build(family)
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[3, 2], top_k_per_layer=[2, 1],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, lora_dropout=0.0)
    return with_random_adapter(model, plan, seed=9)


def test_loaded_adapter_gives_bit_identical_logits(tmp_path):
    model = _trained()
    ids = torch.randint(0, 128, (2, 11))
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    fresh = build("llama").eval()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["plan"]["experts_per_layer"] == [3, 2] and config["format_version"] == 1


def test_mismatched_base_model_is_refused(tmp_path):
    save_adapter(_trained(), tmp_path / "a")
    with pytest.raises(AdapterError, match="architecture differs"):
        load_adapter(build("mistral"), tmp_path / "a")


def test_missing_corrupt_and_pickled_files_are_refused(tmp_path):
    folder = save_adapter(_trained(), tmp_path / "a")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(build("llama"), tmp_path / "nope")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(build("llama"), folder)
    (folder / WEIGHTS_NAME).unlink()
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickled weights"):
        load_adapter(build("llama"), folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match="not an alphalora adapter"):
        load_adapter(build("llama"), folder)


def test_config_problems_are_refused(tmp_path):
    folder = save_adapter(_trained(), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text("{oops")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(build("llama"), folder)
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(AdapterError, match="format_version"):
        load_adapter(build("llama"), folder)
    bad_plan = {**config, "plan": {**config["plan"], "experts_per_layer": [0, 2]}}
    (folder / CONFIG_NAME).write_text(json.dumps(bad_plan))
    with pytest.raises(AdapterError, match="experts_per_layer"):
        load_adapter(build("llama"), folder)


def test_weights_that_do_not_match_the_plan_are_refused(tmp_path):
    folder = save_adapter(_trained(), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["plan"]["target_modules"] = ["q", "v", "down", "o"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="does not match its plan"):
        load_adapter(build("llama"), folder)
