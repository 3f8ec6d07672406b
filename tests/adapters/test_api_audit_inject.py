"""The adapters from a notebook: a refused injection or load leaves the model as it was, and a torch.compile'd
model injects, saves and loads under the module names of the model itself."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from alphalora.adapters import AdapterError, MoELoRALinear, adapter_parameters, adapter_state, inject_adapters
from alphalora.adapters.io import WEIGHTS_NAME, load_adapter, save_adapter
from alphalora.allocation import Plan
from tests.tiny_models import build, with_random_adapter


def _plan(**changes) -> Plan:
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[3, 1], top_k_per_layer=[2, 1],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, lora_dropout=0.0)
    return dataclasses.replace(plan, **changes)


def _snapshot(model: nn.Module):
    """What a failed call must not change: the module tree, the parameters and their requires_grad flags."""
    return ([(name, type(module)) for name, module in model.named_modules()],
            [(name, p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()],
            getattr(model, "alphalora_adapter", None))


def _assert_unchanged(model: nn.Module, before) -> None:
    modules, params, state = _snapshot(model)
    assert modules == before[0]
    assert [(n, g) for n, g, _ in params] == [(n, g) for n, g, _ in before[1]]
    assert all(torch.equal(p, q) for (_, _, p), (_, _, q) in zip(params, before[1], strict=True))
    assert state is None and before[2] is None


def _reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The README's math written out per token (softmax router, top-k, gates renormalised to 1), in float64,
    on each adapted module's own base and weights, with transformers' forward around it."""

    def mixture(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_features).double()
        a, b = layer.lora_A.double(), layer.lora_B.double()
        delta = torch.zeros(x2.shape[0], layer.out_features, dtype=torch.float64)
        if layer.num_experts == 1:
            delta = x2 @ a[0].T @ b[0].T
        else:
            probs = torch.softmax(x2 @ layer.router.weight.double().T, dim=-1)
            top, experts = probs.topk(layer.top_k, dim=-1)
            gates = top / top.sum(-1, keepdim=True)
            for t in range(x2.shape[0]):
                for slot in range(layer.top_k):
                    e = experts[t, slot]
                    delta[t] += gates[t, slot] * (b[e] @ (a[e] @ x2[t]))
        out = layer.base(x).double() + layer.scaling * delta.reshape(*x.shape[:-1], layer.out_features)
        return out.to(x.dtype)

    original = MoELoRALinear.forward
    MoELoRALinear.forward = mixture
    try:
        return model(input_ids=ids).logits
    finally:
        MoELoRALinear.forward = original


