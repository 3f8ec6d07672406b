"""Mixture-of-experts models: every expert's matrix is analysed, live and from either checkpoint format.

transformers 5 keeps the experts as fused 3-D parameters (`mlp.experts.gate_up_proj`, `down_proj`); its
save_pretrained writes Mixtral, Qwen3-MoE and OLMoE per expert (Mixtral in its original `w1`/`w2`/`w3` names)
and GPT-OSS fused, [E, in, out] with gate and up interleaved.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import alphalora
from alphalora.spectral.roles import expert_index, role_of
from alphalora.spectral.weights import checkpoint_weights, module_weights

COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
)
NUM_EXPERTS = 4
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=NUM_EXPERTS)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=NUM_EXPERTS, moe_intermediate_size=40)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_experts=NUM_EXPERTS, pad_token_id=1, bos_token_id=None, eos_token_id=2)),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(num_local_experts=NUM_EXPERTS, head_dim=8)),
}
ROUTER_LEAF = {"mixtral": "gate", "qwen3_moe": "gate", "olmoe": "gate", "gpt_oss": "router"}


def build(family: str, seed: int = 0) -> nn.Module:
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**COMMON, **extra})).eval()
    if family == "gpt_oss":  # its biases start at zero: give the expert oracle something to add
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.5)
                layer.mlp.experts.down_proj_bias.normal_(0, 0.5)
    return model


def _experts(model: nn.Module, layer: int) -> nn.Module:
    return model.model.layers[layer].mlp.experts


def _key(m) -> tuple:
    """What a matrix is, whatever a checkpoint calls it: its block, role and expert."""
    return (m.layer, m.role, expert_index(m.name))


# (a) Each expert's entry is the linear map transformers applies for that expert.


def _expert_output(family: str, experts: nn.Module, gate, up, down, x: torch.Tensor, e: int) -> torch.Tensor:
    """What expert e computes, from the three matrices as linear maps y = x @ W.T and the family's activation."""
    g, u = x @ gate.T, x @ up.T
    if family == "gpt_oss":  # GptOssExperts: biases, clamps, (up + 1) * gate * sigmoid(alpha * gate)
        bias = experts.gate_up_proj_bias[e]
        g, u = g + bias[::2], u + bias[1::2]
        g = g.clamp(max=experts.limit)
        u = u.clamp(min=-experts.limit, max=experts.limit)
        hidden = (u + 1) * g * torch.sigmoid(g * experts.alpha)
        return hidden @ down.T + experts.down_proj_bias[e]
    return (experts.act_fn(g) * u) @ down.T


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_expert_entry_is_the_linear_map_its_expert_applies(family, implementation):
    model = build(family).double()
    model.set_experts_implementation(implementation)
    entries = {e.name: e for e in module_weights(model)}
    x = 3 * torch.randn(6, COMMON["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for layer in range(COMMON["num_hidden_layers"]):
        experts = _experts(model, layer)
        prefix = f"model.layers.{layer}.mlp.experts"
        for e in range(NUM_EXPERTS):
            mats = {proj: entries[f"{prefix}.{e}.{proj}"] for proj in ("gate_proj", "up_proj", "down_proj")}
            for proj, entry in mats.items():
                assert (entry.layer, entry.expert, entry.role, entry.kind) == (layer, e, proj[:-5], "linear")
                assert tuple(entry.load().shape) == entry.shape
            assert mats["gate_proj"].shape == mats["up_proj"].shape == mats["down_proj"].shape[::-1]
            assert mats["down_proj"].shape[0] == COMMON["hidden_size"]  # (out, in): down maps back to hidden
            # Route every token to expert e alone, with weight 1: the module's output is that expert's.
            index = torch.full((x.shape[0], 1), e)
            with torch.no_grad():
                expected = experts(x, index, torch.ones(x.shape[0], 1, dtype=torch.float64))
                ours = _expert_output(family, experts, *(m.load() for m in mats.values()), x, e)
            torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert sum(entry.expert is not None for entry in entries.values()) == 2 * NUM_EXPERTS * 3


def test_gate_and_up_swapped_would_be_caught():
    # The oracle tells gate from up (silu(g) * u is not silu(u) * g at these input sizes).
    model = build("mixtral").double()
    model.set_experts_implementation("eager")
    experts = _experts(model, 0)
    entries = {e.name: e for e in module_weights(model)}
    prefix = "model.layers.0.mlp.experts.1"
    gate, up, down = (entries[f"{prefix}.{p}"].load() for p in ("gate_proj", "up_proj", "down_proj"))
    x = 3 * torch.randn(6, COMMON["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        expected = experts(x, torch.full((6, 1), 1), torch.ones(6, 1, dtype=torch.float64))
    assert not torch.allclose(_expert_output("mixtral", experts, up, gate, down, x, 1), expected, rtol=1e-6)


# (b) A live model and the checkpoint save_pretrained writes give the same matrices and alphas.


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_checkpoint_gives_the_live_models_analysis(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path)
    live = alphalora.analyze(model, precision="fp64", progress=False)
    disk = alphalora.analyze(tmp_path, precision="fp64", progress=False)
    assert len({_key(m) for m in live.matrices}) == len(live.matrices)  # (block, role, expert) names one matrix
    assert {_key(m): (tuple(m.shape), m.kind, m.alpha, m.status) for m in disk.matrices} == {
        _key(m): (tuple(m.shape), m.kind, m.alpha, m.status) for m in live.matrices
    }
    if family != "mixtral":  # Mixtral's checkpoint has its own names (block_sparse_moe.experts.N.w1): test below
        assert sorted(m.name for m in disk.matrices) == sorted(m.name for m in live.matrices)
    assert [(x.layer, x.alpha, x.n_matrices) for x in disk.layers] == [
        (x.layer, x.alpha, x.n_matrices) for x in live.layers
    ]
    for layer in live.layers:
        members = [m for m in live.matrices if m.layer == layer.layer]
        roles = sorted(m.role for m in members)
        assert roles == sorted(["q", "k", "v", "o", "router"] + ["gate", "up", "down"] * NUM_EXPERTS)
        # A layer's alpha is the mean over all its fitted matrices, every expert's included.
        fitted = [m.alpha for m in members if m.ok]
        assert len(fitted) >= 4 + 3 * NUM_EXPERTS and layer.n_matrices == len(fitted)
        assert layer.alpha == pytest.approx(sum(fitted) / len(fitted), rel=1e-12)


def test_router_has_its_own_role_live_and_on_disk(tmp_path):
    for family in ("mixtral", "gpt_oss"):
        model = build(family)
        model.save_pretrained(tmp_path / family)
        for entries in (module_weights(model), checkpoint_weights(tmp_path / family)):
            routers = [e for e in entries if e.role == "router"]
            assert [e.layer for e in routers] == [0, 1]
            assert all(e.shape == (NUM_EXPERTS, COMMON["hidden_size"]) and e.expert is None for e in routers)
            assert not any(e.role == "gate" and e.expert is None for e in entries)


# (c) The original Mixtral checkpoint format, written by hand from the fused weights.


def _mixtral_per_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in Mixtral's original names: block_sparse_moe, per-expert w1 (gate), w2 (down), w3 (up)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." in key:
            continue
        state[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value.contiguous()
    for layer in range(COMMON["num_hidden_layers"]):
        experts = _experts(model, layer)
        for e in range(NUM_EXPERTS):
            # MixtralExperts: gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1); F.linear(h, down_proj[e])
            gate, up = experts.gate_up_proj.detach()[e].chunk(2, dim=0)
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            state[f"{prefix}.w1.weight"] = gate.contiguous()
            state[f"{prefix}.w3.weight"] = up.contiguous()
            state[f"{prefix}.w2.weight"] = experts.down_proj.detach()[e].contiguous()
    return state


def test_mixtral_per_expert_checkpoint_gives_the_fused_live_models_alphas(tmp_path):
    model = build("mixtral")
    save_file(_mixtral_per_expert_state(model), tmp_path / "model.safetensors")
    model.config.to_json_file(tmp_path / "config.json")
    live = alphalora.analyze(model, precision="fp64", progress=False)
    disk = alphalora.analyze(tmp_path, precision="fp64", progress=False)
    leaves = {m.name.rsplit(".", 1)[-1]: m.role for m in disk.matrices if m.layer == 0 and "experts" in m.name}
    assert leaves == {"w1": "gate", "w2": "down", "w3": "up"}
    assert {m.name: m.role for m in disk.matrices}["model.layers.1.block_sparse_moe.gate"] == "router"
    assert {_key(m): (tuple(m.shape), m.alpha) for m in disk.matrices} == {
        _key(m): (tuple(m.shape), m.alpha) for m in live.matrices
    }
    assert [x.alpha for x in disk.layers] == [x.alpha for x in live.layers]


def test_w1_means_gate_only_inside_an_experts_module():
    assert role_of("model.layers.0.block_sparse_moe.experts.3.w1") == "gate"
    assert role_of("model.layers.0.block_sparse_moe.experts.3.w2") == "down"
    assert role_of("model.layers.0.block_sparse_moe.experts.3.w3") == "up"
    assert role_of("model.layers.0.mlp.w1") == "w1"  # another model's w1 keeps its name
    assert role_of("transformer.h.0.mlp.experts.w1") == "w1"  # no expert index: not a per-expert matrix
    assert expert_index("model.layers.0.mlp.experts.12.down_proj") == 12
    assert expert_index("model.layers.0.mlp.shared_expert.down_proj") is None


# The transformers 5 fused format on disk, in either orientation, with and without transformers' flags.


@pytest.mark.parametrize("layout", ["fused", "fused, no config", "fused transposed, no config"])
def test_fused_checkpoint_is_read_expert_by_expert(layout, tmp_path):
    model = build("mixtral")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if "transposed" in layout:  # Llama 4's layout: gate_up [E, H, 2I], down [E, I, H], applied as x @ W[e]
        state = {k: v.transpose(1, 2).contiguous() if v.dim() == 3 else v for k, v in state.items()}
    save_file(state, tmp_path / "model.safetensors")
    if "no config" not in layout:
        model.config.to_json_file(tmp_path / "config.json")
    live = alphalora.analyze(model, precision="fp64", progress=False)
    disk = alphalora.analyze(tmp_path, precision="fp64", progress=False)
    assert {m.name: (m.role, tuple(m.shape), m.alpha) for m in disk.matrices} == {
        m.name: (m.role, tuple(m.shape), m.alpha) for m in live.matrices
    }
    live_tensors = {e.name: e.load() for e in module_weights(model)}
    for entry in checkpoint_weights(tmp_path):
        assert torch.equal(entry.load(), live_tensors[entry.name]), entry.name


def test_undecorated_transposed_experts_module_is_read_by_its_shapes():
    # Llama4TextExperts sets no transformers flags: gate_up [E, H, 2I] with down [E, I, H] can only be x @ W[e].
    class Experts(nn.Module):
        def __init__(self, gate_up, down):
            super().__init__()
            self.gate_up_proj, self.down_proj = nn.Parameter(gate_up), nn.Parameter(down)

    model = build("mixtral")
    for layer in model.model.layers:
        fused = layer.mlp.experts
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        layer.mlp.experts = Experts(gate_up.transpose(1, 2), down.transpose(1, 2))
    reference = {e.name: e.load() for e in module_weights(build("mixtral"))}
    entries = module_weights(model)
    assert sum(e.expert is not None for e in entries) == 2 * NUM_EXPERTS * 3
    assert [e.name for e in entries] == list(reference)
    for entry in entries:
        assert torch.equal(entry.load(), reference[entry.name]), entry.name


# (d) Each expert's alpha is WeightWatcher's for an nn.Linear holding that expert's matrix.


def _slices(family: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Each expert's (out, in) matrices, sliced as the family's forward reads them."""
    found = {}
    for layer in range(COMMON["num_hidden_layers"]):
        experts = _experts(model, layer)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        for e in range(NUM_EXPERTS):
            if family == "gpt_oss":  # x @ gate_up_proj[e], gate = [..., ::2], up = [..., 1::2]; h @ down_proj[e]
                gate, up, down_e = gate_up[e][:, ::2].T, gate_up[e][:, 1::2].T, down[e].T
            else:  # F.linear(x, gate_up_proj[e]).chunk(2, dim=-1); F.linear(h, down_proj[e])
                (gate, up), down_e = gate_up[e].chunk(2, dim=0), down[e]
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            found.update({f"{prefix}.gate_proj": gate, f"{prefix}.up_proj": up, f"{prefix}.down_proj": down_e})
    return found


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_alphas_equal_weightwatchers_on_each_expert_as_a_linear(family):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = build(family)
    slices = _slices(family, model)
    names = list(slices)
    holder = nn.Module()
    holder.experts = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in slices.values())
    with torch.no_grad():
        for linear, weight in zip(holder.experts, slices.values(), strict=True):
            linear.weight.copy_(weight)
    with contextlib.redirect_stdout(io.StringIO()):
        frame = ww.WeightWatcher(model=holder).analyze()
    theirs = {names[int(row["longname"].rsplit(".", 1)[-1])]: row["alpha"] for _, row in frame.iterrows()}
    assert set(theirs) == set(names)
    report = alphalora.analyze(model, estimator="ww", precision="fp64", progress=False)
    ours = {m.name: m for m in report.matrices if expert_index(m.name) is not None}
    assert set(ours) == set(names)
    for name, alpha in theirs.items():
        assert ours[name].status == "success" and ours[name].alpha == pytest.approx(alpha, abs=1e-8), name


def test_saved_config_has_the_fused_layout_transformers_declares(tmp_path):
    # GPT-OSS on disk is fused [E, in, out] and interleaved: only transformers' flags tell the interleaving.
    model = build("gpt_oss")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt_oss"
    live = {e.name: e.load() for e in module_weights(model)}
    for entry in checkpoint_weights(tmp_path):
        assert torch.equal(entry.load(), live[entry.name]), entry.name
