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
    """The engine failed while running a step (or was shut down); the requests in it cannot complete."""


@dataclass
class _Admission:
    """One request's sequences (n of them), waiting to be admitted together at the next step boundary."""

    requests: list[tuple[list[int], SamplingParams]]
    adapter: str | None
    arrival: float  # time.monotonic() when the request reached the server
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future  # -> list[Sequence], or the error that refused the request
    queues: list[asyncio.Queue]


class AsyncEngine:
    """Thread-safe front of an Engine: `stream` yields StepOutputs as the engine thread makes them.

    The event loop never waits for a step: requests and cancellations go into inboxes that the engine
    thread empties between steps, so a burst of requests is admitted at one step boundary (not one per
    step, each holding up every stream) and joins the next step together.
    """

    def __init__(self, engine: Engine, background: bool = True):
        """background: step on a thread of this object's own; else the owner calls `run` on a thread of
        its choosing. On the CPU, run it on the thread that loaded the model (`serve` uses the main
        thread): PyTorch's kernels run on the calling thread's OpenMP team, and a second team beside the
        first makes libgomp's workers sleep between parallel regions (a third slower step here)."""
        self.engine = engine
        self.stats = EngineStats()
        self._lock = threading.Lock()  # held by the engine thread during a step, and by run_locked
        self._wake = threading.Event()
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._inbox_lock = threading.Lock()
        self._admissions: list[_Admission] = []
        self._cancellations: list[Sequence] = []
        self._stopping = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self.run, name="alphalora-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ends `run` after the step in progress."""
        self._stopping = True
        self._wake.set()

    def close(self) -> None:
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._inbox_lock:
            pending, self._admissions = self._admissions, []
        for admission in pending:
            admission.loop.call_soon_threadsafe(_settle, admission.future, None, EngineFailure("the engine shut down"))

    # -- the engine thread -------------------------------------------------------------------------
    def run(self) -> None:
        """Steps the engine until `stop`, taking requests and cancellations between steps."""
        while not self._stopping:
            try:
                with self._lock:
                    self._empty_inboxes()
                    outputs = self.engine.step() if self.engine.has_work() else None
                    failed = self.engine.take_failed()
            except Exception as error:  # noqa: BLE001 - one bad step must not stop the server
                logger.exception("engine step failed")
                self._fail_running(error)
                continue
            self._fail(failed)
            if outputs is None:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            self._hand_over(outputs)

    def _hand_over(self, outputs: list[StepOutput]) -> None:
        """A step's outputs to their streams' queues: one wake-up of each event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
        for out in outputs:
            target = self._queues.get(out.seq.seq_id)
            if target is not None:
                loop, queue = target
                by_loop.setdefault(loop, []).append((queue, out))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_put_all, deliveries)

    def _empty_inboxes(self) -> None:
        """Cancellations, then admissions, each request all or nothing (engine lock held)."""
        with self._inbox_lock:
            cancellations, self._cancellations = self._cancellations, []
            admissions, self._admissions = self._admissions, []
        for seq in cancellations:
            self.engine.abort(seq)
        for admission in admissions:
            seqs: list[Sequence] = []
            try:
                for (prompt_ids, params), queue in zip(admission.requests, admission.queues, strict=True):
                    seq = self.engine.add_request(prompt_ids, params, admission.adapter)
                    seq.arrival = admission.arrival
                    seqs.append(seq)
                    self._queues[seq.seq_id] = (admission.loop, queue)
            except Exception as error:  # noqa: BLE001 - the request's refusal, raised in its handler
                for seq in seqs:
                    self._queues.pop(seq.seq_id, None)
                    self.engine.abort(seq)
                admission.loop.call_soon_threadsafe(_settle, admission.future, None, error)
                continue
            admission.loop.call_soon_threadsafe(self._deliver, admission, seqs)

    def _deliver(self, admission: _Admission, seqs: list[Sequence]) -> None:
        """On the event loop: hands the admitted sequences over, or cancels them if no one waits now."""
        if admission.future.done():  # the handler was cancelled (its client left) while it waited
            for seq in seqs:
                self.cancel(seq)
        else:
            admission.future.set_result(seqs)

    def _fail_running(self, error: Exception) -> None:
        """Ends every running sequence (their streams get EngineFailure) so the engine can go on."""
        with self._lock:
            failed = list(self.engine.scheduler.running)
            for seq in failed:
                self.engine.abort(seq)
        self._fail([(seq, error) for seq in failed])

    def _fail(self, failed: list[tuple[Sequence, Exception]]) -> None:
        """Ends the streams of sequences the engine has given up on, each with its reason."""
        for seq, error in failed:
            target = self._queues.get(seq.seq_id)
            if target is not None:
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, EngineFailure(f"{type(error).__name__}: {error}"))

    # -- requests ----------------------------------------------------------------------------------
    async def add(self, requests: list[tuple[list[int], SamplingParams]], adapter: str | None,
                  arrival: float | None = None) -> list[tuple[Sequence, asyncio.Queue]]:
        """Admits a request's sequences together at the next step boundary, or none of them: raises what
        refused one (QueueFullError, ValueError, AdapterError) with the others withdrawn. `arrival`
        (time.monotonic(), default now): when the request reached the server, where TTFT counts from."""
        if self._stopping:
            raise EngineFailure("the engine shut down")
        limit = self.engine.config.max_waiting
        if len(requests) > limit:  # (a QueueFullError would tell the client to retry what can never fit)
            raise ValueError(f"this request asks for {len(requests)} sequences (prompts x n), more than the server "
                             f"queues at once ({limit}): send its prompts in smaller requests")
        loop = asyncio.get_running_loop()
        arrival = time.monotonic() if arrival is None else arrival
        admission = _Admission(list(requests), adapter, arrival, loop, loop.create_future(),
                               [asyncio.Queue() for _ in requests])
        with self._inbox_lock:
            self._admissions.append(admission)
        self._wake.set()
        seqs = await admission.future
        for prompt_ids, _ in admission.requests:
            self.stats.requests_total += 1
            key = adapter or "<base>"
            self.stats.requests_by_adapter[key] = self.stats.requests_by_adapter.get(key, 0) + 1
            self.stats.prompt_tokens_total += len(prompt_ids)
        return list(zip(seqs, admission.queues, strict=True))

    async def stream(self, seq: Sequence, queue: asyncio.Queue) -> AsyncIterator[StepOutput]:
        """The request's outputs until it finishes; cancelling the consumer aborts the request. TTFT counts
        from the request's arrival (a stream can start after its first token was made)."""
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
            if not seq.is_finished:
                self.cancel(seq)
            self._queues.pop(seq.seq_id, None)

    def cancel(self, seq: Sequence) -> None:
        """Drops a sequence no one will read: its KV blocks are freed at the next step boundary."""
        self._queues.pop(seq.seq_id, None)
        with self._inbox_lock:
            self._cancellations.append(seq)
        self._wake.set()

    def run_locked(self, fn, *args):
        """Runs fn(*args) while the engine thread is between steps (adapter load/unload)."""
        with self._lock:
            return fn(*args)

    @property
    def steps_on_own_thread(self) -> bool:
        return self._thread is not None

    @property
    def pending_admissions(self) -> int:
        """Requests waiting for the next step boundary to be admitted."""
        with self._inbox_lock:
            return len(self._admissions)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """On the event loop: completes a future unless its waiter has gone."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(deliveries: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for queue, out in deliveries:
        queue.put_nowait(out)
