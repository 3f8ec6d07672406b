"""Incremental detokenisation: the text of a growing token sequence at a few tokens' decoding per token."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """The text of `ids` as tokens arrive, equal to `tokenizer.decode(ids, skip_special_tokens=True)`.

    Decoding the whole sequence again per token costs O(length) each time (a 1024-token output: some
    150 us a token here, with the GIL held, per stream). This decodes a window of the last few tokens
    twice, with and without the new ones, and takes the difference (the method vLLM and TGI use): each
    window starts at a token boundary that both decodes share, so a tokenizer's handling of a leading
    space or a word-piece prefix cancels out. Text ending in an incomplete UTF-8 sequence is held back
    until a later token completes it, or until `flush`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # confirmed text so far
        self._prefix = 0  # the window: ids[_prefix:_read] is decoded text already confirmed
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Appends `token`; returns the text it confirms (may be empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Confirms whatever is held back (an incomplete character decodes as U+FFFD, as a whole decode
        gives it); returns that text."""
        before = self._decode(self.ids[self._prefix:self._read])
        delta = self._decode(self.ids[self._prefix:])[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first of `stops` begins in `text`, looking at matches that begin at `start` or later."""
    found = [i for i in (text.find(s, start) for s in stops) if i != -1]
    return min(found) if found else None


def longest_stop(stops: list[str]) -> int:
    return max((len(s) for s in stops), default=0)
