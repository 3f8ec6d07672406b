"""Text deltas and stop strings for streamed choices."""

from __future__ import annotations

from alphalora.serving.engine.detokenizer import OutputText, longest_stop


class TextTracker:
    """Turns a choice's tokens into text deltas, holding back anything that could be the start of a
    stop string (incomplete UTF-8 is held back by the detokenizer). The text and where it stops are
    the engine's (`OutputText`, the same rules on both sides). With `include_stop` the stop string
    stays in the text, and nothing is held back (vLLM's include_stop_str_in_output)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], min_tokens: int = 0,
                 include_stop: bool = False):
        self._text = OutputText(tokenizer, prompt_ids, stop, min_tokens, include_stop)
        self._hold = 0 if include_stop else max(0, longest_stop(self._text.stop) - 1)
        self._emitted = 0

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    @property
    def stop_string(self) -> str | None:
        return self._text.stop_string

    def full_text(self) -> str:
        return self._text.text

    def add(self, token: int, final: bool, stop_token: bool = False) -> str:
        """The new text after `token` (everything left when `final` or stopped)."""
        if self.stopped:
            return ""
        self._text.add(token, final, stop_token)
        text = self._text.text
        end = len(text) if final or self.stopped else max(self._emitted, len(text) - self._hold)
        delta = text[self._emitted:end]
        self._emitted = end
        return delta
