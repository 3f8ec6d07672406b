"""Sampling parameters and the per-sequence sampler (OpenAI/vLLM semantics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # how many top logprobs to return per token (0: only the chosen)
    prompt_logprobs: bool = False  # logprob of every prompt token given the ones before it

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or positive, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")


@dataclass
class SampleResult:
    token: int
    logprob: float
    top_logprobs: dict[int, float] | None


def _has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def sample_rows(logits: torch.Tensor, requests: list[tuple[SamplingParams, list[int], list[int],
                                                           torch.Generator | None]]) -> list[SampleResult]:
    """`sample` for every row of logits [R, vocab]: (params, prompt ids, output ids, generator) per row.

    Greedy rows without penalties, the common case, go in one batched argmax with one transfer
    to the host (no device synchronisation per row); the others are sampled one by one."""
    results: list[SampleResult | None] = [None] * len(requests)
    plain = [i for i, (params, *_) in enumerate(requests) if params.temperature == 0 and not _has_penalties(params)]
    if plain:
        rows = logits[torch.tensor(plain, device=logits.device)]
        logprobs = torch.log_softmax(rows, dim=-1)
        tokens = torch.argmax(rows, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0]
        most = max(requests[i][0].logprobs or 0 for i in plain)
        top = torch.topk(logprobs, most, dim=-1) if most else None
        tokens, chosen = tokens.tolist(), chosen.tolist()
        top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        for j, i in enumerate(plain):
            wanted = requests[i][0].logprobs
            top_i = dict(zip(top_ids[j][:wanted], top_values[j][:wanted], strict=True)) if wanted else None
            results[i] = SampleResult(tokens[j], chosen[j], top_i)
    for i, (params, prompt_ids, output_ids, generator) in enumerate(requests):
        if results[i] is None:
            results[i] = sample(logits[i], params, prompt_ids, output_ids, generator)
    return results


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[0])
        counts = counts.to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
           generator: torch.Generator | None) -> SampleResult:
    """One token from a row of logits (float32, CPU or device), with its logprob."""
    logprobs = torch.log_softmax(logits, dim=-1)  # reported logprobs are the model's own distribution
    logits = apply_penalties(logits.clone(), params, prompt_ids, output_ids)
    if params.temperature == 0:
        token = int(torch.argmax(logits))
    else:
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[0])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, 0) - sorted_probs < params.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
            probs = probs / probs.sum()
        token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    top = None
    if params.logprobs:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = {int(i): float(v) for i, v in zip(ids, values, strict=True)}
    return SampleResult(token, float(logprobs[token]), top)
