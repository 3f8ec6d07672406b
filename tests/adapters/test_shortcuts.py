"""LoRA shortcut connections: exactly the base function at initialisation, and the documented sums after."""

from __future__ import annotations

import pytest
import torch

from alphalora.adapters import AdapterError
from alphalora.adapters.inject import inject_adapters
from alphalora.adapters.io import load_adapter, save_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.adapters.shortcuts import SHORTCUTS_ATTRIBUTE
from alphalora.allocation import Plan
from alphalora.allocation.plan import all_shortcut_names
from tests.tiny_models import FAMILIES, build


def _plan(num_layers=2, shortcuts=None, targets=("q", "v")):
    names = all_shortcut_names(num_layers)
    return Plan(method="hetero", base_model="tiny", experts_per_layer=[1] * num_layers,
                top_k_per_layer=[1] * num_layers, target_modules=list(targets), rank=4, lora_alpha=8.0,
                lora_dropout=0.0, shortcuts=shortcuts if shortcuts is not None else dict.fromkeys(names, 4))


def _fill(modules, seed=3, std=0.3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            module.lora_A.normal_(0, std)
            module.lora_B.normal_(0, std)


def _output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_all_shortcut_names_are_four_per_layer_minus_the_first_cross_layer_skip():
    names = all_shortcut_names(3)
    assert len(names) == 4 * 3 - 1 and "layer0.shortcut2" not in names and "layer2.shortcut2" in names


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_shortcut_on_at_initialisation_computes_the_base_function_exactly(family):
    ids = torch.randint(3, 100, (2, 9))
    expected = _output(build(family), ids)
    model = build(family)
    state = inject_adapters(model, _plan(targets=("o",)))
    assert len(state.shortcuts) == 7 and all(m.enabled for m in state.shortcuts.values())
    assert torch.equal(_output(model, ids), expected)  # bit for bit: no extra normalisation anywhere


def _llama_by_hand(model, ids, shortcuts):
    """The documented sums written out with the block's own sub-modules (an independent composition)."""
    captured = []
    handles = [layer.register_forward_pre_hook(lambda _m, a, k: captured.append(k), with_kwargs=True)
               for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)  # only to capture what each layer is called with (masks, rotary tables)
    for handle in handles:
        handle.remove()

    def delta(name, h):
        module = shortcuts.get(name)
        return 0 if module is None else (h @ module.lora_A[0].T) @ module.lora_B[0].T * module.scaling

    for module in shortcuts.values():
        module.enabled = False  # the hooks stay quiet: every term below is added by hand
    x = model.model.embed_tokens(ids)
    previous_h = None
    for index, layer in enumerate(model.model.layers):
        kwargs = {k: v for k, v in captured[index].items() if k != "hidden_states"}
        attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        h = x + attention + delta(f"layer{index}.residual1", x)
        if previous_h is not None:
            h = h + delta(f"layer{index}.shortcut2", previous_h)
        out = h + layer.mlp(layer.post_attention_layernorm(h)) + delta(f"layer{index}.residual2", h) \
            + delta(f"layer{index}.shortcut1", x)
        x, previous_h = out, h
    return model.lm_head(model.model.norm(x))


# LoRA on o and down too (HeteroLoRA's default, every role): the terms join the adapted projections' output,
# base plus LoRA, whichever kernel the LoRA layer runs.
@pytest.mark.parametrize("targets", [("q",), ("q", "o", "down")])
def test_trained_shortcuts_add_exactly_the_documented_terms_in_a_pre_ln_llama(targets):
    model = build("llama")
    state = inject_adapters(model, _plan(targets=targets))
    _fill([model.get_submodule(name) for name in state.module_names], seed=5, std=0.05)
    _fill(state.shortcuts.values())
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base_only = build("llama")(input_ids=ids).logits
        by_hand = _llama_by_hand(model, ids, state.shortcuts)
    assert not torch.allclose(ours, base_only, atol=1e-3)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)


