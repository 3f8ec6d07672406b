"""Shared by the vLLM tests: tiny models vLLM's CPU backend accepts, adapters, and a live vLLM server."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

from alphalora.adapters.io import save_adapter
from alphalora.allocation import Plan
from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from tests.tiny_models import build, save_tiny, with_random_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from load_test import ServerProcess, free_port  # noqa: E402

# vLLM's CPU attention needs head_dim >= 64: hidden 128 over 2 heads (1 KV head, so q and k/v slices differ).
VLLM_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                 initializer_range=0.2, max_position_embeddings=256)
PROMPTS = [[5, 9, 17, 33, 8], [12, 40, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
MAX_TOKENS = 12
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def vllm_python() -> str | None:
    """The python that runs vLLM: $ALPHALORA_VLLM_PYTHON, or this one if `import vllm` would work."""
    path = os.environ.get("ALPHALORA_VLLM_PYTHON")
    if path:
        return path
    return sys.executable if importlib.util.find_spec("vllm") else None


def require_vllm() -> str:
    python = vllm_python()
    if python is None:
        pytest.skip("real vLLM not available: set ALPHALORA_VLLM_PYTHON (see .ci/run)")
    return python


def tiny_overrides(family: str) -> dict:
    """VLLM_TINY, with head_dim where the family's tiny config sets its own (Qwen3's and Gemma's configs name
    theirs; Gemma 2 and 3 scale queries by their own query_pre_attn_scalar). Gemma 2 and 3 normalise each
    sub-block's output, so at VLLM_TINY's initializer range the embeddings (scaled by sqrt(hidden), tied to the
    head) outweigh every block and each greedy step repeats the last token, adapter or not: they get a smaller one."""
    if family in ("gemma2", "gemma3"):
        return dict(VLLM_TINY, head_dim=64, query_pre_attn_scalar=64, initializer_range=0.02)
    return dict(VLLM_TINY, head_dim=64) if family in ("qwen3", "qwen3_moe", "gemma") else VLLM_TINY


def tiny_model(folder: Path, family: str = "llama") -> Path:
    return save_tiny(family, folder, **tiny_overrides(family))


def own_adapter(folder: Path, family: str, experts, rank_pattern=None, seed: int = 1, targets=ALL_TARGETS,
                **plan_fields) -> Path:
    """One of our adapter folders with random non-zero weights (B included)."""
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=list(experts),
                top_k_per_layer=[min(2, e) for e in experts], target_modules=list(targets), rank=4,
                rank_pattern=rank_pattern or {}, lora_alpha=8.0, lora_dropout=0.0, **plan_fields)
    model = build(family, 0, **tiny_overrides(family))
    save_adapter(with_random_adapter(model, plan, seed=seed, std=0.3), folder)
    return folder


def native_greedy(model_dir: Path, adapters: dict[str, Path], name: str | None) -> list[list[int]]:
    """Greedy token ids of the native engine for PROMPTS (the oracle the vLLM outputs must equal)."""
    engine = Engine.from_pretrained(model_dir, EngineConfig(adapters={k: str(v) for k, v in adapters.items()},
                                                            dtype=torch.float32))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(p, params, name) for p in PROMPTS]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


class VLLMServer(ServerProcess):
    """`alphalora serve --engine vllm ...` in a subprocess, until stop()."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], workdir: Path, extra: list[str] = (),
                 env: dict[str, str] | None = None):
        port = free_port()
        argv = [sys.executable, "-m", "alphalora.cli", "serve", str(model_dir), "--engine", "vllm",
                "--vllm-python", require_vllm(), "--port", str(port), "--dtype", "float32",
                "--max-model-len", "256", "--max-num-seqs", "8", *extra]
        for name, path in adapters.items():
            argv += ["--adapter", f"{name}={path}"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   ALPHALORA_CACHE=str(workdir / "cache"), **(env or {}))
        super().__init__(argv, workdir / f"vllm-{port}.log", port, env=env, cwd=Path(__file__).resolve().parents[2],
                         timeout=400, name="vLLM server")

    def greedy(self, model: str) -> list[list[int]]:
        """vLLM's greedy token ids for PROMPTS, as token-id prompts over /v1/completions."""
        outputs = []
        for prompt in PROMPTS:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                    "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True}
            response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, f"{response.status_code} {response.text}\n{self.tail()}"
            tokens = response.json()["choices"][0]["logprobs"]["tokens"]
            outputs.append([int(t.removeprefix("token_id:")) for t in tokens])
        return outputs
