"""/v1/completions and /v1/chat/completions: requests -> engine sequences -> OpenAI responses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from alphalora.adapters.inject import AdapterError
from alphalora.serving.engine import QueueFullError, SamplingParams, StepOutput
from alphalora.serving.engine.async_engine import EngineFailure

from .protocol import ChatCompletionRequest, ChatTemplateFields, CompletionRequest, SamplingFields, new_id, now
from .state import APIError, ServerState
from .text import TextTracker

LONG_TEXT_CHARS = 20_000  # prompts this long are tokenized off the event loop


@dataclass
class Choice:
    """One generated sequence of a response, as it accumulates."""

    index: int
    prompt_ids: list[int]
    tracker: TextTracker
    prompt_text: str = ""  # the prompt as the client sent it (what `echo` returns)
    tokens: list[StepOutput] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token or stop string that ended it (vLLM's field)
    prompt_logprobs: list = field(default_factory=list)  # the sequence's PromptLogprob per prompt token
    text_offset: int = 0  # streamed logprobs: where the next token's text starts in the choice's text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _stop_strings(body: SamplingFields) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def _params(body: SamplingFields, max_tokens: int, seed_offset: int, **extra) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=-1 if body.top_k == 0 else body.top_k,  # 0: off, as vLLM reads it
            seed=None if body.seed is None else body.seed + seed_offset, stop=_stop_strings(body),
            stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, min_p=body.min_p,
            logit_bias=_logit_bias(body.logit_bias), include_stop_str_in_output=body.include_stop_str_in_output,
            **extra)
    except ValueError as error:
        raise APIError(400, str(error)) from error


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias: keys are token ids written as strings; biases clamped to [-100, 100] (as vLLM)."""
    try:
        return {int(token): min(100.0, max(-100.0, float(value))) for token, value in (bias or {}).items()}
    except ValueError as error:
        raise APIError(400, f"logit_bias keys must be token ids, got {sorted(bias)[:3]}", param="logit_bias") from error


def _max_tokens(state: ServerState, prompt: list[int], requested: int | None, default: int | None,
                param: str = "prompt") -> int:
    """The request's max_tokens for this prompt, as vLLM reads it: a prompt that leaves no room for a token
    and a max_tokens over the context are refused; otherwise max_tokens (`default` where unset, all the
    room left where that is None) is cut to what the context leaves, and the sequence then ends with
    finish_reason "length" where the context ends."""
    if not prompt:
        raise APIError(400, "the prompt is empty", param=param)
    vocab = state.vocab_size
    if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
        raise APIError(400, f"token ids must be in [0, {vocab})", param=param)
    room = state.max_model_len - len(prompt)
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, your "
                       f"prompt contains {len(prompt)} input tokens, which leaves no room for any output tokens. "
                       "Please reduce the length of the input prompt.", param=param)
    if requested is not None and requested > state.max_model_len:
        raise APIError(400, f"max_tokens={requested} cannot be greater than max_model_len={state.max_model_len}. "
                       "Please request fewer output tokens.", param="max_tokens")
    wanted = requested if requested is not None else default
    return room if wanted is None else min(max(1, wanted), room)


async def _start(state: ServerState, prompts: list[list[int]], body: SamplingFields, max_tokens: list[int],
                 adapter: str | None, arrival: float, prompt_texts: list[str] | None = None, **extra):
    """Admits n sequences per prompt, all or none; returns (choices, streams). Maps refusals to HTTP errors."""
    requests, choices, stop = [], [], _stop_strings(body)
    for p, prompt in enumerate(prompts):
        for i in range(body.n):
            index = p * body.n + i
            requests.append((prompt, _params(body, max_tokens[p], index, **extra)))
            tracker = TextTracker(state.tokenizer, prompt, stop, body.min_tokens, body.include_stop_str_in_output)
            choices.append(Choice(index, prompt, tracker, prompt_texts[p] if prompt_texts else ""))
    try:
        admitted = await state.engine.add(requests, adapter, arrival)
    except QueueFullError as error:
        raise APIError(429, str(error), "rate_limit_exceeded") from error
    except AdapterError as error:
        raise APIError(404, str(error), "NotFoundError", "model") from error
    except ValueError as error:
        raise APIError(400, str(error)) from error
    except EngineFailure as error:
        raise APIError(503, f"{error}; the server is stopping", "service_unavailable") from error
    return choices, [state.engine.stream(seq, queue) for seq, queue in admitted]


