"""Sampling parameters and the samplers, batched where rows allow (OpenAI/vLLM semantics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from alphalora._numbers import is_number, python_scalar

_LARGEST = torch.finfo(torch.float32).max
GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (vLLM's _SAMPLING_EPS)


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
    min_tokens: int = 0  # no EOS and no stop token id (or string) before this many output tokens (vLLM's)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # how many top logprobs to return per token (0: only the chosen)
    # each prompt token's logprob (and rank) given the ones before it, with its top-k alternatives (vLLM's
    # prompt_logprobs: k of them, 0 for none; None: not computed)
    prompt_logprobs: int | None = None
    min_p: float = 0.0  # vLLM's: drop tokens less probable than min_p x the most probable (after temperature)
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: added to a token's logit first
    include_stop_str_in_output: bool = False  # vLLM's: the text keeps the stop string (and a stop token's text)

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0  # vLLM's rule: dividing by a temperature this small overflows the logits
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or positive, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if self.prompt_logprobs is not None and (isinstance(self.prompt_logprobs, bool)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise ValueError(f"prompt_logprobs must be a count between 0 and 20, got {self.prompt_logprobs!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    def _check_types(self) -> None:
        """ValueError for a field of the wrong type or a non-finite number (NaN passes every range check, and
        would sample garbage without a word); numpy scalars are read as the numbers they hold, a single stop
        string as a list of one."""
        for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):
            value = python_scalar(getattr(self, name))
            optional = name in ("seed", "logprobs", "prompt_logprobs")
            if not (value is None and optional) and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer{' or None' if optional else ''}, got {value!r}")
            setattr(self, name, value)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = python_scalar(getattr(self, name))
            if not is_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(python_scalar(getattr(self, name)), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(text, str) for text in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        ids = [python_scalar(token) for token in self.stop_token_ids]
        if any(not isinstance(token, int) or isinstance(token, bool) or token < 0 for token in ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        self.stop, self.stop_token_ids = list(self.stop), ids
        bias = {python_scalar(token): python_scalar(value) for token, value in self.logit_bias.items()}
        for token, value in bias.items():
            if not is_number(value):
                raise ValueError(f"logit_bias values must be finite numbers, got {value!r} for token {token!r}")
        self.logit_bias = bias


@dataclass
class SampleResult:
    token: int
    logprob: float
    top_logprobs: dict[int, float] | None


def _adjusts_logits(params: SamplingParams) -> bool:
    """Whether the row's logits change before sampling (penalties, a logit bias): sampled on its own."""
    return (params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)
            or bool(params.logit_bias))


def suppressed_tokens(params: SamplingParams, output_ids: list[int], eos_token_ids: list[int]) -> list[int]:
    """The tokens a sequence may not produce yet: before `min_tokens` outputs, EOS and its stop token ids."""
    if len(output_ids) >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + list(eos_token_ids)


def sample_rows(logits: torch.Tensor, requests: list[tuple[SamplingParams, list[int], list[int],
                                                           torch.Generator | None]],
                eos_token_ids: list[int] = ()) -> list[SampleResult]:
    """`sample` for every row of logits [R, vocab]: (params, prompt ids, output ids, generator) per row.

    Rows without penalties or a seed, the common cases, are sampled together: the greedy ones in one
    argmax, the random ones (temperature, top-k, top-p) in one filtered softmax and one multinomial.
    Rows with penalties, their own seeded generator or tokens still suppressed (min_tokens) are chosen
    one by one. Every row's token, logprob and top logprobs then come back to the host in one transfer:
    one wait for the device per step (a seeded row adds one: its generator draws on the host)."""
    suppressed = [suppressed_tokens(params, output_ids, eos_token_ids) for params, _, output_ids, _ in requests]
    batchable = [i for i, (params, _, _, generator) in enumerate(requests)
                 if not _adjusts_logits(params) and generator is None and not suppressed[i]]
    greedy = [i for i in batchable if requests[i][0].temperature == 0]
    random = [i for i in batchable if requests[i][0].temperature > 0]
    batched = set(batchable)
    alone = [i for i in range(len(requests)) if i not in batched]
    order, tokens = [], []
    for group in (greedy, random):
        if group:
            tokens.append(_sample_group(_rows(logits, group), [requests[i][0] for i in group]))
            order += group
    for i in alone:
        params, prompt_ids, output_ids, generator = requests[i]
        tokens.append(_choose(logits[i], params, prompt_ids, output_ids, generator, suppressed[i]).view(1))
        order.append(i)
    wanted = [requests[i][0].logprobs for i in order]
    results = _read_back(_rows(logits, order), torch.cat(tokens), wanted)
    by_row: list[SampleResult | None] = [None] * len(requests)
    for i, result in zip(order, results, strict=True):
        by_row[i] = result
    return by_row


