"""MoE-LoRA adapters (Llama, Mistral, Qwen2) on real vLLM through the alphalora plugin equal the native engine.

`alphalora serve --engine vllm --adapter moe=DIR` bakes the adapter into a model folder whose
architecture is the plugin's class; vLLM fuses q/k/v and gate/up, and the plugin adds each
module's own mixture to its slice. Skipped unless ALPHALORA_VLLM_PYTHON names a python with vLLM
and this package installed (.ci/run sets it up).
"""

from __future__ import annotations

import httpx
import pytest

from alphalora.serving.vllm.launch import find_vllm
from tests.serving.vllm_helpers import VLLMServer, native_greedy, own_adapter, require_vllm, tiny_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_moe_lora_adapter_through_the_plugin_equals_native_engine(tmp_path, family):
    python = require_vllm()
    if not find_vllm(python).plugin:
        pytest.skip(f"the alphalora vLLM plugin is not installed for {python}")
    model = tiny_model(tmp_path / f"tiny-{family}", family)
    adapters = {"moe": own_adapter(tmp_path / "moe", family, (3, 2), rank_pattern={"v": 2, "up": 8}, seed=7)}
    native = native_greedy(model, adapters, "moe")
    assert native != native_greedy(model, adapters, None)
    server = VLLMServer(model, adapters, tmp_path)
    try:
        assert [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]] == ["moe"]
        assert server.greedy("moe") == native
    finally:
        server.stop()
