"""Injection into every supported family: base function at init, frozen base, plan checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alphalora.adapters import AdapterError, MoELoRALinear, adapter_parameters, adapter_state, inject_adapters
from alphalora.allocation import Plan, RouterSettings
from tests.tiny_models import EXPECTED_ROLES, FAMILIES, build


def _plan(experts=(3, 2), top_k=(2, 1), targets=None, router="per_module", rank=4, aux_loss_coef=0.0) -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=list(experts), top_k_per_layer=list(top_k),
                target_modules=list(targets or ["q", "k", "v", "o", "up", "down"]), rank=rank,
                lora_alpha=8.0, lora_dropout=0.0, router=RouterSettings(type=router, aux_loss_coef=aux_loss_coef))


def _inputs(family):
    torch.manual_seed(0)
    return {"input_ids": torch.randint(0, 128, (2, 9))}


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_computes_the_base_function_at_initialisation(family):
    base = build(family)
    inputs = _inputs(family)
    expected = _output(base, inputs)
    model = build(family)
    targets = sorted(EXPECTED_ROLES[family])
    state = inject_adapters(model, _plan(targets=targets))
    assert torch.equal(_output(model, inputs), expected)
    assert len(state.module_names) == 2 * len(targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) and trainable
    for name in state.module_names:
        module = model.get_submodule(name)
        assert isinstance(module, MoELoRALinear)
        assert module.num_experts == (3 if ".0." in name else 2)


def test_parameter_count_follows_molas_formula():
    # Per layer: N_l * (r * sum_t (d_in + d_out) + sum_t d_in), over the 7 modules (MoLA §2.2).
    model = build("llama")
    plan = _plan(experts=(3, 2), top_k=(2, 2), targets=["q", "k", "v", "o", "gate", "up", "down"], rank=4)
    inject_adapters(model, plan)
    dims = {"q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 48), "up": (32, 48),
            "down": (48, 32)}
    per_slot = 4 * sum(i + o for i, o in dims.values()) + sum(i for i, _ in dims.values())
    assert sum(p.numel() for p in adapter_parameters(model).values()) == (3 + 2) * per_slot


def test_glob_and_name_targets():
    model = build("llama")
    state = inject_adapters(model, _plan(targets=["model.layers.*.mlp.down_proj", "q_proj"]))
    assert state.module_names == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                  "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


def test_plan_for_another_model_is_refused():
    with pytest.raises(AdapterError, match="plan has 3 layers but the model has 2 blocks"):
        inject_adapters(build("llama"), _plan(experts=(2, 2, 2), top_k=(1, 1, 1)))


def test_unknown_target_modules_are_refused():
    with pytest.raises(AdapterError, match=r"\['attn_qkv'\] match nothing.*roles are"):
        inject_adapters(build("llama"), _plan(targets=["q", "attn_qkv"]))


def test_injecting_twice_is_refused():
    model = build("llama")
    inject_adapters(model, _plan())
    with pytest.raises(AdapterError, match="already has"):
        inject_adapters(model, _plan())


def test_shared_router_feeds_every_module_of_its_block():
    model = build("llama")
    state = inject_adapters(model, _plan(router="shared"))
    modules = [model.get_submodule(n) for n in state.module_names if n.startswith("model.layers.0.")]
    assert all(m.router is None for m in modules)
    for name in state.module_names:
        with torch.no_grad():
            model.get_submodule(name).lora_B.normal_(0, 0.1)
    model(**_inputs("llama")).logits.square().sum().backward()
    router = model.model.layers[0].alphalora_router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert all(m.shared_gates is modules[0].shared_gates for m in modules)


@pytest.mark.parametrize("router", ["per_module", "shared"])
def test_the_plans_renormalize_setting_reaches_every_router(router):
    """renormalize=False: the gates of a module's tokens are their softmax probabilities over all experts at
    the top-k, unrescaled (written out here from the router's weights and the tokens)."""
    plan = dataclasses.replace(_plan(experts=(4, 3), top_k=(2, 2), router=router),
                               router=RouterSettings(type=router, renormalize=False))
    model = build("llama")
    state = inject_adapters(model, plan)
    modules = [model.get_submodule(n) for n in state.module_names]
    assert all(m.renormalize is False for m in modules)
    q = model.model.layers[0].self_attn.q_proj
    seen = {}
    hook = q.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0].reshape(-1, 32).detach()))
    model(**_inputs("llama"))
    hook.remove()
    weight = model.model.layers[0].alphalora_router.weight if router == "shared" else q.router.weight
    if router == "shared":
        q.shared_gates = None  # recomputed below from the captured input through the shared router
        model.model.layers[0].alphalora_router.route(seen["x"])
    probs = torch.softmax(seen["x"] @ weight.T, dim=-1)
    top, ids = probs.topk(2, dim=-1)
    expected = torch.zeros_like(probs).scatter(1, ids, top)
    torch.testing.assert_close(q.gates(seen["x"]), expected)
    assert float(q.gates(seen["x"]).detach().sum(-1).max()) < 1.0


