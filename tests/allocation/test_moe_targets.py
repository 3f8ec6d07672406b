"""A mixture-of-experts model's default plan adapts what adapter layers can wrap, out of the box.

transformers 5 keeps the experts as fused 3-D parameters and the router as a TopKRouter: neither is an nn.Linear,
so the default targets leave out the router and the roles only the experts have, and keep those of a shared
expert (Qwen2-MoE), whose gate, up and down are nn.Linear.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import alphalora
from alphalora.adapters.inject import inject_adapters
from alphalora.adapters.layer import MoELoRALinear
from alphalora.allocation import AllocationError
from alphalora.cli import main
from alphalora.spectral import SpectralReport

COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
)
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=40, shared_expert_intermediate_size=48)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=40)),
}
ATTENTION = ["q", "k", "v", "o"]
# Qwen2-MoE's shared expert is a plain MLP of nn.Linear; its scalar gate (`shared_expert_gate`, hidden -> 1) is an
# nn.Linear too, but no projection a rank fits: left out.
EXPECTED_TARGETS = {
    "mixtral": ATTENTION,
    "qwen2_moe": [*ATTENTION, "gate", "up", "down"],
    "qwen3_moe": ATTENTION,
}
EXPECTED_LEAVES = {
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2_moe": {"q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                  "shared_expert.down_proj"},
    "qwen3_moe": {"q_proj", "k_proj", "v_proj", "o_proj"},
}


def build(family: str) -> torch.nn.Module:
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_class(config_class(**{**COMMON, **extra})).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def analysed(request):
    family = request.param
    return family, alphalora.analyze(build(family), progress=False)


def test_the_report_holds_the_router_and_every_experts_matrices(analysed):
    # (what the default targets are chosen from)
    _, report = analysed
    roles = {m.role for m in report.matrices if m.layer == 0}
    assert {"router", "gate", "up", "down"} <= roles


def test_the_default_plan_injects_into_the_model_out_of_the_box(analysed):
    family, report = analysed
    plan = alphalora.allocate(report, budget=4)
    assert plan.target_modules == EXPECTED_TARGETS[family]
    model = build(family)
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(tokens).logits
    state = inject_adapters(model, plan)
    adapted = {name.split(".mlp.", 1)[-1].split(".self_attn.", 1)[-1] for name in state.module_names}
    assert adapted == EXPECTED_LEAVES[family]
    assert len(state.module_names) == COMMON["num_hidden_layers"] * len(EXPECTED_LEAVES[family])
    assert not any(".experts." in name or name.endswith((".gate", ".router")) for name in state.module_names)
    assert all(isinstance(model.get_submodule(name), MoELoRALinear) for name in state.module_names)
    with torch.no_grad():  # a fresh adapter adds nothing yet: the base model's output
        torch.testing.assert_close(model(tokens).logits, base)
    model.train()
    model(tokens, labels=tokens).loss.backward()
    trained = {n: p for n, p in model.named_parameters() if n.endswith(".lora_B")}
    assert len(trained) == len(state.module_names)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())


def test_the_cli_gives_the_same_default_targets(analysed, tmp_path):
    family, report = analysed
    report.to_json(tmp_path / "report.json")
    assert main(["allocate", "--report", str(tmp_path / "report.json"), "--budget", "4",
                 "--out", str(tmp_path / "plan.json")]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["target_modules"] == EXPECTED_TARGETS[family]


def test_a_role_of_the_experts_alone_is_left_out_and_one_shared_with_a_linear_is_kept(analysed):
    # From the report's names alone (a report read from JSON has no modules): per-expert matrices, in either
    # checkpoint naming, and the router do not make a role a default target; a plain matrix of that role does.
    _, report = analysed
    data = report.to_dict()
    data["matrices"] = [
        m for m in data["matrices"] if m["role"] in ("q", "router") or ".experts." in m["name"]
    ] + [{**m, "name": m["name"].replace(".mlp.experts.", ".block_sparse_moe.experts.").replace(".gate_proj", ".w1")}
         for m in data["matrices"] if m["role"] == "gate" and ".experts." in m["name"]]
    only_experts = SpectralReport.from_dict(data)
    assert alphalora.allocate(only_experts, budget=4).target_modules == ["q"]
    dense_gate = next(m for m in data["matrices"] if m["role"] == "gate")
    data["matrices"].append({**dense_gate, "name": "model.layers.1.mlp.dense.gate_proj", "layer": 1})
    assert alphalora.allocate(SpectralReport.from_dict(data), budget=4).target_modules == ["q", "gate"]


def test_a_report_of_routers_and_experts_alone_asks_for_the_targets(analysed):
    _, report = analysed
    data = report.to_dict()
    data["matrices"] = [m for m in data["matrices"] if m["role"] == "router" or ".experts." in m["name"]]
    with pytest.raises(AllocationError, match=r"only a mixture of experts' routers and experts.*--target-modules"):
        alphalora.allocate(SpectralReport.from_dict(data), budget=4)
    plan = alphalora.allocate(SpectralReport.from_dict(data), budget=4, target_modules=["q"])
    assert plan.target_modules == ["q"]


def test_a_target_that_names_only_experts_or_the_router_is_refused_at_allocation(analysed):
    """Not later, by `train`'s "match nothing": Mixtral's gate, up, down and router are its fused experts' and
    router's alone; Qwen2-MoE's gate is also its shared expert's, a linear adapters wrap."""
    family, report = analysed
    if family == "qwen2_moe":
        assert alphalora.allocate(report, budget=4, target_modules=["q", "gate"]).target_modules == ["q", "gate"]
    else:
        for extra in ("gate", "router"):
            with pytest.raises(AllocationError, match=rf"\['{extra}'\] are, in .* only a mixture of experts'"):
                alphalora.allocate(report, budget=4, target_modules=["q", extra])
    assert alphalora.allocate(report, budget=4, target_modules=["q", "k"]).target_modules == ["q", "k"]
