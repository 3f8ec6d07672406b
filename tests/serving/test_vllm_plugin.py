"""MoE-LoRA adapters (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1 to 3) on real vLLM through the alphalora
plugin equal the native engine.

`alphalora serve --engine vllm --adapter moe=DIR` bakes the adapter into a model folder whose
architecture is the plugin's class; vLLM fuses q/k/v and gate/up, and the plugin adds each
module's own mixture to its slice. Skipped unless ALPHALORA_VLLM_PYTHON names a python with vLLM
and this package installed (.ci/run sets it up).
"""

from __future__ import annotations

import os

import httpx
import pytest

from alphalora import allocate, analyze
from alphalora.serving.vllm.launch import find_vllm
from tests.serving.vllm_helpers import VLLMServer, native_greedy, own_adapter, require_vllm, tiny_model, tiny_overrides
from tests.tiny_models import MOE_FAMILIES, build

pytestmark = pytest.mark.slow


def _two_cpus() -> list[int] | None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cpus[:2] if len(cpus) >= 2 else None


def _every_family(family: str):
    """A family whose plugin class differs from the others' only in its vLLM base class: each vLLM start costs
    two to three minutes of CI's 2 cores, so these run where ALPHALORA_VLLM_ALL_FAMILIES is set (all pass on
    vLLM 0.32: see the README)."""
    return pytest.param(family, 1, marks=pytest.mark.skipif(
        not os.environ.get("ALPHALORA_VLLM_ALL_FAMILIES"), reason="set ALPHALORA_VLLM_ALL_FAMILIES=1 to run"))


# Llama runs tensor-parallel over 2 CPU workers: q heads split, the one KV head replicated, o_proj and
# down_proj all-reduced, so the plugin's sharding is checked on real vLLM too. Always run: Qwen3's q/k norms,
# Phi-3's own fused projections (one mixture across a linear's slices), Gemma 2's soft caps and sandwich norms,
# and a mixture-of-experts base (Mixtral).
@pytest.mark.parametrize("family,tensor_parallel", [
    ("llama", 2), ("qwen3", 1), ("phi3", 1), ("gemma2", 1), ("mixtral", 1),
    *map(_every_family, ["mistral", "qwen2", "gemma", "gemma3", "qwen2_moe", "qwen3_moe"])])
def test_moe_lora_adapter_through_the_plugin_equals_native_engine(tmp_path, family, tensor_parallel):
    python = require_vllm()
    # A vLLM environment was named (or vLLM imports here, where this package is installed): without the
    # plugin beside it the MoE-LoRA path is broken, not absent.
    assert find_vllm(python).plugin, f"the alphalora vLLM plugin is not installed for {python}: " \
        "`pip install --no-deps --no-build-isolation -e .` in that environment (see .ci/vllm-env)"
    extra, env = [], {}
    if tensor_parallel > 1:
        cpus = _two_cpus()
        if cpus is None:
            pytest.skip("tensor parallelism on vLLM's CPU backend needs 2 CPUs, one per worker")
        extra = ["--tensor-parallel-size", str(tensor_parallel)]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, cpus))}  # one core per worker
    model = tiny_model(tmp_path / f"tiny-{family}", family)
    # Phi-3's own fused qkv_proj and gate_up_proj are adapted as wholes
    fields = dict(targets=("qkv", "o", "gate_up", "down"), rank_pattern={"qkv": 2}) if family == "phi3" else \
        dict(rank_pattern={"v": 2, "up": 8})
    if family in MOE_FAMILIES:  # where `allocate` puts adapters on a mixture-of-experts base: not on its experts
        base = build(family, 0, **tiny_overrides(family))
        fields["targets"] = allocate(analyze(base), method="uniform", budget=2).target_modules
    adapters = {"moe": own_adapter(tmp_path / "moe", family, (3, 2), seed=7, **fields)}
    native = native_greedy(model, adapters, "moe")
    assert native != native_greedy(model, adapters, None)
    server = VLLMServer(model, adapters, tmp_path, extra, env)
    try:
        assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]] == ["moe"]
        assert server.greedy("moe") == native
    finally:
        server.stop()


def test_moe_lora_adapter_through_the_plugin_in_bfloat16(tmp_path):
    """vLLM's usual dtype on GPUs: the plugin's weights, hooks and gates in a bfloat16 model. Greedy
    paths part once a step's margin is under bfloat16's rounding, so the first tokens are compared: they
    equal the native engine's in float32 and differ from the base model's."""
    python = require_vllm()
    assert find_vllm(python).plugin, f"the alphalora vLLM plugin is not installed for {python}"
    model = tiny_model(tmp_path / "tiny-llama", "llama")
    adapters = {"moe": own_adapter(tmp_path / "moe", "llama", (3, 2), rank_pattern={"v": 2, "up": 8}, seed=7)}
    native, base = native_greedy(model, adapters, "moe"), native_greedy(model, adapters, None)
    first = 3
    assert all(a[:first] != b[:first] for a, b in zip(native, base, strict=True))
    server = VLLMServer(model, adapters, tmp_path, ["--dtype", "bfloat16"])
    try:
        assert [tokens[:first] for tokens in server.greedy("moe")] == [tokens[:first] for tokens in native]
    finally:
        server.stop()