async def _close(streams) -> None:
    for stream in streams:
        await stream.aclose()


async def _merged(choices: list[Choice], streams) -> AsyncIterator[tuple[Choice, StepOutput]]:
    """All choices' outputs as they come; closing this generator aborts whatever still runs."""
    if len(streams) == 1:  # most requests: the stream itself, without a task and a queue between
        try:
            async for out in streams[0]:
                yield choices[0], out
        finally:
            await _close(streams)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice, stream):
        try:
            async for out in stream:
                await queue.put((choice, out))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, raised there
            await queue.put((choice, error))
            return
        await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams, strict=True)]
    try:
        remaining = len(tasks)
        while remaining:
            choice, out = await queue.get()
            if out is None:
                remaining -= 1
                continue
            if isinstance(out, Exception):
                raise out
            yield choice, out
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(streams)


async def _guarded(pairs):
    """Passes (choice, output) pairs through; an engine failure becomes one OpenAI error payload."""
    try:
        async for pair in pairs:
            yield pair
    except EngineFailure as error:
        yield {"error": {"message": f"the engine failed on this request: {error}", "type": "internal_server_error",
                         "param": None, "code": 500}}, None


def _record(choice: Choice, out: StepOutput) -> str:
    """Adds a token to its choice; returns the text it adds. The engine ends a sequence on the token
    whose text holds a stop string, so the choice's text and finish reason follow the engine's (with
    include_stop_str_in_output a stop token's own text may hold one: vLLM then names the string)."""
    choice.tokens.append(out)
    stop_reason = out.seq.stop_reason if out.finished else None
    # EOS (stop_reason None, as vLLM's) and stop token ids end it adding no text; a stop string names itself
    stop_token = out.finished and out.seq.finish_reason == "stop" and not isinstance(stop_reason, str)
    delta = choice.tracker.add(out.token, out.finished, stop_token=stop_token)
    if choice.tracker.stopped or out.finished:
        choice.finish_reason = "stop" if choice.tracker.stopped else out.seq.finish_reason
        choice.stop_reason = choice.tracker.stop_string if choice.tracker.stopped else stop_reason
    if out.seq.prompt_logprobs and not choice.prompt_logprobs:
        choice.prompt_logprobs = list(out.seq.prompt_logprobs)
    return delta


