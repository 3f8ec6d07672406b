"""The FastAPI application: routes hold no state; they read the ServerState from app.state."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from alphalora import __version__
from alphalora.adapters.inject import AdapterError

from . import completions
from .metrics import metrics_registry, render_metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
    model_permission,
    now,
)
from .state import APIError, ServerState


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


class BodySizeLimit:
    """Refuses a request body over `limit` bytes with a 413: at once from its Content-Length, or, for a
    body sent in chunks without one, while reading it (the body then reaches the app from memory).
    Plain ASGI: a function middleware (`@app.middleware`) would pass every streamed chunk of every
    response through a task and a memory channel of its own."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._refuse(f"{int(length)} bytes", scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(f"more than {self.limit} bytes", scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope, receive, send) -> None:
        message = f"the request body ({size}) exceeds the server's limit of {self.limit} bytes: send a shorter prompt"
        await _error(413, message, "invalid_request_error")(scope, receive, send)


class RequireApiKey:
    """With an API key set, every /v1 route (and /tokenize, /detokenize) answers 401 unless the request
    carries `Authorization: Bearer <key>`: checked before the body is read, in constant time."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, key: str | None):
        self.app = app
        self.expected = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # the scheme's case is free (RFC 9110); the key is compared in constant time
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                message = "missing or wrong API key: send `Authorization: Bearer <key>`"
                await _error(401, message, "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="alphalora", description="OpenAI-compatible serving of MoE-LoRA and LoRA adapters")
    app.state.alphalora = state

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return _error(error.status, error.message, error.type, error.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            offset = first.get("loc", (None, None))[-1]
            reason = first.get("ctx", {}).get("error", "not valid JSON")
            return _error(400, f"the request body is not valid JSON: {reason} (at character {offset})",
                          "invalid_request_error")
        location = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")  # a validator's own message
        message += f" (at {location})" if location else ""
        return _error(400, message, "invalid_request_error", location)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, error: Exception):
        return _error(500, f"internal error: {type(error).__name__}: {error}", "internal_server_error")

    app.add_middleware(BodySizeLimit, limit=state.max_body_bytes)
    app.add_middleware(RequireApiKey, key=state.api_key)  # added last: runs first, before any body is read

    @app.get("/health")
    @app.get("/ping")  # SageMaker's health route, as vLLM serves it
    async def health():
        return PlainTextResponse("")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    registry = metrics_registry(state.engine, state.base_name)

    @app.get("/metrics")
    async def metrics():
        body, content_type = render_metrics(registry)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        created = now()
        data = [{"id": state.base_name, "object": "model", "created": created, "owned_by": "alphalora",
                 "root": state.base_name, "parent": None, "max_model_len": state.max_model_len,
                 "permission": [model_permission()]}]
        for name, path in dict(state.engine.engine.adapters.paths).items():  # a copy: loads change it
            data.append({"id": name, "object": "model", "created": created, "owned_by": "alphalora",
                         "root": str(path), "parent": state.base_name, "max_model_len": state.max_model_len,
                         "permission": [model_permission()]})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def create_completion(request: Request, body: CompletionRequest):
        return await completions.create_completion(request, body, state)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request, body: ChatCompletionRequest):
        return await completions.create_chat_completion(request, body, state)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        if state.adapter_dir is None:
            raise APIError(400, "loading adapters at run time is off; start the server with --adapter-dir DIR")
        path = Path(body.lora_path)
        path = (state.adapter_dir / path if not path.is_absolute() else path).resolve()
        if not path.is_relative_to(state.adapter_dir.resolve()):
            raise APIError(400, f"adapters load only from the adapter directory {state.adapter_dir}", param="lora_path")
        if not path.exists():  # vLLM's status for a path with no adapter
            raise APIError(404, f"Loading lora {body.lora_name} failed: no adapter found at {body.lora_path}",
                           "NotFoundError", "lora_path")
        registry = state.engine.engine.adapters

        def load() -> None:  # between engine steps, in a worker thread: the event loop keeps serving
            if body.lora_name == state.base_name:
                raise APIError(400, f"{body.lora_name!r} is the base model's name; name the adapter otherwise",
                               param="lora_name")
            try:
                registry.check_name(body.lora_name)
            except AdapterError as error:
                raise APIError(400, str(error), param="lora_name") from error
            replaced = registry.paths.get(body.lora_name)
            if replaced is not None and not body.load_inplace:
                raise APIError(400, f"an adapter named {body.lora_name!r} is already loaded; unload it first, or set "
                               "load_inplace to replace it", param="lora_name")
            replacement = None
            if replaced is not None:
                try:  # read before the old one goes: a bad replacement leaves the loaded adapter serving
                    replacement = registry.load(body.lora_name, path)
                except AdapterError as error:
                    raise APIError(400, str(error), param="lora_path") from error
                state.engine.engine.remove_adapter(body.lora_name)  # running requests finish with the old one
            try:
                registry.register(body.lora_name, path, True, loaded=replacement)
            except AdapterError as error:
                registry.unregister(body.lora_name)
                raise APIError(400, str(error), param="lora_path") from error
            except BaseException:  # an unforeseen failure leaves no half-registered adapter either
                registry.unregister(body.lora_name)
                raise

        await asyncio.to_thread(state.engine.run_locked, load)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        def unload() -> None:  # requests already running with it finish with it
            try:
                state.engine.engine.remove_adapter(body.lora_name)
            except AdapterError as error:
                raise APIError(404, f"no adapter named {body.lora_name!r}", "NotFoundError", "lora_name") from error

        await asyncio.to_thread(state.engine.run_locked, unload)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            state.resolve_adapter(body.model)  # a 404 for an unknown model, as vLLM
        if body.messages is not None:
            tokens = await completions.chat_prompt(state, body.messages, body)
        elif body.prompt is not None:
            tokens = (await completions.tokenize(state, [body.prompt], body.add_special_tokens))[0]
        else:
            raise APIError(400, "give `prompt` or `messages`")
        strings = state.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len, "token_strs": strings}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            state.resolve_adapter(body.model)
        if any(t < 0 or t >= state.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {state.vocab_size})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    return app
