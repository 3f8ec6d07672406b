"""The OpenAI-compatible HTTP API over the engine (FastAPI); vLLM's route and body conventions."""

from .app import build_app
from .state import APIError, ServerState

__all__ = ["APIError", "ServerState", "build_app"]