def test_a_refused_modules_to_save_leaves_the_model_as_it_was_and_a_corrected_plan_then_injects():
    """A tied head in modules_to_save is refused; the model used to be left with its linears already swapped for
    adapters and its base frozen, so injecting the corrected plan into it failed ("roles are ['base', 'router']")."""
    model = build("gemma")  # ties its embeddings
    before = _snapshot(model)
    with pytest.raises(AdapterError, match="tied embeddings"):
        inject_adapters(model, _plan(modules_to_save=["lm_head"]))
    _assert_unchanged(model, before)
    with pytest.raises(AdapterError, match="not a module of this model"):
        inject_adapters(model, _plan(modules_to_save=["no_such_head"]))
    _assert_unchanged(model, before)
    state = inject_adapters(model, _plan())
    assert state.module_names == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                  "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
                                  "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_a_refused_load_leaves_the_model_as_it_was(tmp_path):
    """load_adapter used to inject the plan before checking the tensors: a folder whose weights miss a tensor was
    refused, but the model kept a randomly initialised adapter and refused the right folder afterwards."""
    from safetensors.torch import load_file, save_file

    trained = with_random_adapter(build("llama"), _plan(), seed=3)
    save_adapter(trained, tmp_path / "good")
    save_adapter(trained, tmp_path / "bad")
    tensors = load_file(str(tmp_path / "bad" / WEIGHTS_NAME))
    tensors.pop("model.layers.0.self_attn.q_proj.router.weight")
    save_file(tensors, str(tmp_path / "bad" / WEIGHTS_NAME))
    import json

    config = json.loads((tmp_path / "bad" / "alphalora_config.json").read_text())
    config.pop("weights_sha256")  # (a folder from before the hash, or edited on purpose)
    (tmp_path / "bad" / "alphalora_config.json").write_text(json.dumps(config))

    model = build("llama")
    before = _snapshot(model)
    with pytest.raises(AdapterError, match="does not match its plan"):
        load_adapter(model, tmp_path / "bad")
    _assert_unchanged(model, before)
    load_adapter(model, tmp_path / "good")
    ids = torch.randint(0, 128, (2, 7))
    assert torch.equal(model(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_a_compiled_model_saves_an_adapter_that_loads_into_the_plain_model(tmp_path):
    """torch.compile(model) wraps the model in an OptimizedModule whose parameter names start with `_orig_mod.`:
    the adapter saved from it used to hold those names, and load_adapter refused it ("does not match its plan")."""
    model = build("llama")
    compiled = torch.compile(model)  # lazy: nothing compiles until the first call, which this test never makes
    state = inject_adapters(compiled, _plan())
    assert adapter_state(model) is state and adapter_state(compiled) is state
    assert all(not name.startswith("_orig_mod") for name in state.module_names)
    assert sorted(adapter_parameters(compiled)) == sorted(adapter_parameters(model))
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in adapter_parameters(model).values():
            parameter.normal_(0, 0.1)
    save_adapter(compiled, tmp_path / "adapter")
    fresh = build("llama")
    load_adapter(fresh, tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 7))
    expected = _reference_logits(model, ids)
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # and the other way: an adapter loaded into a compiled fresh model is the model's own
    other = build("llama")
    load_adapter(torch.compile(other), tmp_path / "adapter")
    assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_block_without_shortcut_support_leaves_the_model_as_it_was():
    """Shortcut connections are refused for Gemma 2's blocks (they normalise their sub-block outputs) only once the
    linears were adapted and earlier hooks wired: the refusal now takes all of that back."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from alphalora.allocation.plan import all_shortcut_names

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           max_position_embeddings=64)).eval()
    ids = torch.randint(0, 128, (2, 7))
    expected = model(input_ids=ids).logits
    before = _snapshot(model)
    with pytest.raises(AdapterError, match="shortcut connections support"):
        inject_adapters(model, _plan(method="hetero", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                                     shortcuts=dict.fromkeys(all_shortcut_names(2), 4)))
    _assert_unchanged(model, before)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    assert torch.equal(model(input_ids=ids).logits, expected)
    inject_adapters(model, _plan())
    assert torch.equal(model(input_ids=ids).logits, expected)  # B = 0: the base function


def _routed(router: str, aux_loss_coef: float, checkpointing: dict | None):
    from alphalora.allocation import RouterSettings

    model = build("llama").train()
    plan = _plan(experts_per_layer=[3, 2], top_k_per_layer=[2, 1],
                 router=RouterSettings(type=router, aux_loss_coef=aux_loss_coef))
    inject_adapters(model, plan)
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in adapter_parameters(model).values():
            parameter.normal_(0, 0.1)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return model


def test_the_aux_loss_under_non_reentrant_checkpointing_gives_the_plain_gradients():
    ids = torch.randint(0, 128, (2, 9))
    grads = []
    for checkpointing in (None, {"use_reentrant": False}):
        model = _routed("per_module", 0.01, checkpointing)
        loss = model(input_ids=ids, labels=ids).loss + 0.5 * adapter_state(model).aux_loss()
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in adapter_parameters(model).items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_is_refused_where_it_would_drop_the_aux_loss_or_break_a_shared_router():
    """Reentrant checkpointing runs the blocks' forward without autograd: the per-module routers' aux loss came back
    without a gradient (adding it to the loss silently trained nothing), and a shared router's gates, computed by a
    hook outside the checkpointed forward, ended in "Trying to backward through the graph a second time"."""
    ids = torch.randint(0, 128, (2, 9))
    model = _routed("per_module", 0.01, {"use_reentrant": True})
    loss = model(input_ids=ids, labels=ids).loss
    with pytest.raises(AdapterError, match="load-balancing loss has no gradient.*use_reentrant.: False"):
        adapter_state(model).aux_loss()
    loss.backward()  # without the aux loss, reentrant checkpointing trains the adapter as before
    assert all(p.grad is not None for p in adapter_parameters(model).values())
    with torch.no_grad():  # a forward without gradients reads no aux loss to train on, and is not refused
        model(input_ids=ids)
        adapter_state(model).aux_loss()

    shared = _routed("shared", 0.0, {"use_reentrant": True})
    try:
        loss = shared(input_ids=ids, labels=ids).loss
    except AdapterError as error:
        assert re.search("shared router.*use_reentrant.: False", str(error)), error
    else:  # transformers 5.17 runs a block's pre-hooks inside the checkpointed forward, so the recomputation routes
        loss.backward()  # again, with autograd: then the gradients must be those of a run without checkpointing
        unchecked = _routed("shared", 0.0, None)
        unchecked(input_ids=ids, labels=ids).loss.backward()
        for name, parameter in adapter_parameters(unchecked).items():
            torch.testing.assert_close(adapter_parameters(shared)[name].grad, parameter.grad, rtol=1e-5, atol=1e-7)
    plain = _routed("shared", 0.0, None)
    plain.eval()
    with torch.no_grad():
        shared.eval()  # evaluation (no checkpointing) is unaffected
        assert torch.equal(shared(input_ids=ids).logits, plain(input_ids=ids).logits)


def _gpt_oss(seed: int):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(config).eval()


def test_a_base_models_own_router_is_not_part_of_the_adapter(tmp_path):
    """adapter_parameters took every parameter with "router" in its name: GPT-OSS's own expert routers
    (mlp.router.weight/bias, frozen base weights) were saved in the adapter, counted in num_parameters, and written
    over the base's routers by load_adapter, silently replacing those of another checkpoint of the architecture."""
    import json

    model = _gpt_oss(0)
    inject_adapters(model, _plan(target_modules=["q", "v"]))
    names = set(adapter_parameters(model))
    expected = {name for name, _ in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))
                or name.endswith(("q_proj.router.weight", "v_proj.router.weight"))}
    assert names == expected and not any(".mlp.router." in name for name in names)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "alphalora_config.json").read_text())
    assert config["num_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)

    other = _gpt_oss(1)  # the same architecture, other weights (another fine-tune of the base, say)
    routers = {name: p.detach().clone() for name, p in other.named_parameters() if ".mlp.router." in name}
    assert routers and not torch.equal(routers["model.layers.0.mlp.router.weight"],
                                       model.get_parameter("model.layers.0.mlp.router.weight"))
    load_adapter(other, tmp_path / "adapter")
    for name, value in routers.items():
        assert torch.equal(other.get_parameter(name), value), name


def test_a_shared_router_under_checkpointing_gives_the_plain_gradients_over_several_forwards():
    """Checkpointing recomputes a block's forward in backward, but not its pre-hooks: the shared router's gates, set
    on the modules by the block's pre-hook, were those of the *last* forward, so a loss over two forwards (a pair of
    inputs, a preference pair, accumulation in one graph) silently got the second input's gates in the first's
    recomputation (gradients 0.09 off); the gates now go with the block input they were computed from."""
    a, b = torch.randint(0, 128, (2, 9)), torch.randint(0, 128, (2, 9))
    grads = []
    for checkpointing in (None, {"use_reentrant": False}):
        model = _routed("shared", 0.0, checkpointing)
        loss = model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in adapter_parameters(model).items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_a_deep_copy_of_a_shared_router_model_routes_with_its_own_router():
    """copy.deepcopy(model) (a frozen reference, an EMA copy) copied the block hooks' closures as they were: the
    copy's blocks fed the original's modules (the copy crashed: its modules have no gates, nor a router), and after
    a forward the copy failed outright (the gates held from it are not graph leaves)."""
    import copy

    ids = torch.randint(0, 128, (2, 9))
    model = _routed("shared", 0.0, None).eval()
    expected = model(input_ids=ids).logits
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in adapter_parameters(clone).values():
            parameter.mul_(-1.5)
    reference = _routed("shared", 0.0, None).eval()  # the same seeds: the original's weights
    with torch.no_grad():
        for parameter in adapter_parameters(reference).values():
            parameter.mul_(-1.5)
        expected_clone = reference(input_ids=ids).logits
    assert torch.equal(clone(input_ids=ids).logits, expected_clone)
    assert torch.equal(model(input_ids=ids).logits, expected)
    assert not torch.equal(expected_clone, expected)


def test_shortcuts_under_gradient_checkpointing_are_refused_with_the_reason():
    """`alphalora train` refuses shortcut plans with --gradient-checkpointing; from Python, a hand-written loop with
    model.gradient_checkpointing_enable() ended in a bare `KeyError: 1` inside the backward pass."""
    from alphalora.allocation.plan import all_shortcut_names

    plan = _plan(method="hetero", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                 shortcuts=dict.fromkeys(all_shortcut_names(2), 4))
    model = build("llama")
    inject_adapters(model, plan)
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 9))
    with pytest.raises(AdapterError, match="shortcut connections.*checkpointing_disable"):
        model(input_ids=ids, labels=ids)
    model.gradient_checkpointing_disable()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in adapter_parameters(model).values())