def sample(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
           generator: torch.Generator | None, suppressed: list[int] | None = None) -> SampleResult:
    """One token from a row of logits (float32, CPU or device), with its logprob; `suppressed` tokens
    (EOS and stop ids before min_tokens) are never chosen."""
    token = _choose(logits, params, prompt_ids, output_ids, generator, suppressed).view(1)
    return _read_back(logits[None], token, [params.logprobs])[0]


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows], without a copy where `rows` is every row in order."""
    if rows == list(range(logits.shape[0])):
        return logits
    return logits[torch.tensor(rows, device=logits.device)]


def _sample_group(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The tokens [R] of rows that are all greedy or all random, none with penalties or a generator."""
    if params[0].temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = filtered_probs(logits, *_filters(params, logits.device))
    return torch.multinomial(probs, 1)[:, 0]


def _choose(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
            generator: torch.Generator | None, suppressed: list[int] | None) -> torch.Tensor:
    """One row's token as a 0-d tensor on the logits' device: penalties applied, suppressed tokens banned."""
    logits = apply_penalties(logits.clone(), params, prompt_ids, output_ids)
    if suppressed:
        logits[torch.tensor(suppressed, device=logits.device)] = float("-inf")
    if params.temperature == 0:
        return torch.argmax(logits)
    probs = filtered_probs(logits[None], *_filters([params], logits.device))[0]
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)[0]
    # (a seeded request's generator lives on the host, so that its draws are the same on every device)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[0].to(probs.device)


def _read_back(logits: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]) -> list[SampleResult]:
    """Each row's token with its logprob under the model's own distribution (before penalties and filters)
    and its `wanted` top logprobs, brought to the host in one transfer."""
    rows = read_logprobs(torch.log_softmax(logits, dim=-1), tokens, max(k or 0 for k in wanted), tokens)
    return [SampleResult(int(token), logprob, dict(list(top.items())[:k]) if k else None)
            for ((token,), logprob, top), k in zip(rows, wanted, strict=True)]


def read_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, top: int,
                  *extra: torch.Tensor) -> list[tuple[list[float], float, dict[int, float]]]:
    """Per row of logprobs [R, vocab]: the values of the `extra` per-row tensors, the logprob of its `chosen` token,
    and its `top` most probable tokens' logprobs by id, most probable first; one transfer to the host for all of
    them (token ids are exact in float64)."""
    columns = [column.reshape(-1, 1).double() for column in extra]
    columns.append(logprobs.gather(1, chosen.reshape(-1, 1)).double())
    if top:
        best = torch.topk(logprobs, top, dim=-1)
        columns += [best.values.double(), best.indices.double()]
    first = len(extra) + 1
    return [(row[:len(extra)], row[len(extra)],
             dict(zip(map(int, row[first + top:first + 2 * top]), row[first:first + top], strict=True)))
            for row in torch.cat(columns, dim=1).tolist()]


def _filters(params: list[SamplingParams], device) -> tuple[torch.Tensor | None, ...]:
    """(temperature, top_k, top_p, min_p) per row, as tensors: one small copy each (min_p None where
    no row sets it)."""
    return (torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            torch.tensor([p.min_p for p in params], device=device) if any(p.min_p for p in params) else None)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling probabilities [R, vocab] of logits [R, vocab] (temperature > 0 per row): divided by
    the row's temperature, cut to the tokens at least min_p x as probable as the most probable (vLLM's
    order: min-p before top-k and top-p), cut to the logits at least its top_k-th largest (top_k -1:
    off), softened, cut to the most probable tokens whose mass before them is under its top_p,
    renormalised."""
    # NaN logits (a broken model) are never drawn; +inf ones (a repetition penalty near 0 divides by it) are the
    # largest float, so that the softmax stays finite and draws among them
    scaled = torch.nan_to_num(logits.float() / temperature[:, None], nan=-math.inf, posinf=_LARGEST, neginf=-math.inf)
    if min_p is not None:
        # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p), softmax's normaliser cancelling
        floor = scaled.max(dim=-1, keepdim=True).values + torch.log(min_p[:, None].float())
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    vocab = scaled.shape[-1]
    kth = ordered.gather(1, (torch.where(top_k > 0, top_k.clamp(max=vocab), vocab) - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    ordered_probs = probs.gather(1, order)  # the cut keeps the order, so `order` still sorts
    keep = (torch.cumsum(ordered_probs, dim=-1) - ordered_probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
    probs = torch.zeros_like(probs).scatter(1, order, ordered_probs * keep)
    total = probs.sum(dim=-1, keepdim=True)
    # A row with nothing to draw from (every logit NaN or -inf): its first token, where multinomial would raise and
    # fail every sequence of the batch, not just this one.
    first = torch.zeros_like(probs)
    first[:, 0] = 1.0
    return torch.where(total > 0, probs / total, first)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    if params.logit_bias:
        tokens = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        logits[tokens] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        # counted on the host, where the ids are: bincount on a GPU would read them back to size its output
        tokens, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        counts = torch.from_numpy(counts).to(logits.device, logits.dtype)
        tokens = torch.from_numpy(tokens).to(logits.device)
        logits[tokens] -= params.frequency_penalty * counts + params.presence_penalty
    return logits
