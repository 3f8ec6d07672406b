"""Request and response bodies of the OpenAI-compatible API (vLLM's conventions); unknown fields are ignored."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alphalora.serving.engine.sampling import GREEDY_BELOW

MAX_N = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far on every chunk as well


class SamplingFields(_Request):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # NaN and infinities: refused (as vLLM's)

    model: str | None = None  # the base model or an adapter by name; unset: the base model (as vLLM)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    n: int = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a 64-bit generator seed, as vLLM's
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias, clamped to [-100, 100]
    stream: bool = False
    stream_options: StreamOptions | None = None
    include_stop_str_in_output: bool = False  # vLLM's: the text keeps the stop string that ended it
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:{id}" (None: off)
    # vLLM's: keep the prompt's last k tokens (-1: as many as the context holds)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    response_format: dict[str, Any] | None = None  # only {"type": "text"}: this server has no guided decoding
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's: each prompt token's, with k more

    @model_validator(mode="after")
    def _stop_strings_not_empty(self):
        if self.stop == "" or (isinstance(self.stop, list) and "" in self.stop):
            raise ValueError("stop cannot contain an empty string")
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    @model_validator(mode="after")
    def _prompt_logprobs_are_whole(self):
        if self.stream and self.prompt_logprobs:
            raise ValueError("`prompt_logprobs` are not available when `stream=True`: ask for them without "
                             "streaming (or set prompt_logprobs to 0)")
        return self

    @model_validator(mode="after")
    def _greedy_is_one_sample(self):
        if self.n > 1 and self.temperature < GREEDY_BELOW:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}: greedy samples are all alike; "
                             "set a temperature above 0 for several samples")
        return self

    @model_validator(mode="after")
    def _no_guided_decoding(self):
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise ValueError(f"response_format {kind!r} is not supported: this server has no guided decoding; "
                             "leave response_format out (or {\"type\": \"text\"}) and ask for the format in "
                             "the prompt")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _no_suffix(self):
        if self.suffix is not None:
            raise ValueError("suffix is not supported: the models served here do not fill in the middle; "
                             "leave suffix out")
        return self

    @model_validator(mode="after")
    def _tokens_or_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1, got 0 (0 is for echo=true: the prompt's logprobs "
                             "alone)")
        return self

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} with n={self.n} is not supported: each of the n samples is "
                             "returned; leave best_of unset (or equal to n)")
        return self


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatTemplateFields(_Request):
    """What the chat template renders besides the messages (vLLM's fields)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is left open for the model to go on
    tools: list[dict[str, Any]] | None = None  # rendered by templates that know tools
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables (enable_thinking, ...)
    chat_template: str | None = None  # (refused, as vLLM refuses it without --trust-request-chat-template)

    @model_validator(mode="after")
    def _no_template_of_the_requests_own(self):
        # A template is a program: one sent with a request could run for hours on the server's time (or raise
        # anything), so only the server's own (the tokenizer's, or --chat-template) renders.
        if self.chat_template is not None or "chat_template" in (self.chat_template_kwargs or {}):
            raise ValueError("a chat template sent with the request is refused: this server renders its own (the "
                             "model's, or the one given to `alphalora serve --chat-template`)")
        return self

    @model_validator(mode="after")
    def _open_or_new_message(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to true: set "
                             "add_generation_prompt to false to continue the last message")
        return self


class ChatCompletionRequest(ChatTemplateFields, SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _no_tool_calls(self):
        # OpenAI's default with tools is "auto"; none of the choices that parse calls is served (as vLLM
        # without a tool-call parser)
        choice = self.tool_choice if self.tool_choice is not None or not self.tools else "auto"
        if choice not in (None, "none"):
            raise ValueError(f"tool_choice {choice!r} is not supported: this server renders `tools` into the prompt "
                             "but parses no tool calls from the output; send tool_choice \"none\" with the tools "
                             "and read calls from the text")
        return self


class LoadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # replace an adapter of that name (vLLM's)


class UnloadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)


class TokenizeRequest(ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)  # through the chat template (vLLM's)
    add_special_tokens: bool = True
    return_token_strs: bool = False  # vLLM's: each token's string as well


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def model_permission() -> dict:
    """vLLM's ModelPermission with its defaults, as each /v1/models entry lists it."""
    return {"id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission", "created": now(),
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
            "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())

