"""The engine behind an asyncio server: a background thread steps it, requests stream from queues."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .engine import Engine, StepOutput
from .sampling import SamplingParams
from .sequence import Sequence

logger = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """A cumulative Prometheus-style histogram: bucket counts, sum and count (bounded memory)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[i] += 1
        self.total += value
        self.count += 1


@dataclass
class EngineStats:
    """Counters for /metrics."""

    requests_total: int = 0
    requests_by_adapter: dict[str, int] = field(default_factory=dict)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    ttft_seconds: Histogram = field(default_factory=Histogram)
    tpot_seconds: Histogram = field(default_factory=Histogram)


class EngineFailure(RuntimeError):
    """The engine failed while running a step; the requests in it cannot complete."""


class AsyncEngine:
    """Thread-safe front of an Engine: `generate` yields StepOutputs as the engine thread makes them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="alphalora-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                with self._lock:
                    outputs = self.engine.step() if self.engine.has_work() else None
            except Exception as error:  # noqa: BLE001 - one bad step must not stop the server
                logger.exception("engine step failed")
                self._fail_running(error)
                continue
            if outputs is None:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            for out in outputs:
                target = self._queues.get(out.seq.seq_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_running(self, error: Exception) -> None:
        """Ends every running sequence (their streams get EngineFailure) so the engine can go on."""
        with self._lock:
            failed = list(self.engine.scheduler.running)
            for seq in failed:
                self.engine.abort(seq)
        for seq in failed:
            target = self._queues.get(seq.seq_id)
            if target is not None:
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, EngineFailure(f"{type(error).__name__}: {error}"))

    # -- requests ----------------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> tuple[Sequence, asyncio.Queue]:
        """Admits a request (raising QueueFullError / ValueError / AdapterError at once)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            seq = self.engine.add_request(prompt_ids, params, adapter)
            self._queues[seq.seq_id] = (asyncio.get_running_loop(), queue)
        self.stats.requests_total += 1
        key = adapter or "<base>"
        self.stats.requests_by_adapter[key] = self.stats.requests_by_adapter.get(key, 0) + 1
        self.stats.prompt_tokens_total += len(prompt_ids)
        self._wake.set()
        return seq, queue

    async def stream(self, seq: Sequence, queue: asyncio.Queue) -> AsyncIterator[StepOutput]:
        """The request's outputs until it finishes; cancelling the consumer aborts the request. TTFT counts
        from the request's admission (a stream can start after its first token was made)."""
        start, last = seq.arrival, None
        try:
            while True:
                out = await queue.get()
                if isinstance(out, EngineFailure):
                    raise out
                now = time.monotonic()
                if last is None:
                    self.stats.ttft_seconds.observe(now - start)
                else:
                    self.stats.tpot_seconds.observe(now - last)
                last = now
                self.stats.generation_tokens_total += 1
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(seq.seq_id, None)
            if not seq.is_finished:
                with self._lock:
                    self.engine.abort(seq)

    def cancel(self, seq: Sequence) -> None:
        """Drops a request that will not be streamed (its KV blocks are freed at once)."""
        self._queues.pop(seq.seq_id, None)
        with self._lock:
            self.engine.abort(seq)

    def run_locked(self, fn, *args):
        """Runs fn(*args) while the engine thread is between steps (adapter load/unload)."""
        with self._lock:
            return fn(*args)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)
