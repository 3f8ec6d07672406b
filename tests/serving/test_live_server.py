"""A real uvicorn server on localhost: 64 concurrent streaming clients, and disconnects that free KV."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.test_engine import _adapter
from tests.tiny_models import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from load_test import run_load, start_local_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    model_dir = save_tiny("llama", root / "m", initializer_range=0.2, max_position_embeddings=256)
    adapters = {"moe": str(_adapter(root / "moe", "llama", (3, 2), seed=1)),
                "lora": str(_adapter(root / "lora", "llama", (1, 1), rank_pattern={"q": 2}, seed=2))}
    url, uvicorn_server, state = start_local_server(model_dir, adapters, max_num_seqs=64)
    yield url, state
    uvicorn_server.should_exit = True
    state.engine.close()


def test_64_concurrent_streaming_clients_over_mixed_adapters_all_complete(server):
    url, state = server
    results = run_load(url, [state.base_name, "moe", "lora"], clients=64, max_tokens=12)
    failed = [(r.model, r.error, r.tokens, r.finish_reason) for r in results if not r.ok]
    assert not failed, failed[:3]
    assert state.engine.engine.blocks.num_free_blocks == state.engine.engine.blocks.num_blocks
    assert state.engine.engine.scheduler.prefix_hit_tokens > 0  # the shared preamble was read, not recomputed


def test_client_disconnect_cancels_the_request_and_frees_its_blocks(server):
    url, state = server
    blocks = state.engine.engine.blocks
    payload = {"model": "moe", "prompt": "the cat sat on the mat", "max_tokens": 200, "stream": True,
               "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or not line for line in received)
        assert blocks.num_free_blocks < blocks.num_blocks  # the request holds KV blocks now
    deadline = time.time() + 10
    while time.time() < deadline and (state.engine.num_running or blocks.num_free_blocks != blocks.num_blocks):
        time.sleep(0.05)
    assert state.engine.num_running == 0
    assert blocks.num_free_blocks == blocks.num_blocks