def test_switched_off_shortcuts_contribute_nothing_and_get_no_gradient():
    model = build("llama")
    state = inject_adapters(model, _plan(targets=("q",)))
    _fill(state.shortcuts.values())
    state.set_disabled(model, list(state.shortcuts))
    ids = torch.randint(3, 100, (2, 9))
    torch.testing.assert_close(model(input_ids=ids).logits, build("llama")(input_ids=ids).logits, rtol=0, atol=0)
    state.set_disabled(model, ["layer1.shortcut2"])
    model(input_ids=ids).logits.sum().backward()
    assert state.shortcuts["layer1.shortcut2"].lora_A.grad is None
    assert state.shortcuts["layer0.residual1"].lora_A.grad.abs().sum() > 0


def test_shortcut_adapters_save_and_reload_to_identical_outputs(tmp_path):
    model = build("bert")
    state = inject_adapters(model, _plan(shortcuts={"layer0.residual2": 2, "layer1.shortcut2": 3}))
    _fill(state.shortcuts.values())
    ids = torch.randint(3, 100, (2, 9))
    expected = _output(model.eval(), ids)
    save_adapter(model, tmp_path / "adapter")
    reloaded = build("bert")
    load_adapter(reloaded, tmp_path / "adapter")
    assert torch.equal(_output(reloaded.eval(), ids), expected)
    with pytest.raises(AdapterError, match="shortcut connections"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_shortcut_terms_join_the_residual_beside_the_sub_blocks_dropout(family):
    """A shortcut is a path beside the sub-block: training's residual dropout drops the sub-block's output,
    not the shortcut's term. With dropout 1 every sub-block output is dropped, so a block reduces to its
    shortcut terms: GPT-2 (pre-LN) h = x + dW1 x, out = h + dW2 h; BERT (post-LN) h = LN1(x + dW1 x),
    out = LN2(h + dW2 h)."""
    dropout = {"resid_pdrop": 1.0} if family == "gpt2" else {"hidden_dropout_prob": 1.0}
    model = build(family, **dropout).train()
    state = inject_adapters(model, _plan(shortcuts={"layer0.residual1": 2, "layer0.residual2": 3},
                                         targets=("o", "down") if family == "bert" else ("o",)))
    _fill(state.shortcuts.values())
    block = model.transformer.h[0] if family == "gpt2" else model.encoder.layer[0]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    first, second = state.shortcuts["layer0.residual1"], state.shortcuts["layer0.residual2"]
    with torch.no_grad():
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        if family == "gpt2":
            h = x + first(x)
            expected = h + second(h)
        else:
            h = block.attention.output.LayerNorm(x + first(x))
            expected = block.output.LayerNorm(h + second(h))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_olmo2_blocks_which_normalise_the_sub_block_outputs_are_refused():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError, match="without --shortcuts"):
        inject_adapters(model, _plan())


def test_a_block_layout_without_known_sums_is_refused_with_the_supported_families():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(AdapterError, match="without --shortcuts"):
        inject_adapters(model, _plan())


def test_shortcut_modules_live_in_their_blocks():
    model = build("gpt2")
    inject_adapters(model, _plan(shortcuts={"layer1.residual1": 2}, targets=("o",)))
    assert "residual1" in getattr(model.transformer.h[1], SHORTCUTS_ATTRIBUTE)


