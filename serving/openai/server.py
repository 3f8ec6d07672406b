"""`alphalora serve`: build the engine, the app, and run uvicorn."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from alphalora.model_source import default_served_name, model_folder
from alphalora.serving.engine import Engine, EngineConfig
from alphalora.serving.engine.async_engine import AsyncEngine

from .app import build_app
from .state import ServerState

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """['name=path', ...] -> {name: path}; raises ValueError naming the bad entry."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter expects NAME=PATH, got {spec!r}")
        if not Path(path).is_dir():
            raise ValueError(f"adapter {name!r}: {path} is not a folder")
        adapters[name] = path
    return adapters


def read_chat_template(value: str) -> str:
    """--chat-template as vLLM reads it: a file's text where `value` names a file, else the template itself."""
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a template long enough to be no valid file name
        pass
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def make_state(model_dir: str | Path, adapters: dict[str, str], *, api_key: str | None = None,
               adapter_dir: str | Path | None = None, max_loras: int = 4, max_num_seqs: int = 32,
               max_model_len: int | None = None, dtype: str = "auto", device: str = "cpu",
               served_name: str | None = None, max_num_batched_tokens: int = 512,
               enable_prefix_caching: bool = True, chat_template: str | None = None,
               engine_thread: bool = True) -> ServerState:
    """The engine and the server's settings. `chat_template`: a Jinja template, or a file holding one,
    for models whose tokenizer has none (or to replace it). `engine_thread`: the engine steps on a thread
    of its own (False: the caller runs `state.engine.run()`, as `serve` does)."""
    template = read_chat_template(chat_template) if chat_template else None
    config = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_loras=max_loras,
                          dtype=DTYPES[dtype], device=device, adapters=adapters,
                          max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching)
    engine = Engine.from_pretrained(model_folder(model_dir), config)
    for name in adapters:  # refuse bad adapters at start-up, not on the first request
        engine.adapters.get(name)
    if template is not None:
        engine.tokenizer.chat_template = template
    return ServerState(engine=AsyncEngine(engine, background=engine_thread), tokenizer=engine.tokenizer,
                       base_name=served_name or default_served_name(model_dir), max_model_len=engine.max_model_len,
                       api_key=api_key, adapter_dir=Path(adapter_dir) if adapter_dir else None)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serves until SIGINT or SIGTERM. The engine steps on this (the main) thread and the HTTP server's
    event loop runs on another: PyTorch's CPU kernels run on the OpenMP team of the thread that calls
    them, and a second team (the main thread's, from loading the model) beside the engine thread's makes
    libgomp's workers sleep between parallel regions (more threads than cores): a third slower CPU step.
    A signal stops the HTTP server first (requests in flight finish), then the engine."""
    import uvicorn

    if state.engine.steps_on_own_thread:
        raise ValueError("serve() runs the engine itself: build the state with engine_thread=False")
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=host, port=port, log_level="info"))
    http = threading.Thread(target=server.run, name="alphalora-http")

    def on_signal(sig, frame):  # uvicorn listens for signals only on the main thread, which the engine has
        server.handle_exit(sig, frame)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    http.start()
    threading.Thread(target=lambda: (http.join(), state.engine.stop()), daemon=True).start()
    try:
        state.engine.run()  # until the HTTP server has shut down
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
        http.join(timeout=30)
        state.engine.close()
    if not server.started:
        raise RuntimeError(f"the HTTP server could not start on {host}:{port} (the reason is in the log above)")