@pytest.mark.parametrize("router", ["per_module", "shared"])
def test_aux_loss_collects_each_layers_routing(router):
    model = build("llama").train()
    state = inject_adapters(model, _plan(experts=(4, 3), top_k=(2, 2), router=router, aux_loss_coef=0.01))
    model(**_inputs("llama"))
    loss = adapter_state(model).aux_loss()
    assert loss is not None and loss.requires_grad
    assert 0.0 < float(loss.detach()) <= 4 + 3  # each layer contributes at most E_l
    assert adapter_state(model).aux_loss() is None  # reset after reading
    assert state.plan.num_layers == 2


def test_without_an_aux_loss_no_routing_statistics_are_kept():
    model = build("llama").train()
    inject_adapters(model, _plan(experts=(4, 3), top_k=(2, 2)))
    model(**_inputs("llama"))
    assert adapter_state(model).aux_loss() is None and not adapter_state(model).balance


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = build("llama").train()
        inject_adapters(model, _plan())
        torch.manual_seed(5)
        for n, p in adapter_parameters(model).items():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
        if checkpointing:  # transformers renamed gradient_checkpointing_* to activation_checkpointing_* in 5.2x
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**_inputs("llama")).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in adapter_parameters(model).items()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_bf16_model_keeps_float32_adapter_weights_so_small_updates_are_not_lost():
    """As PEFT's autocast_adapter_dtype: a bfloat16 base, float32 adapter parameters. An AdamW step moves each
    weight by about lr; at lr 1e-5 that is under bfloat16's resolution of a weight of 0.05 (2^-8 of it), so
    bfloat16 parameters would keep most of their values (the failure this guards against)."""
    model = build("qwen2").to(torch.bfloat16)
    inject_adapters(model, _plan(targets=["q", "v"]))
    params = adapter_parameters(model)
    assert {p.dtype for p in params.values()} == {torch.float32}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.05)
    before = {name: p.detach().clone() for name, p in params.items()}
    logits = model(**_inputs("qwen2")).logits
    assert logits.dtype == torch.bfloat16
    logits.float().square().mean().backward()
    torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.0).step()
    for name, p in params.items():
        moved = (p.detach() != before[name]) | (p.grad == 0)
        assert moved.all(), f"{name}: {(~moved).sum()} of {p.numel()} entries did not move"
        assert p.grad.dtype == torch.float32


def test_a_tied_head_in_modules_to_save_is_refused():
    model = build("gemma")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # Gemma ties its embeddings
    plan = dataclasses.replace(_plan(), modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="tied embeddings"):
        inject_adapters(model, plan)
    untied = build("llama")
    inject_adapters(untied, dataclasses.replace(_plan(), modules_to_save=["lm_head"]))
    assert untied.lm_head.weight.requires_grad and not untied.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("fields", [
    dict(method="uniform", experts_per_layer=[2, 3], top_k_per_layer=[2, 2]),
    dict(method="uniform", experts_per_layer=[2, 3], top_k_per_layer=[2, 2], router=RouterSettings(type="shared")),
    dict(method="hetero", experts_per_layer=[1, 1], top_k_per_layer=[1, 1], shortcuts={"layer0.residual1": 2}),
], ids=["per-module routers", "shared router", "shortcuts"])
def test_an_adapter_takes_the_mode_of_the_model_it_joins(tmp_path, fields):
    """New modules start in training mode; built or loaded into a model in eval mode (as PEFT's from_pretrained
    leaves it), an adapter with dropout must not drop anything: two forwards agree."""
    from alphalora.adapters.io import load_adapter, save_adapter

    plan = Plan(base_model="tiny", rank=4, lora_dropout=0.5, **fields)
    trained = build("llama")
    inject_adapters(trained.train(), plan)
    assert all(module.training for module in trained.modules())
    save_adapter(trained, tmp_path / "adapter")
    model = build("llama").eval()
    load_adapter(model, tmp_path / "adapter")
    assert not any(module.training for module in model.modules())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
