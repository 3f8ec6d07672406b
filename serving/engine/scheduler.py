"""Continuous batching: which sequences run this step, and how many of their tokens.

One token budget per step covers prefill chunks and decodes alike (chunked prefill): running
sequences go first, in arrival order, then waiting ones are admitted while the budget, the
sequence limit and the KV pool allow. When the pool runs dry, the most recently admitted
running sequence is preempted (its blocks freed, to be recomputed later).

With prefix caching a sequence is admitted with the cached blocks its tokens start with (at most
all but its last token, whose logits it needs) and computes only the rest; every full block it
computes is registered for the sequences after it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .prefix_cache import extend_block_hashes
from .sequence import Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of a sequence are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """Whether the step's last token is the sequence's last known token (so it samples)."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_waiting: int = 1024, max_model_len: int = 2048, max_adapters: int | None = None):
        self.blocks = block_manager
        # Distinct adapters among the running sequences (vLLM's max_loras): a sequence whose adapter
        # would be one too many waits, keeping its place, while others behind it are admitted.
        self.max_adapters = max_adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Prefix caching, in tokens: looked up at admission, and found in the cache.
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence; raises QueueFullError or ValueError (too long for the context/pool)."""
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting; retry later")
        total = len(seq.prompt_ids) + seq.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.max_tokens}) = {total} "
                             f"exceeds the maximum context length of {self.max_model_len} tokens")
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            raise ValueError(f"a sequence of {total} tokens cannot fit the KV cache of "
                             f"{self.blocks.num_blocks * self.blocks.block_size} tokens")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt_last(self, output: SchedulerOutput) -> Sequence:
        victim = self.running.pop()
        self.blocks.free(victim.seq_id)
        victim.num_computed = 0
        victim.num_registered_blocks = 0
        victim.status = SequenceStatus.WAITING
        self.waiting.appendleft(victim)
        output.preempted.append(victim)
        return victim

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq.seq_id, n):
                if self._preempt_last(output) is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # the sequence itself was preempted: nothing after it runs either
            self.blocks.grow(seq.seq_id, n)
            output.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            index += 1
        in_flight = self._blocks_in_flight()
        adapters = {seq.adapter for seq in self.running if seq.adapter is not None}
        deferred: list[Sequence] = []  # waiting for blocks another sequence computes now, or for an adapter slot
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not output.preempted:
            seq = self.waiting[0]
            if (self.max_adapters is not None and seq.adapter is not None and seq.adapter not in adapters
                    and len(adapters) >= self.max_adapters):
                deferred.append(self.waiting.popleft())
                continue
            prefix = self._cached_prefix(seq)
            if len(prefix) < self._usable_blocks(seq) and seq.block_hashes[len(prefix)] in in_flight:
                deferred.append(self.waiting.popleft())  # its next block will be cached soon: read it then
                continue
            computed = len(prefix) * self.blocks.block_size
            n = min(seq.num_tokens - computed, budget)
            if not self.blocks.can_allocate(n, prefix, keep_watermark=bool(self.running)):
                break
            self.waiting.popleft()
            in_flight.update(seq.block_hashes[len(prefix):len(seq.prompt_ids) // self.blocks.block_size])
            self.blocks.allocate(seq.seq_id, n, prefix)
            if seq.cache_salt is not None and seq.reuse_cached_prefix:
                self.prefix_queried_tokens += seq.num_tokens
                self.prefix_hit_tokens += computed
            if not seq.output_ids:  # the response reports its prompt's hits, not a readmission's
                seq.num_cached_tokens = computed
            seq.num_computed, seq.num_registered_blocks = computed, len(prefix)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            output.chunks.append(ScheduledChunk(seq, computed, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return output

    def _blocks_in_flight(self) -> set[bytes]:
        """Content hashes of the prompt blocks running sequences are computing and have not registered
        yet. A waiting sequence whose next block is among them (a sibling of an n > 1 request, or
        another request on the same system prompt) waits for it instead of computing it again."""
        in_flight: set[bytes] = set()
        for seq in self.running:
            if seq.cache_salt is not None and seq.num_computed < len(seq.prompt_ids):
                end = len(seq.prompt_ids) // self.blocks.block_size
                in_flight.update(seq.block_hashes[seq.num_registered_blocks:end])
        return in_flight

    def _usable_blocks(self, seq: Sequence) -> int:
        """How many of its leading full blocks the sequence may read from the cache: all short of its
        last token (whose logits it needs); none where it neither shares nor reuses blocks."""
        if seq.cache_salt is None or not seq.reuse_cached_prefix:
            return 0
        return (seq.num_tokens - 1) // self.blocks.block_size

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks the sequence can start from: its longest cached run of usable blocks
        (the sequence's block hashes are brought up to date on the way)."""
        usable = self._usable_blocks(seq)
        if usable == 0:
            return []
        hashes = extend_block_hashes(seq.block_hashes, seq.all_ids, self.blocks.block_size, seq.cache_salt)
        return self.blocks.cached_prefix(hashes[:usable])

    def _register_computed_blocks(self, seq: Sequence) -> None:
        """Offers the sequence's newly full and computed blocks to the cache."""
        full = seq.num_computed // self.blocks.block_size
        if seq.cache_salt is None or full <= seq.num_registered_blocks:
            return
        hashes = extend_block_hashes(seq.block_hashes, seq.all_ids, self.blocks.block_size, seq.cache_salt)
        for index in range(seq.num_registered_blocks, full):
            self.blocks.register(seq.seq_id, index, hashes[index])
        seq.num_registered_blocks = full

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Records a step: scheduled tokens now have KV; sequences that sampled get their token."""
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # cancelled while the step ran
            seq.num_computed = chunk.start + chunk.num_tokens
            if seq.seq_id in sampled:
                seq.output_ids.append(sampled[seq.seq_id])
            self._register_computed_blocks(seq)

    def finish(self, seq: Sequence, reason: str, cancelled: bool = False) -> None:
        """Ends a sequence (stop, length, cancel) and frees its KV blocks."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.CANCELLED if cancelled else SequenceStatus.FINISHED
        seq.finish_reason = reason
