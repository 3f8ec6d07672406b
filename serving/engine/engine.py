"""The engine: requests in, tokens out, one continuous-batching step at a time."""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from alphalora.adapters.inject import AdapterError

from .adapters import AdapterRegistry, ServedModel
from .block_manager import BlockManager
from .detokenizer import OutputText
from .family import check_servable
from .kv_pool import default_num_blocks
from .model_runner import PagedModelRunner
from .sampling import SampleResult, SamplingParams, read_logprobs, sample_rows
from .scheduler import Scheduler
from .sequence import PromptLogprob, Sequence
from .step_inputs import StepBatch, build_step_batch


@dataclass
class StepOutput:
    """What one step produced for one sequence."""

    seq: Sequence
    token: int
    logprob: float
    top_logprobs: dict[int, float] | None
    finished: bool


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int | None = None  # default: max_num_seqs full-length sequences, as many as free memory holds
    max_loras: int = 4
    max_waiting: int = 1024
    dtype: torch.dtype | None = None
    device: str = "cpu"
    adapters: dict[str, str] = field(default_factory=dict)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before

    def __post_init__(self):
        # A zero here would not fail: requests would wait for ever (no sequence, or no adapter, ever admitted).
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "num_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or None for the default), got {value!r}")


def auto_dtype(checkpoint_dtype: torch.dtype | None, device: str, bf16_supported: bool | None = None) -> torch.dtype:
    """`--dtype auto`: on a GPU as vLLM reads it, the checkpoint's half precision and a float32
    checkpoint in bfloat16 (float16 where the GPU has no bfloat16); float32 on the CPU, where vLLM 0.32
    would downcast a float32 checkpoint to bfloat16 as well (its CPU platform lists bfloat16 first)."""
    if not device.startswith("cuda"):
        return torch.float32
    if checkpoint_dtype in (torch.bfloat16, torch.float16):
        return checkpoint_dtype
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def _eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS first, then the generation config's EOS ids (as vLLM stops on them too: the
    tokenizer's as EOS, the others as stop token ids); without a tokenizer EOS, the model config's."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    generation = getattr(model, "generation_config", None)
    ids.append(getattr(generation, "eos_token_id", None))
    if ids == [None, None]:
        ids.append(getattr(model.config, "eos_token_id", None))
    flat = []
    for eos in ids:
        for token in [eos] if isinstance(eos, int) or eos is None else eos:
            if token is not None and token not in flat:
                flat.append(token)
    return flat


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        cfg = self.config
        check_servable(model.config)  # before the pool is sized from attention fields an encoder lacks
        self.tokenizer = tokenizer
        self.model = model.to(cfg.device, cfg.dtype) if cfg.dtype else model.to(cfg.device)
        context = getattr(model.config, "max_position_embeddings", 2048)
        if cfg.max_model_len is not None and cfg.max_model_len > context:
            # (as vLLM: positions past the model's would be extrapolated silently)
            raise ValueError(f"max_model_len {cfg.max_model_len} is longer than the model's context of {context} "
                             f"tokens (max_position_embeddings): pass {context} or less, or leave it unset")
        self.max_model_len = cfg.max_model_len or context
        weight_dtype = next(self.model.parameters()).dtype
        num_blocks = cfg.num_blocks or default_num_blocks(self.model.config, self.max_model_len, cfg.block_size,
                                                          cfg.max_num_seqs, weight_dtype, cfg.device)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_waiting,
                                   self.max_model_len, max_adapters=cfg.max_loras)
        self.runner = PagedModelRunner(self.model, num_blocks, cfg.block_size, self.max_model_len)
        fits = ServedModel.of(self.model, self.runner.swappable_heads(), self.runner.projected_modules())
        self.adapters = AdapterRegistry(cfg.max_loras, weight_dtype, cfg.device, fits)
        for name, path in cfg.adapters.items():
            self.adapters.register(name, path)
        self._ids = itertools.count()
        self._generators: dict[int, torch.Generator] = {}
        self._failed: list[tuple[Sequence, Exception]] = []
        # EOS ends a sequence unless ignore_eos, and cannot be sampled before min_tokens.
        self.eos_token_ids = _eos_token_ids(tokenizer, self.model)
        self._tokenizer_eos = getattr(tokenizer, "eos_token_id", None)  # vLLM's "EOS"; the other ids are stop tokens
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]  # the logits' width

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig | None = None) -> Engine:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = config or EngineConfig()
        model_config = AutoConfig.from_pretrained(model_dir)
        check_servable(model_config)  # before the weights load
        if config.dtype is None:
            stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
            stored = getattr(torch, stored) if isinstance(stored, str) else stored
            config = replace(config, dtype=auto_dtype(stored, config.device))
        model = AutoModelForCausalLM.from_pretrained(model_dir, config=model_config, dtype=config.dtype)  # (read once)
        return cls(model, AutoTokenizer.from_pretrained(model_dir), config)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Sequence:
        """Queues a request; raises QueueFullError, ValueError (empty, too long, a token outside the vocabulary) or
        AdapterError (unknown adapter)."""
        if isinstance(prompt_ids, (np.ndarray, torch.Tensor)):  # (as tokenizers return them with return_tensors)
            if prompt_ids.ndim != 1:
                raise ValueError(f"a prompt is one sequence of token ids; got an array of shape "
                                 f"{tuple(prompt_ids.shape)} (pass each row as its own request)")
            prompt_ids = prompt_ids.tolist()
        if not prompt_ids:
            raise ValueError("the prompt is empty: a request needs at least one prompt token")
        outside = [t for t in prompt_ids if not (isinstance(t, numbers.Integral) and 0 <= t < self.vocab_size)]
        if outside:  # an id past the embedding would fail every step of every request in the batch
            raise ValueError(f"the prompt holds token ids outside the vocabulary of {self.vocab_size}: {outside[:5]}")
        if adapter is not None:
            self.adapters.check(adapter)  # fail now, not mid-batch, if it cannot be loaded
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ValueError(f"logit_bias names token {max(params.logit_bias)}, outside the vocabulary of "
                             f"{self.vocab_size}")
        if any(not 0 <= t < self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids names a token outside the vocabulary of {self.vocab_size}: "
                             f"{[t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]}")
        # (everything that can fail before the queue: a request refused is not left in it to run unseen)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(next(self._ids), [int(t) for t in prompt_ids], params.max_tokens, adapter=adapter,
                       params=params)
        if self.config.enable_prefix_caching:
            seq.cache_salt = self.adapters.cache_key(adapter) if adapter is not None else ""
            seq.reuse_cached_prefix = params.prompt_logprobs is None  # cached tokens have no logits
        self.scheduler.add(seq)
        if generator is not None:
            self._generators[seq.seq_id] = generator
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancels a request and frees its KV blocks at once."""
        self.scheduler.finish(seq, "abort", cancelled=True)
        self._generators.pop(seq.seq_id, None)
        self._drop_retired_adapters()

    # -- adapters ----------------------------------------------------------------------------------
    def remove_adapter(self, name: str) -> None:
        """Unloads an adapter without dropping a request: new requests for it are refused from now on,
        and the sequences that already run or wait with it finish with it (its weights go after them)."""
        if name not in self.adapters.paths:
            raise AdapterError(f"unknown adapter {name!r}")
        users = self._sequences_on(name)
        if not users:
            self.adapters.unregister(name)
            return
        retired = self.adapters.retire(name)
        for seq in users:
            seq.adapter = retired

    def _live_sequences(self) -> list[Sequence]:
        return [*self.scheduler.running, *self.scheduler.waiting]

    def _sequences_on(self, adapter: str) -> list[Sequence]:
        """The running and waiting sequences that use `adapter`."""
        return [seq for seq in self._live_sequences() if seq.adapter == adapter]

    def _drop_retired_adapters(self) -> None:
        if not self.adapters.retired:
            return
        in_use = {seq.adapter for seq in self._live_sequences()}
        for name in [name for name in self.adapters.retired if name not in in_use]:
            self.adapters.unregister(name)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        output = self.scheduler.schedule()
        self._load_step_adapters(output)
        if not output.chunks:
            return []
        logits, every = self.runner.forward(self._batch_inputs(output.chunks))
        for index, chunk_logits in every.items():
            self._record_prompt_logprobs(output.chunks[index], chunk_logits)
        sampled = self._sample(output.chunks, logits)
        self.scheduler.update(output, {k: v.token for k, v in sampled.items()})
        results = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.seq_id not in sampled:
                continue
            result = sampled[seq.seq_id]
            reason = self._finish_reason(seq, result.token)
            if reason:
                self.scheduler.finish(seq, reason)
                self._generators.pop(seq.seq_id, None)
            results.append(StepOutput(seq, result.token, result.logprob, result.top_logprobs, bool(reason)))
        self._drop_retired_adapters()
        return results

    def _load_step_adapters(self, output) -> None:
        """Loads the adapters the step needs. One that no longer loads (its folder changed on disk after
        it was checked) fails its own sequences, which `take_failed` hands over, not the whole step."""
        for name in {chunk.seq.adapter for chunk in output.chunks if chunk.seq.adapter is not None}:
            try:
                self.adapters.get(name)
            except AdapterError as error:
                for seq in self._sequences_on(name):
                    self.abort(seq)
                    self._failed.append((seq, error))
        output.chunks = [chunk for chunk in output.chunks if not chunk.seq.is_finished]

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        """The sequences that failed since the last call (their adapter would not load), with why."""
        failed, self._failed = self._failed, []
        return failed

    def _batch_inputs(self, chunks) -> StepBatch:
        """The step's token ids, positions and KV slots, one entry per scheduled chunk."""
        ids = []
        for chunk in chunks:
            ids.extend(chunk.seq.all_ids[chunk.start:chunk.start + chunk.num_tokens])
        seqs = [chunk.seq for chunk in chunks]
        return build_step_batch(
            ids, [chunk.start for chunk in chunks], [chunk.num_tokens for chunk in chunks],
            [self.blocks.block_table(seq.seq_id) for seq in seqs], self.blocks.block_size,
            [self.adapters.get(seq.adapter) if seq.adapter else None for seq in seqs],
            [chunk.seq.params.prompt_logprobs is not None and chunk.start < len(chunk.seq.prompt_ids)
             for chunk in chunks])

    def _sample(self, chunks, logits: torch.Tensor) -> dict[int, SampleResult]:
        """The next token of every sequence whose prompt is complete after this step, by sequence id."""
        rows = [row for row, chunk in enumerate(chunks) if chunk.completes_prompt]
        if not rows:
            return {}
        seqs = [chunks[row].seq for row in rows]
        requests = [(s.params, s.prompt_ids, s.output_ids, self._generators.get(s.seq_id)) for s in seqs]
        picked = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=logits.device)]
        sampled = sample_rows(picked, requests, self.eos_token_ids)
        return {s.seq_id: result for s, result in zip(seqs, sampled, strict=True)}

    @staticmethod
    def _record_prompt_logprobs(chunk, chunk_logits: torch.Tensor) -> None:
        """Each prompt token's logprob given tokens < it, for the prompt positions this chunk covers."""
        seq = chunk.seq
        if chunk.start == 0:  # (again, after a preemption: the prompt is recomputed from its start)
            seq.prompt_logprobs = [None]  # the first token has no context
        targets = seq.prompt_ids[chunk.start + 1: chunk.start + chunk.num_tokens + 1]
        if not targets:
            return
        logprobs = torch.log_softmax(chunk_logits[:len(targets)].float(), dim=-1)
        chosen = torch.tensor(targets, device=logprobs.device)
        # vLLM's rank: the tokens at least as probable, itself included
        ranks = (logprobs >= logprobs.gather(1, chosen[:, None])).sum(dim=1)
        for (rank,), logprob, top in read_logprobs(logprobs, chosen, seq.params.prompt_logprobs or 0, ranks):
            seq.prompt_logprobs.append(PromptLogprob(logprob, top, int(rank)))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params: SamplingParams = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            # vLLM's stop_reason: None for the EOS, the id for any other stop token (the generation
            # config's further EOS ids are stop token ids to vLLM)
            seq.stop_reason = None if token == self._tokenizer_eos else token
            return "stop"
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if params.stop and self.tokenizer is not None and self._stop_string_ends(seq, token):
            seq.stop_reason = seq.output_text.stop_string
            return "stop"
        if len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _stop_string_ends(self, seq: Sequence, token: int) -> bool:
        """Whether the output's text (decoded a token at a time, after the prompt) now holds a stop
        string: `OutputText`'s rules, which the server's text follows too."""
        if seq.output_text is None:
            params = seq.params
            seq.output_text = OutputText(self.tokenizer, seq.prompt_ids, params.stop, params.min_tokens,
                                         params.include_stop_str_in_output)
        return seq.output_text.add(token)

    # -- offline use -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Sequence]:
        """Runs the requests to completion, all in the same continuous batch."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        for what, values in (("params", params_list), ("adapters", adapters)):
            if len(values) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(values)} {what}: give one per prompt")
        seqs = []
        try:
            for prompt, sampling, adapter in zip(prompts, params_list, adapters, strict=True):
                seqs.append(self.add_request(prompt, sampling, adapter))
        except BaseException:  # a refused prompt leaves none of the call's requests queued
            for seq in seqs:
                self.abort(seq)
            raise
        while self.has_work():
            self.step()
        return seqs