def _opt_layer_inputs(model, ids):
    """What each OPT decoder layer is called with (x_0 and the masks), captured from one base forward."""
    captured = []
    handles = [layer.register_forward_pre_hook(lambda _m, a, k: captured.append((a, k)), with_kwargs=True)
               for layer in model.model.decoder.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return captured


def test_post_ln_opt_shortcuts_join_the_sums_its_layernorms_normalise_beside_the_dropout():
    """OPT-350M (HeteroLoRA's model) is post-LN with a functional residual dropout. With dropout 1 every sub-block
    output is dropped, so each block reduces to its shortcut terms: h_l = LN1(x_l + dW1 x_l + dS2 h_{l-1}),
    out_l = LN2(h_l + dW2 h_l + dS1 x_l), written out here with the blocks' own LayerNorms."""
    model = build("opt", do_layer_norm_before=False, dropout=1.0).train()
    state = inject_adapters(model, _plan(targets=("q",)))
    _fill(state.shortcuts.values())
    ids = torch.randint(3, 100, (2, 7))
    shortcuts = state.shortcuts
    with torch.no_grad():
        x = _opt_layer_inputs(model, ids)[0][0][0]
        out = model.model.decoder(input_ids=ids).last_hidden_state
        for module in shortcuts.values():
            module.enabled = False  # the hooks stay quiet (they sit on the LayerNorms used below)
        previous_h = None
        for index, layer in enumerate(model.model.decoder.layers):
            total = x + shortcuts[f"layer{index}.residual1"](x)
            if previous_h is not None:
                total = total + shortcuts[f"layer{index}.shortcut2"](previous_h)
            h = layer.self_attn_layer_norm(total)
            x, previous_h = layer.final_layer_norm(
                h + shortcuts[f"layer{index}.residual2"](h) + shortcuts[f"layer{index}.shortcut1"](x)), h
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_opt_shortcuts_add_exactly_the_documented_terms(pre_ln):
    """Both OPT layouts, dropout off, every shortcut on, against the sums composed by hand from the block's own
    sub-modules: pre-LN h = x + Attn(LN1 x) + terms, out = h + FFN(LN2 h) + terms; post-LN with the LayerNorms
    around the sums instead."""
    model = build("opt", do_layer_norm_before=pre_ln, dropout=0.0)
    base = build("opt", do_layer_norm_before=pre_ln, dropout=0.0)
    state = inject_adapters(model, _plan(targets=("q",)))
    _fill([model.get_submodule(name) for name in state.module_names], seed=5, std=0.05)
    _fill(state.shortcuts.values())
    ids = torch.randint(3, 100, (2, 7))
    calls = _opt_layer_inputs(model, ids)

    def delta(name, h):
        module = state.shortcuts.get(name)
        return 0 if module is None else module(h)

    with torch.no_grad():
        ours = model.model.decoder(input_ids=ids).last_hidden_state
        for module in state.shortcuts.values():
            module.enabled = False  # the hooks stay quiet: every term below is added by hand
        x, previous_h = calls[0][0][0], None
        for index, layer in enumerate(model.model.decoder.layers):
            kwargs = {k: v for k, v in calls[index][1].items() if k != "hidden_states"}
            attention_in = layer.self_attn_layer_norm(x) if pre_ln else x
            attention, _ = layer.self_attn(hidden_states=attention_in, **kwargs)
            total = x + attention + delta(f"layer{index}.residual1", x) + delta(f"layer{index}.shortcut2", previous_h)
            h = total if pre_ln else layer.self_attn_layer_norm(total)
            ffn = layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h) if pre_ln else h)))
            out = h + ffn + delta(f"layer{index}.residual2", h) + delta(f"layer{index}.shortcut1", x)
            x, previous_h = (out if pre_ln else layer.final_layer_norm(out)), h
        if pre_ln:
            x = model.model.decoder.final_layer_norm(x)
        assert not torch.allclose(ours, base.model.decoder(input_ids=ids).last_hidden_state, atol=1e-3)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_post_ln_opt_with_every_shortcut_on_at_initialisation_is_the_base_function():
    ids = torch.randint(3, 100, (2, 9))
    expected = _output(build("opt", do_layer_norm_before=False), ids)
    model = build("opt", do_layer_norm_before=False)
    inject_adapters(model, _plan(targets=("o",)))
    assert torch.equal(_output(model, ids), expected)


def test_a_bart_decoder_block_is_not_taken_for_an_opt_block():
    """BART's decoder blocks have OPT's modules (self_attn.out_proj, fc1, fc2, final_layer_norm) but are post-LN
    without OPT's do_layer_norm_before: wired as a pre-LN OPT, the FFN terms would join after its LayerNorm."""
    from transformers import BartConfig, BartForCausalLM

    model = BartForCausalLM(BartConfig(vocab_size=64, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                       decoder_ffn_dim=48, max_position_embeddings=64))
    with pytest.raises(AdapterError, match="OPT blocks, not BartDecoderLayer"):
        inject_adapters(model, _plan(targets=("o",)))