async def _collect(request: Request, choices, streams) -> None:
    """Runs every choice to the end, aborting all of them if the client goes away."""
    async def consume():
        async for choice, out in _merged(choices, streams):
            _record(choice, out)

    task = asyncio.create_task(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            # (a response nobody reads, nginx's status for it: raising would log a traceback per disconnect)
            raise APIError(499, "the client closed the connection; its request was cancelled", "client_closed_request")
    try:
        task.result()
    except EngineFailure as error:
        raise APIError(500, f"the engine failed on this request: {error}", "internal_server_error") from error


def _usage(choices: list[Choice], prompts: list[list[int]]) -> dict:
    """OpenAI's usage; `prompt_tokens_details.cached_tokens` counts the prompt tokens the prefix cache
    served (each prompt's first choice: its other n - 1 are admitted with it)."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.tokens) for c in choices)
    per_prompt = max(1, len(choices) // max(1, len(prompts)))
    cached = sum(c.tokens[0].seq.num_cached_tokens for c in choices[::per_prompt] if c.tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _running_usage(body: SamplingFields, choices: list[Choice], prompts: list[list[int]]) -> dict:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far."""
    if body.stream_options and body.stream_options.continuous_usage_stats:
        return {"usage": _usage(choices, prompts)}
    return {}


def _truncated(prompt: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: the last max_model_len)."""
    if keep is None:
        return prompt
    if keep > max_model_len:
        raise APIError(400, f"truncate_prompt_tokens ({keep}) cannot be greater than max_model_len ({max_model_len}); "
                       "send a smaller value, or -1 for all the context holds", param="truncate_prompt_tokens")
    keep = max_model_len if keep == -1 else keep
    return prompt[-keep:] if keep else []


# -- /v1/completions ----------------------------------------------------------------------------------
def _top_with(top: dict[int, float] | None, token: int, logprob: float | None) -> dict[int, float]:
    """The token itself, then the top-k alternatives (vLLM's order): OpenAI's completions always list the
    chosen token's logprob among the top ones, so there may be logprobs + 1 entries."""
    return ({} if logprob is None else {token: logprob}) | dict(top or {})


def _token_name(tokenizer, token: int, as_id: bool | None) -> str:
    """How logprobs name a token: its decoded piece, or "token_id:{id}" (vLLM's return_tokens_as_token_ids)."""
    return f"token_id:{token}" if as_id else tokenizer.decode([token])


def _completion_logprobs(tokenizer, choice: Choice, outs: list[StepOutput], with_prompt: bool,
                         as_ids: bool | None = False) -> dict:
    """OpenAI's completions `logprobs` object for the echoed prompt (`with_prompt`) and then `outs`, with
    text offsets that go on across a choice's chunks (each token's offset: the text before it, by the
    tokens' names, as vLLM counts: "token_id:{id}" ones too)."""
    body: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token: int, logprob: float | None, top: dict[int, float] | None) -> None:
        name = _token_name(tokenizer, token, as_ids)
        body["tokens"].append(name)
        body["token_logprobs"].append(logprob)
        alternatives = None if logprob is None else _top_with(top, token, logprob)
        body["top_logprobs"].append(None if alternatives is None else
                                    {_token_name(tokenizer, t, as_ids): lp for t, lp in alternatives.items()})
        body["text_offset"].append(choice.text_offset)
        choice.text_offset += len(name)

    if with_prompt:
        entries = choice.prompt_logprobs or [None] * len(choice.prompt_ids)
        for token, entry in zip(choice.prompt_ids, entries, strict=False):
            add(token, None if entry is None else entry.logprob, None if entry is None else entry.top)
    for out in outs:
        add(out.token, out.logprob, out.top_logprobs)
    return body


def _vllm_prompt_logprobs(state: ServerState, choice: Choice, wanted: int | None) -> list | None:
    """vLLM's `prompt_logprobs`: None for the first token, then per prompt token {id: {logprob, rank,
    decoded_token}}, the token itself first and then its top alternatives (-inf written as -9999.0, as vLLM)."""
    if wanted is None:
        return None

    def entry(token: int, logprob: float, rank: int) -> dict:
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": state.tokenizer.decode([token])}

    listed: list = [None]
    for token, logprob in zip(choice.prompt_ids[1:], choice.prompt_logprobs[1:], strict=True):
        alternatives = {token: entry(token, logprob.logprob, logprob.rank)}
        for rank, (other, value) in enumerate(logprob.top.items(), start=1):
            alternatives[other] = entry(other, value, rank)
        listed.append(alternatives)
    return listed


def _as_prompt_only(choice: Choice) -> None:
    """max_tokens 0: the choice is its echoed prompt alone; the one token the engine made is dropped."""
    choice.tokens, choice.finish_reason, choice.stop_reason = [], "length", None


def _prompt_texts(state: ServerState, raw: list, prompts: list[list[int]]) -> list[str]:
    """What `echo` returns per prompt: the text as sent, or the decoded token ids."""
    return [p if isinstance(p, str) else state.tokenizer.decode(ids) for p, ids in zip(raw, prompts, strict=True)]


async def tokenize(state: ServerState, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text; long texts in a worker thread, so the event loop keeps streaming meanwhile
    (the fast tokenizers let go of the GIL while they encode)."""
    def encode() -> list[list[int]]:
        return [state.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]

    return encode() if sum(len(t) for t in texts) < LONG_TEXT_CHARS else await asyncio.to_thread(encode)


async def create_completion(request: Request, body: CompletionRequest, state: ServerState):
    arrival = time.monotonic()  # TTFT counts from here, tokenization included (as vLLM's)
    model = body.model or state.base_name
    adapter = state.resolve_adapter(model)
    raw = body.prompt
    if isinstance(raw, str):
        raw = [raw]
    elif raw and isinstance(raw[0], int):
        raw = [raw]
    if not raw:
        raise APIError(400, "the prompt is empty", param="prompt")
    texts = [p for p in raw if isinstance(p, str)]
    encoded = iter(await tokenize(state, texts))
    prompts = [_truncated(next(encoded) if isinstance(p, str) else list(p), body.truncate_prompt_tokens,
                          state.max_model_len) for p in raw]
    only_prompt = body.max_tokens == 0  # echo's prompt (and its logprobs) alone: lm-eval's loglikelihood
    max_tokens = [_max_tokens(state, prompt, body.max_tokens, 16) for prompt in prompts]
    prompt_logprobs = body.prompt_logprobs
    if prompt_logprobs is None and body.echo and body.logprobs is not None:  # the echoed prompt's (as vLLM)
        prompt_logprobs = body.logprobs
    choices, streams = await _start(state, prompts, body, max_tokens, adapter, arrival,
                                    _prompt_texts(state, raw, prompts) if body.echo else None,
                                    logprobs=body.logprobs, prompt_logprobs=prompt_logprobs)
    response_id, created, as_ids = new_id("cmpl"), now(), body.return_tokens_as_token_ids

    def chunk_of(choice: Choice, out: StepOutput, first: bool) -> tuple[str, dict | None]:
        """A token's text and logprobs; a choice's first also carries the echoed prompt."""
        delta = _record(choice, out)
        if only_prompt:
            _as_prompt_only(choice)
            delta = ""
        echo = first and body.echo
        logprobs = None
        if body.logprobs is not None:
            logprobs = _completion_logprobs(state.tokenizer, choice, choice.tokens[-1:], echo, as_ids)
        return (choice.prompt_text if echo else "") + delta, logprobs

    if not body.stream:
        await _collect(request, choices, streams)
        payload_choices = []
        for c in choices:
            if only_prompt:
                _as_prompt_only(c)
            text = (c.prompt_text if body.echo else "") + ("" if only_prompt else c.tracker.full_text())
            logprobs = None
            if body.logprobs is not None:
                logprobs = _completion_logprobs(state.tokenizer, c, c.tokens, body.echo, as_ids)
            payload_choices.append({"index": c.index, "text": text, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                    "prompt_logprobs": _vllm_prompt_logprobs(state, c, prompt_logprobs)})
        return JSONResponse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                             "choices": payload_choices, "usage": _usage(choices, prompts)})

    async def events():
        # The echoed prompt goes out with each choice's first token, as vLLM sends it: a chunk before any
        # token would read as the first token to clients that time TTFT (`vllm bench serve`).
        async for choice, out in _guarded(_merged(choices, streams)):
            if isinstance(choice, dict):
                yield _sse(choice)
                break
            if choice.finished:  # its finish chunk is sent: nothing follows it
                continue
            delta, logprobs = chunk_of(choice, out, not choice.tokens)
            yield _sse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": choice.index, "text": delta, "logprobs": logprobs,
                                     "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}],
                        **_running_usage(body, choices, prompts)})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": _usage(choices, prompts)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# -- /v1/chat/completions -----------------------------------------------------------------------------
def chat_text(state: ServerState, messages, template: ChatTemplateFields) -> str:
    """The conversation through the tokenizer's chat template, with the request's tools and template variables;
    a template that refuses the conversation (roles that do not alternate, say) is the client's error."""
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: start the server with --chat-template "
                       "FILE, or use /v1/completions")
    plain = [{"role": m.role, "content": _message_text(m.content, i)} for i, m in enumerate(messages)]
    extra = dict(template.chat_template_kwargs or {})
    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, tools=template.tools,
                                             add_generation_prompt=template.add_generation_prompt,
                                             continue_final_message=template.continue_final_message, **extra)
    except Exception as error:  # noqa: BLE001 - whatever the template raises, it raised for this request's input
        if isinstance(error, APIError):
            raise
        reason = error if isinstance(error, jinja2.TemplateError | ValueError | TypeError) else repr(error)
        raise APIError(400, f"the chat template refused the request: {reason}", param="messages") from error


