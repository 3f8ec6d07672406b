"""The plugin's per-slice mixtures reproduce the training layer's MoE-LoRA deltas in vLLM's fused, sharded layout.

No vLLM needed: the vLLM linears are stood in for by their layout attributes, and the oracle is
MoELoRALinear (training and the native engine) on the same saved adapter, at tensor-parallel sizes 1 and 2.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from alphalora.serving.vllm.mixture import build_mixtures
from tests.serving.vllm_helpers import VLLM_TINY, own_adapter
from tests.tiny_models import build

HIDDEN, INTER, HEADS, KV_HEADS, HEAD = 128, 256, 2, 1, 64


def _linears(tp: int, rank: int, prefix: str = "model.layers.0") -> dict:
    """vLLM's layout attributes of block 0's linears on one tensor-parallel rank."""
    kv = max(1, KV_HEADS // tp)
    qkv_width = (HEADS // tp + 2 * kv) * HEAD
    return {
        f"{prefix}.self_attn.qkv_proj": SimpleNamespace(tp_rank=rank, tp_size=tp, num_heads=HEADS // tp, head_size=HEAD,
                                                        num_kv_heads=kv, num_kv_head_replicas=max(1, tp // KV_HEADS),
                                                        total_num_heads=HEADS, total_num_kv_heads=KV_HEADS,
                                                        output_size_per_partition=qkv_width),
        f"{prefix}.mlp.gate_up_proj": SimpleNamespace(tp_rank=rank, tp_size=tp, output_sizes=[INTER, INTER],
                                                      output_size_per_partition=2 * INTER // tp),
        f"{prefix}.self_attn.o_proj": SimpleNamespace(tp_rank=rank, tp_size=tp, output_size=HIDDEN,
                                                      input_size_per_partition=HIDDEN // tp),
        f"{prefix}.mlp.down_proj": SimpleNamespace(tp_rank=rank, tp_size=tp, output_size=HIDDEN,
                                                   input_size_per_partition=INTER // tp),
    }


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = own_adapter(tmp_path_factory.mktemp("mix") / "moe", "llama", (3, 2), rank_pattern={"v": 2, "up": 8})
    from alphalora.adapters.io import load_adapter, read_adapter_config

    model = build("llama", 0, **VLLM_TINY)
    load_adapter(model, folder)
    return read_adapter_config(folder), load_file(str(folder / "adapter_model.safetensors")), model


def _mixtures(adapter, tp: int, rank: int, all_reduce=None, dtype=torch.float32):
    config, tensors, _ = adapter
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    built = build_mixtures(config["module_names"], shapes, config["plan"], _linears(tp, rank), dtype, all_reduce)
    for mixture in built.values():
        for spec, module in zip(mixture.specs, mixture.mixtures, strict=True):
            module.load(spec, tensors[f"{spec.name}.lora_A"], tensors[f"{spec.name}.lora_B"],
                        tensors.get(f"{spec.name}.router.weight"))
    return built


@pytest.fixture(scope="module")
def phi3_adapter(tmp_path_factory):
    """Phi-3's own fused qkv_proj and gate_up_proj adapted as wholes (one router each), as vLLM fuses them."""
    folder = own_adapter(tmp_path_factory.mktemp("mix") / "phi3", "phi3", (3, 2), rank_pattern={"qkv": 2},
                         targets=("qkv", "o", "gate_up", "down"))
    from alphalora.adapters.io import load_adapter, read_adapter_config

    model = build("phi3", 0, **VLLM_TINY)
    load_adapter(model, folder)
    return read_adapter_config(folder), load_file(str(folder / "adapter_model.safetensors")), model


