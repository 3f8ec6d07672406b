"""PEFT export: PeftModel.from_pretrained on the export computes what our model computes."""

from __future__ import annotations

import json

import pytest
import torch

from alphalora.adapters import AdapterError
from alphalora.adapters.inject import module_rank
from alphalora.adapters.io import save_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation import Plan
from tests.tiny_models import build, with_random_adapter

peft = pytest.importorskip("peft")


def _adapted(model, experts=(1, 1), heads=()):
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=list(experts),
                top_k_per_layer=[1] * len(experts), target_modules=["q", "k", "v", "o", "up", "down"], rank=4,
                rank_pattern={"q": 2, "model.layers.1.mlp.down_proj": 6, "*.layer.1.output.dense": 6},
                lora_alpha=12.0, lora_dropout=0.0, modules_to_save=list(heads))
    return with_random_adapter(model, plan, seed=4, std=0.2)


def test_heterogeneous_rank_lora_exports_to_peft_with_identical_logits(tmp_path):
    ours = _adapted(build("llama"))
    assert module_rank(ours.alphalora_adapter.plan, "model.layers.0.self_attn.q_proj") == 2
    assert ours.get_submodule("model.layers.1.mlp.down_proj").rank == 6
    ids = torch.randint(0, 128, (2, 10))
    expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"]  # readers that ignore the patterns still scale by 1
    assert config["rank_pattern"] == config["alpha_pattern"]
    loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,targets", [("qwen3", ["q", "k", "v", "o", "gate", "up", "down"]),
                                            ("phi3", ["qkv", "o", "gate_up", "down"])])  # fused projections
def test_other_decoder_families_export_to_peft_with_identical_logits(tmp_path, family, targets):
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=targets, rank=4, rank_pattern={targets[0]: 2}, lora_alpha=12.0, lora_dropout=0.0)
    ours = with_random_adapter(build(family), plan, seed=4, std=0.2)
    ids = torch.randint(0, 128, (2, 10))
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(build(family)(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_classifier_head_travels_as_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def base():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        max_position_embeddings=64, num_labels=3)).eval()

    ours = _adapted(base(), heads=("classifier",))
    ids = torch.randint(0, 128, (3, 7))
    expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_mixture_of_experts_adapters_are_refused(tmp_path):
    save_adapter(_adapted(build("llama"), experts=(2, 1)), tmp_path / "adapter")
    with pytest.raises(AdapterError, match="mixture-of-LoRA-experts.*native engine"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")


def test_cli_export(tmp_path, capsys):
    from alphalora.cli import main

    save_adapter(_adapted(build("llama")), tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    save_adapter(_adapted(build("llama"), experts=(3, 1)), tmp_path / "moe")
    assert main(["export", str(tmp_path / "moe"), "--out", str(tmp_path / "x")]) == 2
    assert "native engine" in capsys.readouterr().err
    # exporting the export again: it is named as what it is, not as "not an alphalora adapter"
    assert main(["export", str(tmp_path / "peft"), "--out", str(tmp_path / "y")]) == 2
    assert "is a PEFT adapter (adapter_config.json), not an alphalora one" in capsys.readouterr().err


def test_switched_off_modules_are_left_out_of_the_export(tmp_path):
    """A dynamic HeteroLoRA checkpoint keeps the weights of modules it switched off; the model (and the
    serving engine) skip them, so the export must too, or PEFT and vLLM would add them back."""
    ours = _adapted(build("llama"))
    off = "model.layers.0.self_attn.q_proj"
    ours.alphalora_adapter.set_disabled(ours, [off])
    ids = torch.randint(0, 128, (2, 10))
    expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert off not in config["target_modules"] and off not in config["rank_pattern"]
    loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def _with_shortcuts(model):
    from alphalora.allocation.plan import all_shortcut_names

    plan = Plan(method="hetero", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v"], rank=4, lora_alpha=8.0, lora_dropout=0.0,
                shortcuts=dict.fromkeys(all_shortcut_names(2), 4))
    return with_random_adapter(model, plan, seed=4, std=0.2)


def test_a_checkpoint_whose_shortcuts_are_all_switched_off_exports(tmp_path):
    """Dynamic HeteroLoRA may switch every shortcut off: the model then computes plain LoRA, which PEFT
    expresses; one shortcut switched on is refused."""
    ours = _with_shortcuts(build("llama"))
    state = ours.alphalora_adapter
    state.set_disabled(ours, sorted(state.shortcuts))
    ids = torch.randint(0, 128, (2, 10))
    expected = ours(input_ids=ids).logits
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    state.set_disabled(ours, sorted(state.shortcuts)[1:])
    save_adapter(ours, tmp_path / "one_on")
    with pytest.raises(AdapterError, match=r"shortcut connections \(1 switched on\)"):
        export_peft(tmp_path / "one_on", tmp_path / "peft2")


def test_modules_peft_would_move_onto_fused_experts_are_refused_and_attention_exports(tmp_path):
    """PEFT on transformers 5 maps every `gate_proj`/`up_proj`/`down_proj` target of a Qwen3-MoE onto the fused
    expert parameters, its dense MLP layers' (mlp_only_layers) included: such an export could not load as
    trained, so it is refused by name; attention alone exports and loads with our logits."""
    def adapted(targets):
        plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                    target_modules=targets, rank=4, lora_alpha=8.0, lora_dropout=0.0)
        return with_random_adapter(build("qwen3_moe"), plan, seed=4, std=0.2)

    save_adapter(adapted(["q", "k", "v", "o", "gate", "up", "down"]), tmp_path / "dense_mlp")
    with pytest.raises(AdapterError, match=r"layers\.0\.mlp\.down_proj.*re-targets onto the fused experts"):
        export_peft(tmp_path / "dense_mlp", tmp_path / "peft_dense")
    ours = adapted(["q", "k", "v", "o"])
    save_adapter(ours, tmp_path / "attention")
    export_peft(tmp_path / "attention", tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build("qwen3_moe"), tmp_path / "peft").eval()
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