def _message_text(content, index: int) -> str:
    """A message's content as text: a string, or OpenAI's list of content parts, which must all be text."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type", "a part without text")
            raise APIError(400, f"messages[{index}] has a content part of type {kind!r}: this server's models take "
                           "text only; send {\"type\": \"text\", \"text\": ...} parts or a string",
                           param=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


async def chat_prompt(state: ServerState, messages, template: ChatTemplateFields) -> list[int]:
    """The conversation's token ids (the template writes the special tokens itself)."""
    return (await tokenize(state, [chat_text(state, messages, template)], add_special_tokens=False))[0]


def _chat_logprobs(state: ServerState, outs: list[StepOutput], as_ids: bool | None = False) -> dict:
    """OpenAI's chat `logprobs`; with return_tokens_as_token_ids the tokens are named "token_id:{id}",
    and, as vLLM's, a chosen token's `bytes` stay its decoded piece's while an alternative's are its name's."""
    entries = []
    for out in outs:
        piece = state.tokenizer.decode([out.token])
        top = []
        # vLLM's: top_logprobs entries in all, the chosen token's first and then the most probable
        wanted = len(out.top_logprobs or {})
        for t, lp in list(_top_with(out.top_logprobs, out.token, out.logprob).items())[:wanted]:
            text = _token_name(state.tokenizer, t, as_ids)
            top.append({"token": text, "logprob": lp, "bytes": list(text.encode())})
        entries.append({"token": _token_name(state.tokenizer, out.token, as_ids), "logprob": out.logprob,
                        "bytes": list(piece.encode()), "top_logprobs": top})
    return {"content": entries}


