"""The model walk: names, blocks, roles and orientation over every supported family."""

from __future__ import annotations

import shutil

import pytest
import torch

import alphalora
from tests.tiny_models import EXPECTED_ROLES, FAMILIES, build


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_matrix_is_found_with_its_role(family, tmp_path):
    model = build(family)
    report = alphalora.analyze(model, estimator="median", precision="fp64", progress=False)
    in_blocks = [m for m in report.matrices if m.layer is not None]
    assert {m.layer for m in in_blocks} == {0, 1}
    for layer in (0, 1):
        assert {m.role for m in in_blocks if m.layer == layer} == EXPECTED_ROLES[family]
    # Module names are the model's own, so users can find them with get_submodule.
    for m in report.matrices:
        weight = model.get_submodule(m.name).weight
        assert sorted(weight.shape) == sorted(m.shape)
    assert not any(m.kind == "embedding" for m in report.matrices)
    assert [layer.layer for layer in report.layers] == [0, 1]
    for layer in report.layers:
        alphas = [m.alpha for m in in_blocks if m.layer == layer.layer]
        assert layer.alpha == pytest.approx(sum(alphas) / len(alphas))
        assert layer.n_matrices == len(alphas)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reading_the_saved_folder_equals_the_live_model(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path)
    live = alphalora.analyze(model, estimator="ww", precision="fp64", progress=False)
    disk = alphalora.analyze(tmp_path, estimator="ww", precision="fp64", progress=False)
    assert {m.name: (m.layer, m.role, tuple(m.shape)) for m in disk.matrices} == {
        m.name: (m.layer, m.role, tuple(m.shape)) for m in live.matrices
    }
    alphas = {m.name: m.alpha for m in live.matrices}
    for m in disk.matrices:
        assert m.alpha == pytest.approx(alphas[m.name], abs=1e-10)


def test_gpt2_conv1d_is_read_as_out_by_in(tmp_path):
    model = build("gpt2")
    model.save_pretrained(tmp_path)
    bare = tmp_path / "weights-only"  # a checkpoint without its config.json: GPT-2's names say Conv1D
    bare.mkdir()
    shutil.copy(tmp_path / "model.safetensors", bare / "model.safetensors")
    for source in (model, tmp_path, bare):
        report = alphalora.analyze(source, precision="fp64", progress=False)
        shapes = {m.name.split(".", 1)[-1] if m.name.startswith("transformer.") else m.name: m.shape
                  for m in report.matrices}
        assert shapes["h.0.attn.c_attn"] == [96, 32]  # (out = 3 * hidden, in = hidden)
        assert shapes["h.0.mlp.c_fc"] == [128, 32]
        assert shapes["h.0.mlp.c_proj"] == [32, 128]
        assert {m.kind for m in report.matrices} == {"conv1d"}


def test_embeddings_only_on_request():
    model = build("llama")
    plain = alphalora.analyze(model, progress=False)
    full = alphalora.analyze(model, include_embeddings=True, progress=False)
    extra = {m.name for m in full.matrices} - {m.name for m in plain.matrices}
    assert extra == {"model.embed_tokens", "lm_head"} or extra == {"model.embed_tokens"}
    assert all(m.kind == "embedding" for m in full.matrices if m.name in extra)


def test_sharded_safetensors_checkpoint_is_read(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    report = alphalora.analyze(tmp_path, precision="fp64", progress=False)
    assert len([m for m in report.matrices if m.layer is not None]) == 14


@pytest.mark.parametrize("stale", ["complete", "shards deleted"])
def test_a_single_file_saved_over_an_older_sharded_checkpoint_is_what_is_read(tmp_path, stale):
    """Oracle: transformers' own choice. Saving a model unsharded into a folder that held a sharded save leaves the
    old index (transformers deletes only the shards); `from_pretrained` loads model.safetensors, and so must the
    analysis: it read the stale shards where they were still there, and refused the folder where they were not."""
    from transformers import AutoModelForCausalLM

    old, new = build("llama", seed=1), build("llama", seed=2)
    old.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    new.save_pretrained(tmp_path)
    if stale == "complete":  # (an older tool that left the shards too)
        old.save_pretrained(tmp_path / "old", max_shard_size="20KB")
        for shard in sorted((tmp_path / "old").glob("model-*.safetensors")):
            shutil.copy(shard, tmp_path / shard.name)
    assert (tmp_path / "model.safetensors.index.json").exists() and all(s.exists() == (stale == "complete")
                                                                         for s in shards)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.model.layers[0].mlp.up_proj.weight, new.model.layers[0].mlp.up_proj.weight)
    from_folder = alphalora.analyze(tmp_path, precision="fp64", progress=False)
    from_model = alphalora.analyze(new, precision="fp64", progress=False)
    assert sorted((m.name, m.alpha) for m in from_folder.matrices) == sorted((m.name, m.alpha)
                                                                             for m in from_model.matrices)


