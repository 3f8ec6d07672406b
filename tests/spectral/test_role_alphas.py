"""A layer's alpha per role: the mean over the block's fitted matrices of that role (a mixture: every expert's)."""

from __future__ import annotations

import io
import statistics

import pytest
import torch
import transformers

import alphalora
from alphalora.cli import print_layer_table
from alphalora.spectral import MatrixReport, SpectralReport
from alphalora.spectral.report import layer_scores

METRICS = ("num_fit_evals", "D", "xmin", "sigma", "num_pl_spikes", "lambda_max", "norm", "log_norm",
           "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "matrix_rank", "entropy")


def _matrix(name: str, role: str, alpha: float | None, status: str = "success", layer: int = 0) -> MatrixReport:
    return MatrixReport(name=name, layer=layer, role=role, kind="linear", shape=[8, 8], num_evals=8, alpha=alpha,
                        status=status, **dict.fromkeys(METRICS))


def _moe_block() -> list[MatrixReport]:
    """Block 0 of a mixture with 4 experts: attention q, the router, and each expert's gate."""
    prefix = "model.layers.0.mlp"
    return [
        _matrix("model.layers.0.self_attn.q_proj", "q", 2.5),
        _matrix(f"{prefix}.gate", "router", 6.0),
        _matrix(f"{prefix}.experts.0.gate_proj", "gate", 2.0),
        _matrix(f"{prefix}.experts.1.gate_proj", "gate", 3.0),
        _matrix(f"{prefix}.experts.2.gate_proj", "gate", 5.5),
        # Left out of the role's mean as of the layer's: no usable fit.
        _matrix(f"{prefix}.experts.3.gate_proj", "gate", 40.0, status="degenerate: flat tail"),
        _matrix(f"{prefix}.experts.4.gate_proj", "gate", None, status="failed: weight has NaN or Inf values"),
    ]


def test_a_roles_alpha_is_the_mean_over_its_fitted_matrices_by_hand():
    (layer,) = layer_scores(_moe_block())
    # gate: (2.0 + 3.0 + 5.5) / 3 = 3.5; the layer: (2.5 + 6.0 + 2.0 + 3.0 + 5.5) / 5 = 3.8.
    assert layer.alphas_by_role == {"q": 2.5, "router": 6.0, "gate": 3.5}
    assert layer.n_matrices == 5 and layer.alpha == pytest.approx(3.8, abs=1e-12)
    # Whatever the layer's aggregation, a role's alpha is its mean.
    assert layer_scores(_moe_block(), "max")[0].alphas_by_role["gate"] == 3.5


def test_a_role_without_any_fit_is_absent():
    block = [m for m in _moe_block() if m.role != "gate" or not m.ok]
    assert layer_scores(block)[0].alphas_by_role == {"q": 2.5, "router": 6.0}


def test_the_table_prints_each_roles_mean():
    report = SpectralReport(model="moe", estimator="xmin_peak", precision="fp64", device="cpu", aggregation="mean",
                            options={}, matrices=_moe_block(), layers=layer_scores(_moe_block()))
    out = io.StringIO()
    print_layer_table(report, out)
    header, row = (line.split() for line in out.getvalue().splitlines()[:2])
    assert header == ["layer", "alpha", "(mean)", "matrices", "q", "router", "gate"]
    assert row == ["0", "3.800", "5", "2.500", "6.000", "3.500"]


def test_a_live_mixtrals_gate_alpha_is_the_mean_over_its_experts():
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    report = alphalora.analyze(transformers.MixtralForCausalLM(config), precision="fp64", progress=False)
    for layer in report.layers:
        for role in ("q", "router", "gate", "up", "down"):
            members = [m.alpha for m in report.matrices if m.layer == layer.layer and m.role == role and m.ok]
            assert len(members) == (4 if role in ("gate", "up", "down") else 1)
            assert layer.alphas_by_role[role] == statistics.fmean(members)
        gates = [m.alpha for m in report.matrices if m.layer == layer.layer and m.role == "gate"]
        assert len(set(gates)) == 4  # distinct experts: the last one alone (the old value) would not be the mean
        assert layer.alphas_by_role["gate"] != gates[-1]