async def create_chat_completion(request: Request, body: ChatCompletionRequest, state: ServerState):
    arrival = time.monotonic()
    model = body.model or state.base_name
    adapter = state.resolve_adapter(model)
    prompt = _truncated(await chat_prompt(state, body.messages, body), body.truncate_prompt_tokens,
                        state.max_model_len)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens == 0:
        raise APIError(400, "max_tokens must be at least 1 for a chat completion", param="max_tokens")
    max_tokens = _max_tokens(state, prompt, max_tokens, None, "messages")  # unset: whatever the context leaves
    top = body.top_logprobs if body.logprobs else None
    choices, streams = await _start(state, [prompt], body, [max_tokens], adapter, arrival,
                                    logprobs=(top or 0) if body.logprobs else None,
                                    prompt_logprobs=body.prompt_logprobs)
    response_id, created, as_ids = new_id("chatcmpl"), now(), body.return_tokens_as_token_ids
    if not body.stream:
        await _collect(request, choices, streams)
        return JSONResponse({
            "id": response_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.tracker.full_text()},
                         "logprobs": _chat_logprobs(state, c.tokens, as_ids) if body.logprobs else None,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in choices],
            "usage": _usage(choices, [prompt]),
            "prompt_logprobs": _vllm_prompt_logprobs(state, choices[0], body.prompt_logprobs)})

    async def events():
        base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
        announced = False
        async for choice, out in _guarded(_merged(choices, streams)):
            if isinstance(choice, dict):
                yield _sse(choice)
                break
            if not announced:  # the role chunks once the first token exists, as vLLM sends them (see above)
                announced = True
                for c in choices:
                    yield _sse({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}],
                                **_running_usage(body, [], [prompt])})
            if choice.finished:  # its finish chunk is sent: nothing follows it
                continue
            delta = _record(choice, out)
            logprobs = _chat_logprobs(state, [out], as_ids) if body.logprobs else None
            yield _sse({**base, "choices": [{"index": choice.index, "delta": {"content": delta},  # "" too, as vLLM
                                             "logprobs": logprobs,
                                             "finish_reason": choice.finish_reason,
                                             "stop_reason": choice.stop_reason}],
                        **_running_usage(body, choices, [prompt])})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(choices, [prompt])})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
