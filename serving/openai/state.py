"""What the HTTP layer needs, kept on app.state: the engine, the tokenizer and the server options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alphalora.serving.engine.async_engine import AsyncEngine


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type; rendered as {"error": {...}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: object
    base_name: str
    max_model_len: int
    api_key: str | None = None
    adapter_dir: Path | None = None
    max_body_bytes: int = 8 * 2**20

    def resolve_adapter(self, model: str) -> str | None:
        """None for the base model, the adapter's name otherwise; 404 for anything else."""
        if model == self.base_name:
            return None
        if model in self.engine.engine.adapters.paths:
            return model
        raise APIError(404, f"The model `{model}` does not exist. Known: {self.known_models()}", "NotFoundError",
                       "model")

    @property
    def vocab_size(self) -> int:
        """The token ids a request may name: the model's (its logits' width, often past the tokenizer's
        last id, and which the model may generate), as vLLM accepts them."""
        return max(len(self.tokenizer), getattr(self.engine.engine, "vocab_size", 0))

    def known_models(self) -> list[str]:
        return [self.base_name, *self.engine.engine.adapters.paths]
