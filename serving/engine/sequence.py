"""A request's sequence as the scheduler sees it: tokens, how many have KV cached, status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class PromptLogprob(NamedTuple):
    """A prompt token's logprob given the tokens before it, its rank in that distribution (1: the most
    probable; tokens as probable count ahead of it, as vLLM ranks) and the top-k {token: logprob}."""

    logprob: float
    top: dict[int, float]
    rank: int


@dataclass
class Sequence:
    """One generation: prompt tokens, generated tokens, and the KV-cache progress between them."""

    seq_id: int
    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None = None
    params: Any = None  # sampling parameters, opaque to the scheduler
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose keys and values are in the cache
    arrival: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None
    # Filled when params ask: per prompt token, its PromptLogprob; None first (it has no context).
    prompt_logprobs: list[PromptLogprob | None] = field(default_factory=list)
    # Prefix caching: the adapter's cache key (None: this sequence neither shares nor reuses blocks),
    # whether it may start from cached blocks (not when every prompt token's logits are wanted), its
    # full blocks' content hashes so far and how many of its blocks are registered in the cache.
    cache_salt: str | None = None
    reuse_cached_prefix: bool = True
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens read from the cache at admission
    # Stop strings: the output's text so far (an OutputText), made when the request has stop strings.
    output_text: Any = None
    # What ended the sequence with finish_reason "stop": the stop token's id or the stop string.
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.CANCELLED)
