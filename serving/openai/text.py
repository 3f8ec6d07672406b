"""Text deltas and stop strings for streamed choices."""

from __future__ import annotations

from alphalora.serving.engine.detokenizer import IncrementalDetokenizer, find_stop, longest_stop


class TextTracker:
    """Turns a growing list of token ids into text deltas (decoded incrementally), holding back
    incomplete UTF-8 and anything that could be the start of a stop string; the text ends where the
    first stop string begins."""

    def __init__(self, tokenizer, stop: list[str]):
        self.stop = [s for s in stop if s]
        self._hold = max(0, longest_stop(self.stop) - 1)
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._end: int | None = None  # where the first stop string begins
        self._emitted = 0
        self.stopped = False

    def full_text(self) -> str:
        text = self._detokenizer.text
        return text if self._end is None else text[:self._end]

    def add(self, token: int, final: bool) -> str:
        """The new text after `token` (everything left when `final` or stopped)."""
        if self.stopped:
            return ""
        searched = len(self._detokenizer.text)
        self._detokenizer.add(token)
        if final:
            self._detokenizer.flush()
        if self.stop:  # a new match begins at most len(stop) - 1 characters before the new text
            self._end = find_stop(self._detokenizer.text, self.stop, max(0, searched - self._hold))
            self.stopped = self._end is not None
        text = self.full_text()
        end = len(text) if final or self.stopped else max(self._emitted, len(text) - self._hold)
        delta = text[self._emitted:end]
        self._emitted = end
        return delta
