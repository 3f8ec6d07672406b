"""PEFT export of encoder models (BERT, RoBERTa without a task head): PEFT loads the export and computes our output."""

from __future__ import annotations

import json

import pytest
import torch

from alphalora.adapters.io import save_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation import Plan
from tests.tiny_models import build, with_random_adapter

peft = pytest.importorskip("peft")


def _plan() -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v", "down"], rank=4, rank_pattern={"down": 2}, lora_alpha=8.0,
                lora_dropout=0.0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_an_encoder_export_loads_in_peft_and_merges_to_our_output(family, tmp_path):
    """The export declared task_type CAUSAL_LM for every model without a classifier head, so PEFT wrapped a BertModel
    in PeftModelForCausalLM, which failed in from_pretrained (no prepare_inputs_for_generation)."""
    ours = with_random_adapter(build(family), _plan(), seed=2, std=0.2)
    ids = torch.randint(3, 128, (2, 9))
    expected = ours(input_ids=ids).last_hidden_state
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] is None
    loaded = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_a_causal_lm_export_stays_a_causal_lm_for_peft(tmp_path):
    ours = with_random_adapter(build("llama"), _plan(), seed=2, std=0.2)
    ids = torch.randint(3, 128, (1, 5))
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "peft").eval()
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    generated = loaded.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, ours.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
