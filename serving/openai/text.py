"""Incremental detokenisation and stop strings for streamed choices."""

from __future__ import annotations


class TextTracker:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 and
    anything that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def full_text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            index = text.find(s)
            if index != -1:
                self.stopped = True
                text = text[:index]
        return text

    def add(self, token: int, final: bool) -> str:
        """The new text after `token` (everything left when `final`)."""
        self.ids.append(token)
        text = self.full_text()
        if not final and not self.stopped:
            if text.endswith("\ufffd"):
                return ""
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(len(self.emitted), len(text) - hold)] if hold else text
        delta = text[len(self.emitted):]
        self.emitted += delta
        return delta
