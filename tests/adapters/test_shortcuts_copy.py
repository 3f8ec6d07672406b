"""Shortcut connections in a copied model: copy.deepcopy and pickling give a model that computes with its own
shortcut weights, also after a forward whose activations the shortcuts still hold, and a refused injection takes
the shortcut hooks back."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

from alphalora.adapters import AdapterError, adapter_state
from alphalora.adapters.inject import inject_adapters
from alphalora.adapters.shortcuts import SHORTCUTS_ATTRIBUTE
from alphalora.allocation import Plan
from alphalora.allocation.plan import all_shortcut_names
from tests.tiny_models import build

FAMILIES = ["llama", "gpt2", "bert"]  # the three block layouts: o_proj/down_proj, GPT-2's and BERT's dropouts


def _plan(num_layers=2, **changes):
    plan = Plan(method="hetero", base_model="tiny", experts_per_layer=[1] * num_layers,
                top_k_per_layer=[1] * num_layers, target_modules=["o"], rank=4, lora_alpha=8.0, lora_dropout=0.0,
                shortcuts=dict.fromkeys(all_shortcut_names(num_layers), 4))
    return dataclasses.replace(plan, **changes)


def _injected(family):
    model = build(family)
    state = inject_adapters(model, _plan())
    torch.manual_seed(3)
    with torch.no_grad():
        for module in state.shortcuts.values():
            module.lora_A.normal_(0, 0.3)
            module.lora_B.normal_(0, 0.3)
    return model


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _oracle(family, model, ids):
    """What a model with `model`'s weights computes: a freshly injected model loaded with its state dict."""
    fresh = build(family)
    inject_adapters(fresh, _plan())
    fresh.load_state_dict(model.state_dict())
    return _output(fresh, ids)


def _shortcut_b(model):
    return [p for name, p in model.named_parameters() if SHORTCUTS_ATTRIBUTE in name and name.endswith("lora_B")]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_deep_copy_computes_with_its_own_shortcut_weights(family):
    """The hooks were closures over the original's blocks and shortcuts: a copy whose shortcut weights were changed
    computed with the original's (logits 0.145 off)."""
    ids = torch.randint(3, 100, (2, 9))
    model = _injected(family)
    expected = _output(model, ids)
    clone = copy.deepcopy(model)
    assert torch.equal(_output(clone, ids), expected)
    with torch.no_grad():
        for parameter in _shortcut_b(clone):
            parameter.mul_(-1.5)
    changed = _output(clone, ids)
    assert not torch.allclose(changed, expected, atol=1e-3)
    assert torch.equal(changed, _oracle(family, clone, ids))
    assert torch.equal(_output(model, ids), expected)
    # and the other way: the original's change does not reach the copy
    with torch.no_grad():
        for parameter in _shortcut_b(model):
            parameter.zero_()
    assert torch.equal(_output(model, ids), _oracle(family, model, ids))
    assert torch.equal(_output(clone, ids), changed)
    # the copy's adapter state names the copy's shortcuts: switching one off there switches off the copy's
    adapter_state(clone).set_disabled(clone, list(adapter_state(clone).shortcuts))
    assert torch.equal(_output(clone, ids), _output(build(family), ids))
    assert torch.equal(_output(model, ids), _oracle(family, model, ids))


def _inner_forward(family, model, ids):
    """A forward of the module that holds the blocks (not the injected model itself): the shortcuts' taps keep
    this forward's activations, graphs and all, since the model's own forward hook never ran."""
    if family == "llama":
        return model.model(input_ids=ids).last_hidden_state
    if family == "gpt2":
        return model.transformer(input_ids=ids).last_hidden_state
    return model.encoder(model.embeddings(input_ids=ids)).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_copies_and_pickles_after_a_forward_with_autograd(family):
    ids = torch.randint(3, 100, (2, 9))
    model = _injected(family)
    expected = _output(model, ids)
    assert _inner_forward(family, model, ids).requires_grad
    clone = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (clone, unpickled):
        assert torch.equal(_output(other, ids), expected)
        with torch.no_grad():
            for parameter in _shortcut_b(other):
                parameter.mul_(2.0)
        assert torch.equal(_output(other, ids), _oracle(family, other, ids))
    assert torch.equal(_output(model, ids), expected)
    _inner_forward(family, model, ids).sum().backward()  # the original still trains
    assert all(parameter.grad is not None for parameter in _shortcut_b(model))


def test_a_refused_injection_takes_the_shortcut_hooks_back():
    """Refused after the shortcuts were wired (a disabled module the adapter does not have): no hook stays behind,
    the model computes the base function, and a corrected plan injects as on a fresh model."""
    ids = torch.randint(3, 100, (2, 9))
    model = build("llama")
    expected = _output(model, ids)
    with pytest.raises(AdapterError, match="disabled_modules"):
        inject_adapters(model, _plan(disabled_modules=["layer7.residual1"]))
    assert all(not module._forward_hooks and not module._forward_pre_hooks and not module._forward_hooks_always_called
               for module in model.modules())
    assert not any(SHORTCUTS_ATTRIBUTE in name for name, _ in model.named_modules())
    assert torch.equal(_output(model, ids), expected)
    state = inject_adapters(model, _plan(disabled_modules=["layer1.shortcut2"]))
    reference = _injected("llama")
    adapter_state(reference).set_disabled(reference, ["layer1.shortcut2"])
    model.load_state_dict(reference.state_dict())
    assert not state.shortcuts["layer1.shortcut2"].enabled
    assert torch.equal(_output(model, ids), _output(reference, ids))