@pytest.mark.parametrize("aggregation", ["median", "min", "max"])
def test_other_layer_aggregations(aggregation):
    import statistics

    report = alphalora.analyze(build("llama"), aggregation=aggregation, progress=False)
    rule = {"median": statistics.median, "min": min, "max": max}[aggregation]
    for layer in report.layers:
        alphas = [m.alpha for m in report.matrices if m.layer == layer.layer]
        assert layer.alpha == pytest.approx(rule(alphas))


def test_bf16_checkpoint_is_read(tmp_path):
    model = build("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    report = alphalora.analyze(tmp_path, progress=False)
    assert all(m.ok for m in report.matrices)


def _t5_config(**overrides):
    import transformers

    return transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, **overrides)


def _encoder_decoders():
    import transformers

    torch.manual_seed(0)
    bart = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                   decoder_ffn_dim=48, max_position_embeddings=64)
    return {
        "t5": (transformers.T5ForConditionalGeneration(_t5_config()), "decoder.block.N, encoder.block.N"),
        "bart": (transformers.BartModel(bart), "decoder.layers.N, encoder.layers.N"),
    }


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_models_are_refused_live_and_on_disk(family, tmp_path):
    from alphalora.spectral import AnalysisError

    model, stacks = _encoder_decoders()[family]
    model.save_pretrained(tmp_path)
    for source in (model, tmp_path):
        with pytest.raises(AnalysisError, match=rf"has 2 stacks of numbered blocks \({stacks}\), as encoder-decoder "
                                                r"models \(T5, BART\) do.*decoder-only LMs .* encoder-only"):
            alphalora.analyze(source, progress=False)


def test_one_stack_of_t5_is_analysed_without_its_attention_bias_table(tmp_path):
    import transformers

    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(_t5_config())
    encoder.save_pretrained(tmp_path)
    for source in (encoder, tmp_path, encoder.get_encoder()):
        report = alphalora.analyze(source, estimator="median", precision="fp64", progress=False)
        assert [layer.layer for layer in report.layers] == [0, 1]
        assert not any("relative_attention_bias" in m.name for m in report.matrices)
        assert {m.role for m in report.matrices if m.layer == 0} == {"q", "k", "v", "o", "wi", "wo"}
    with_tables = alphalora.analyze(tmp_path, include_embeddings=True, progress=False)
    table = next(m for m in with_tables.matrices if m.name.endswith("relative_attention_bias"))
    assert table.kind == "embedding" and table.shape == [32, 4]  # buckets x heads, a lookup table


def _fits(report):
    return [(m.name, m.layer, m.role, m.shape, m.alpha, m.D, m.xmin) for m in report.matrices]


def _our_adapter(model, router=None):
    """MoE-LoRA with per-module or shared routers; without a router, HeteroLoRA's with shortcut connections."""
    from alphalora.allocation import Plan
    from alphalora.allocation.plan import all_shortcut_names
    from tests.tiny_models import with_random_adapter

    common = {"base_model": "tiny", "target_modules": ["q", "v", "down"], "rank": 4, "lora_alpha": 8.0,
              "lora_dropout": 0.0}
    if router is None:
        plan = Plan(method="hetero", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                    shortcuts=dict.fromkeys(all_shortcut_names(2), 4), **common)
    else:
        plan = Plan(method="uniform", experts_per_layer=[3, 2], top_k_per_layer=[2, 1], router={"type": router},
                    **common)
    return with_random_adapter(model, plan)


def _peft_adapter(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("adapter", ["ours", "ours-shared-router", "ours-shortcuts", "peft", "compiled"])
def test_a_model_with_adapters_is_analysed_as_its_base(adapter):
    """The oracle: the same base model without the adapter. Its routers, experts, shortcuts, PEFT's lora_A/B
    and wrapper prefixes must not enter the report or the layer alphas."""
    plain = alphalora.analyze(build("llama"), include_embeddings=True, progress=False)
    model = build("llama")
    if adapter == "ours":
        model = _our_adapter(model, "per_module")
    elif adapter == "ours-shared-router":
        model = _our_adapter(model, "shared")
    elif adapter == "ours-shortcuts":
        model = _our_adapter(model)
    elif adapter == "peft":
        model = _peft_adapter(model)
    else:
        model = torch.compile(_our_adapter(model, "per_module"))
    adapted = alphalora.analyze(model, include_embeddings=True, progress=False)
    assert _fits(adapted) == _fits(plain)
    assert adapted.layer_alphas() == plain.layer_alphas()


def test_an_adapter_saved_beside_the_base_weights_is_not_analysed_as_the_model(tmp_path):
    """PEFT's (and this project's) adapter_model.safetensors often sits in the base model's folder: transformers
    loads model.safetensors alone, and so does the analysis."""
    from safetensors.torch import save_file

    from tests.tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path / "m", initializer_range=0.2)
    alone = alphalora.analyze(folder, estimator="median", progress=False)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, 32), f"{prefix}.lora_B.weight": torch.randn(32, 4)},
              str(folder / "adapter_model.safetensors"))
    beside = alphalora.analyze(folder, estimator="median", progress=False)
    assert [(m.name, m.alpha) for m in beside.matrices] == [(m.name, m.alpha) for m in alone.matrices]
