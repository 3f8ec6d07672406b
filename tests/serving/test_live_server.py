"""A real uvicorn server on localhost: 64 concurrent streaming clients, and disconnects that free KV."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.test_engine import _adapter
from tests.serving.test_openai_api import CHAT_TEMPLATE
from tests.tiny_models import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from load_test import run_load, start_local_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    model_dir = save_tiny("llama", root / "m", initializer_range=0.2, max_position_embeddings=256)
    adapters = {"moe": str(_adapter(root / "moe", "llama", (3, 2), seed=1)),
                "lora": str(_adapter(root / "lora", "llama", (1, 1), rank_pattern={"q": 2}, seed=2))}
    url, uvicorn_server, state = start_local_server(model_dir, adapters, max_num_seqs=64, chat_template=CHAT_TEMPLATE)
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


def test_a_client_gone_before_its_whole_answer_frees_its_blocks_without_an_error_logged(server):
    """A non-streaming client that times out: its request is cancelled and its blocks freed, quietly (the handler
    used to raise CancelledError out of the app, which uvicorn logs with a traceback per disconnect)."""
    url, state = server
    blocks = state.engine.engine.blocks
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        payload = {"model": "lora", "prompt": "the cat sat on the mat", "max_tokens": 240, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=payload, timeout=0.2)
        deadline = time.time() + 10
        while time.time() < deadline and (state.engine.num_running or blocks.num_free_blocks != blocks.num_blocks):
            time.sleep(0.05)
        time.sleep(0.5)  # the handler notices the disconnect within a quarter of a second
    finally:
        logger.removeHandler(handler)
    assert state.engine.num_running == 0 and blocks.num_free_blocks == blocks.num_blocks
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


def _stream_chunks(url: str, route: str, payload: dict, into: queue.Queue) -> None:
    """Puts each streamed event's JSON (or "[DONE]") on `into` as it arrives."""
    with httpx.stream("POST", f"{url}{route}", json={**payload, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                into.put(data if data == "[DONE]" else json.loads(data))


@pytest.mark.parametrize("route, payload", [
    ("/v1/chat/completions", {"model": "moe", "messages": [{"role": "user", "content": "hi there"}]}),
    ("/v1/completions", {"model": "lora", "prompt": "the cat sat on", "echo": True}),
])
def test_no_stream_chunk_comes_before_the_first_token(server, route, payload, monkeypatch):
    """Clients time the first token by the first chunk (`vllm bench serve` does): the chat role chunk and the
    echoed prompt must wait for a token, as vLLM sends them. Here the request's tokens are held back from
    the handler until the test lets them through."""
    url, state = server
    payload = {**payload, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    release = threading.Event()
    stream = state.engine.stream

    async def held_back(seq, queue_):
        async for out in stream(seq, queue_):
            while not release.is_set():
                await asyncio.sleep(0.01)
            yield out

    monkeypatch.setattr(state.engine, "stream", held_back)
    chunks: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_stream_chunks, args=(url, route, payload, chunks))
    reader.start()
    try:
        with pytest.raises(queue.Empty):  # no token has reached the handler, so no chunk may come
            chunks.get(timeout=1.0)
    finally:
        release.set()
    reader.join(timeout=60)
    events = list(chunks.queue)
    assert events[-1] == "[DONE]"
    whole = httpx.post(f"{url}{route}", json=payload, timeout=60).json()["choices"][0]
    if route == "/v1/chat/completions":
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
        assert text == whole["message"]["content"]
    else:  # the prompt and the first token in one chunk; the whole stream equals the non-streamed text
        assert events[0]["choices"][0]["text"].startswith("the cat sat on")
        assert len(events) == 4 + 1
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["text"]


def test_requests_arriving_during_a_step_wait_in_the_inbox_and_are_admitted_together(server, monkeypatch):
    """The event loop never waits for a step: while one runs (held here), the server answers and takes
    requests; they all join the step after it, not one per step."""
    url, state = server
    engine = state.engine.engine
    scheduled: list[int] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        output = schedule()
        scheduled.append(len(output.chunks))
        return output

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    release, held = threading.Event(), threading.Event()
    holder = threading.Thread(target=state.engine.run_locked, args=(lambda: (held.set(), release.wait(30)),))
    holder.start()
    assert held.wait(10)
    results: list[int] = []
    payload = {"model": "moe", "max_tokens": 3, "ignore_eos": True, "temperature": 0}
    clients = [threading.Thread(target=lambda i=i: results.append(httpx.post(
        f"{url}/v1/completions", json={**payload, "prompt": f"request number {i}"}, timeout=60).status_code))
        for i in range(8)]
    try:
        for client in clients:
            client.start()
        deadline = time.time() + 10
        while time.time() < deadline and state.engine.pending_admissions < len(clients):
            time.sleep(0.02)
        assert state.engine.pending_admissions == len(clients)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # answered during the step
        assert not scheduled
    finally:
        release.set()
        holder.join()
    for client in clients:
        client.join(timeout=60)
    assert results == [200] * len(clients)
    assert scheduled[0] == len(clients)  # every prompt in the first step


def test_alphalora_serve_finishes_streams_in_flight_on_sigterm_and_refuses_a_busy_port(tmp_path):
    """`alphalora serve` as users run it (the engine on the main thread, HTTP on another): a signal stops
    the HTTP server first, so a stream in flight still ends with all its tokens, and the process exits 0;
    a second server on the same port fails with the reason instead of serving nothing."""
    import signal
    import subprocess

    from load_test import ServerProcess, free_port

    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=256)
    port = free_port()
    argv = [sys.executable, "-m", "alphalora.cli", "serve", str(model_dir), "--port", str(port), "--device", "cpu"]
    server = ServerProcess(argv, tmp_path / "serve.log", port, timeout=120, name="alphalora server")
    try:
        busy = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and f"could not start on 127.0.0.1:{port}" in busy.stderr
        chunks: queue.Queue = queue.Queue()
        payload = {"model": "m", "prompt": "the cat sat", "max_tokens": 48, "ignore_eos": True}
        reader = threading.Thread(target=_stream_chunks, args=(server.url, "/v1/completions", payload, chunks))
        reader.start()
        chunks.get(timeout=60)  # the stream is under way
        server.process.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        assert server.process.wait(timeout=60) == 0, server.tail()
    finally:
        if server.process.poll() is None:
            server.stop()
    events = [chunks.get_nowait() for _ in range(chunks.qsize())]
    assert events[-1] == "[DONE]" and len(events) == 48  # 47 more token chunks after the first, then [DONE]
