"""Saving and loading adapters: identical logits, and every bad folder refused with a reason."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from alphalora.adapters import AdapterError
from alphalora.adapters.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _load_weights,
    base_fingerprint,
    load_adapter,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from alphalora.allocation import Plan
from tests.tiny_models import build, with_random_adapter


def _plan() -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=[3, 2], top_k_per_layer=[2, 1],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, lora_dropout=0.0)


def _trained(family="llama"):
    return with_random_adapter(build(family), _plan(), seed=9)


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
    with pytest.raises(AdapterError, match="is a file; pass the adapter's folder"):
        load_adapter(build("llama"), folder / WEIGHTS_NAME)
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


def _flip_a_bit_of_tensor_data(path):
    """Flips one bit past the safetensors header: the file still parses, one value changes."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 6] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_weights_is_refused_by_every_loader(tmp_path):
    folder = save_adapter(_trained(), tmp_path / "a")
    weights = folder / WEIGHTS_NAME
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    saved = {name: t.clone() for name, t in load_file(str(weights)).items()}  # (load_file maps the file)
    _flip_a_bit_of_tensor_data(weights)
    flipped = load_file(str(weights))  # safetensors itself reads it without complaint, with a changed value
    assert any(not torch.equal(saved[name], flipped[name]) for name in saved)
    message = f"{weights} is corrupt or truncated: its sha256 differs .* re-export or re-train"
    with pytest.raises(AdapterError, match=message):
        load_adapter(build("llama"), folder)
    with pytest.raises(AdapterError, match=message):
        load_adapter_weights(_trained(), folder)  # resuming a checkpoint
    with pytest.raises(AdapterError, match=message):
        _load_weights(folder, read_adapter_config(folder))  # what the engine's adapter loader and the PEFT export call


def test_configs_saved_before_the_weights_hash_load_unchecked(tmp_path):
    model = _trained()
    ids = torch.randint(0, 128, (2, 7))
    expected = model(input_ids=ids).logits
    folder = save_adapter(model, tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["weights_sha256"], config["base_config"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    fresh = build("llama").eval()
    load_adapter(fresh, folder)
    assert torch.equal(fresh(input_ids=ids).logits, expected)


def test_missing_or_mistyped_config_fields_are_named(tmp_path):
    folder = save_adapter(_trained(), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    plan = config["plan"]
    cases = {
        "lacks base_fingerprint": {k: v for k, v in config.items() if k != "base_fingerprint"},
        "lacks module_names": {k: v for k, v in config.items() if k != "module_names"},
        "weights_sha256 must be a str": {**config, "weights_sha256": 12},
        'router must be an object such as {"type": "shared"': {**config, "plan": {**plan, "router": "shared"}},
        "router has unknown fields \\['kind'\\]": {**config, "plan": {**plan, "router": {"kind": "shared"}}},
    }
    for message, broken in cases.items():
        (folder / CONFIG_NAME).write_text(json.dumps(broken))
        with pytest.raises(AdapterError, match=message):
            load_adapter(build("llama"), folder)


def test_the_fingerprint_sees_nested_config_values_and_the_refusal_names_them(tmp_path):
    """transformers 5 keeps rope_theta inside the dict rope_parameters: a base with rope_theta 1e6 must not pass
    for one with 1e4 (the two configs differ in that value alone)."""
    trained_on, other = build("llama", rope_theta=1e4), build("llama", rope_theta=1e6)
    ours, theirs = trained_on.config.to_dict(), other.config.to_dict()
    assert {k for k in ours if ours[k] != theirs[k]} == {"rope_parameters"}
    assert (ours["rope_parameters"]["rope_theta"], theirs["rope_parameters"]["rope_theta"]) == (1e4, 1e6)
    folder = save_adapter(with_random_adapter(trained_on, _plan()), tmp_path / "a")
    with pytest.raises(AdapterError, match=r"differs .*rope_parameters\.rope_theta: 10000\.0 -> 1000000\.0"):
        load_adapter(other, folder)
    with pytest.raises(AdapterError, match="rope_parameters.rope_theta"):
        load_adapter(build("llama", rope_theta=1e6, num_key_value_heads=4), folder)  # and every other key that differs


def test_the_fingerprint_survives_save_and_load_and_ignores_dtype_and_name(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    model = build("llama")
    model.save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    assert loaded.config.name_or_path != model.config.name_or_path and loaded.dtype == torch.bfloat16
    assert base_fingerprint(loaded) == base_fingerprint(model)
    assert base_fingerprint(SimpleNamespace(config=AutoConfig.from_pretrained(tmp_path / "base"))) == \
        base_fingerprint(model)  # the vLLM plugin's bake reads the config alone
    folder = save_adapter(with_random_adapter(build("llama"), _plan()), tmp_path / "a")
    load_adapter(loaded, folder)  # the same architecture in another dtype and folder loads
