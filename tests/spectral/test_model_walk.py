"""The model walk: names, blocks, roles and orientation over every supported family."""

from __future__ import annotations

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
    for source in (model, tmp_path):
        report = alphalora.analyze(source, precision="fp64", progress=False)
        shapes = {m.name.split(".", 1)[-1] if m.name.startswith("transformer.") else m.name: m.shape
                  for m in report.matrices}
        assert shapes["h.0.attn.c_attn"] == [96, 32]  # (out = 3 * hidden, in = hidden)
        assert shapes["h.0.mlp.c_fc"] == [128, 32]
        assert shapes["h.0.mlp.c_proj"] == [32, 128]


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