def _native_delta(model, name: str, x: torch.Tensor) -> torch.Tensor:
    layer = model.get_submodule(f"model.layers.0.{name}")
    with torch.no_grad():
        return layer(x) - layer.base(x)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_and_gate_up_slices_each_get_their_own_modules_mixture(adapter, tp):
    model = adapter[2]
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(0))
    q, k, v = (_native_delta(model, f"self_attn.{m}_proj", x) for m in "qkv")
    gate, up = (_native_delta(model, f"mlp.{m}_proj", x) for m in ("gate", "up"))
    for rank in range(tp):
        built = _mixtures(adapter, tp, rank)
        q_rows = slice(rank * HEADS // tp * HEAD, (rank + 1) * HEADS // tp * HEAD)  # one KV head: replicated
        expected = torch.cat([q[:, q_rows], k, v], dim=1)
        torch.testing.assert_close(built["model.layers.0.self_attn.qkv_proj"].delta(x), expected)
        rows = slice(rank * INTER // tp, (rank + 1) * INTER // tp)
        expected = torch.cat([gate[:, rows], up[:, rows]], dim=1)
        torch.testing.assert_close(built["model.layers.0.mlp.gate_up_proj"].delta(x), expected)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_module_fused_as_vllm_fuses_it_keeps_one_mixture_across_its_slices(phi3_adapter, tp):
    """Phi-3's qkv_proj (rows q, k, v) and gate_up_proj (gate, up): each rank holds its share of every part, all
    gated by the module's one router."""
    model = phi3_adapter[2]
    x = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(0))
    qkv = _native_delta(model, "self_attn.qkv_proj", x)
    q, k, v = qkv.split([HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], dim=1)
    gate, up = _native_delta(model, "mlp.gate_up_proj", x).split([INTER, INTER], dim=1)
    for rank in range(tp):
        built = _mixtures(phi3_adapter, tp, rank)
        assert [len(m.mixtures) for m in built.values()] == [1, 1, 1, 1]
        q_rows = slice(rank * HEADS // tp * HEAD, (rank + 1) * HEADS // tp * HEAD)  # one KV head: replicated
        # (float32 sums in another order: deltas of order 1 agree to 1e-5 relative)
        torch.testing.assert_close(built["model.layers.0.self_attn.qkv_proj"].delta(x),
                                   torch.cat([q[:, q_rows], k, v], dim=1), rtol=1e-4, atol=1e-5)
        rows = slice(rank * INTER // tp, (rank + 1) * INTER // tp)
        torch.testing.assert_close(built["model.layers.0.mlp.gate_up_proj"].delta(x),
                                   torch.cat([gate[:, rows], up[:, rows]], dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,width", [("self_attn.o_proj", HIDDEN), ("mlp.down_proj", INTER)])
def test_row_parallel_modules_reduce_partials_before_routing_across_two_ranks(adapter, name, width):
    model = adapter[2]
    x = torch.randn(5, width, generator=torch.Generator().manual_seed(1))
    halves = x.chunk(2, dim=1)
    other = _mixtures(adapter, 2, 1)[f"model.layers.0.{name}"].mixtures[0]
    built = _mixtures(adapter, 2, 0, all_reduce=lambda partials: partials + other.partials(halves[1]))
    delta = built[f"model.layers.0.{name}"].delta(halves[0])
    torch.testing.assert_close(delta, _native_delta(model, name, x))


def test_forward_hook_adds_the_delta_to_a_linear_that_returns_output_and_bias(adapter):
    model = adapter[2]
    built = _mixtures(adapter, 1, 0)["model.layers.0.self_attn.o_proj"]
    x = torch.randn(3, HIDDEN)
    base = torch.randn(3, HIDDEN)
    out, bias = built.hook(None, (x,), (base, None))
    torch.testing.assert_close(out, base + _native_delta(model, "self_attn.o_proj", x))
    assert bias is None


def _close_at_bfloat16_scale(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16 keeps 8 significant bits: allow 2^-6 of the largest delta (a routing choice that differed
    would be off by the size of an expert's whole contribution)."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2 ** -6 * float(want.abs().max()))


@pytest.mark.parametrize("tp", [1, 2])
def test_bfloat16_mixtures_equal_the_training_layer_to_bfloat16_rounding(adapter, tp):
    """vLLM serves in bfloat16 on GPUs: the plugin's deltas with bfloat16 weights, router logits and (across
    ranks) partial sums, gates in float32, against the training layer in float32 on the same inputs."""
    model = adapter[2]
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x_inter = torch.randn(16, INTER, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for rank in range(tp):
        built = _mixtures(adapter, tp, rank, dtype=torch.bfloat16)
        q_rows = slice(rank * HEADS // tp * HEAD, (rank + 1) * HEADS // tp * HEAD)
        q, k, v = (_native_delta(model, f"self_attn.{m}_proj", x.float()) for m in "qkv")
        _close_at_bfloat16_scale(built["model.layers.0.self_attn.qkv_proj"].delta(x),
                                 torch.cat([q[:, q_rows], k, v], dim=1))
    for name, inputs in (("self_attn.o_proj", x), ("mlp.down_proj", x_inter)):
        if tp == 1:
            delta = _mixtures(adapter, 1, 0, dtype=torch.bfloat16)[f"model.layers.0.{name}"].delta(inputs)
        else:  # each rank's bfloat16 partials summed in bfloat16, as vLLM's all-reduce does
            halves = inputs.chunk(2, dim=1)
            other = _mixtures(adapter, 2, 1, dtype=torch.bfloat16)[f"model.layers.0.{name}"].mixtures[0]
            built = _mixtures(adapter, 2, 0, all_reduce=lambda partials, o=other, h=halves[1]: partials + o.partials(h),
                              dtype=torch.bfloat16)
            delta = built[f"model.layers.0.{name}"].delta(halves[0])
        _close_at_bfloat16_scale(delta, _native_delta(model, name, inputs.float()))
