"""Incremental detokenisation: the text of a growing token sequence at a few tokens' decoding per token."""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


PROMPT_CONTEXT_TOKENS = 5  # how many prompt tokens the first output tokens are decoded after (vLLM's 5)


class IncrementalDetokenizer:
    """The text that the tokens after `prompt_ids` add to the prompt's, as they arrive: what
    `decode(prompt_ids + ids)` has beyond `decode(prompt_ids)` (skipping special tokens).

    Decoding the whole sequence again per token costs O(length) each time (a 1024-token output: some
    150 us a token here, with the GIL held, per stream). This decodes a window of the last few tokens
    twice, with and without the new ones, and takes the difference (the method vLLM and TGI use): each
    window starts at a token boundary that both decodes share, so a tokenizer's handling of a leading
    space or a word-piece prefix cancels out. Text ending in an incomplete UTF-8 sequence is held back
    until a later token completes it, or until `flush`.

    The window starts in the prompt's last few tokens, as vLLM's does: a sentencepiece tokenizer
    (Llama 2, Mistral, Gemma) drops the space that begins a word when the word starts a decode, so a
    completion decoded on its own would lose the space between the prompt and its first word.
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        context = list(prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:]
        self.ids: list[int] = context  # the prompt's last tokens, then the output's
        self.text = ""  # confirmed text of the output so far
        self._prefix = 0  # the window: ids[_prefix:_read] is decoded text already confirmed
        self._read = len(context)

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


class OutputText:
    """A sequence's output text, cut where the first stop string begins: what the engine ends a
    sequence on and what the server sends, computed the same way on both sides (vLLM's rules).

    Stop strings are looked for once more than `min_tokens` tokens exist, in the text each new token
    adds (a match may begin up to len(stop) - 1 characters before it, so one spanning tokens is found);
    where several match, the one that ends first wins. A token that ended the sequence as a stop token
    (EOS, stop_token_ids) adds no text.

    With `include_stop` (vLLM's include_stop_str_in_output) the text is cut where the stop string ends
    instead, and a stop token's text is kept (a special token's is empty).
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, stop: list[str] | None = None,
                 min_tokens: int = 0, include_stop: bool = False):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = [s for s in stop or [] if s]
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.num_tokens = 0
        self.end: int | None = None  # where the text is cut once a stop string is found
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        text = self._detokenizer.text
        return text if self.end is None else text[:self.end]

    @property
    def stopped(self) -> bool:
        return self.end is not None

    def add(self, token: int, final: bool = False, stop_token: bool = False) -> bool:
        """Appends a token (`final`: the sequence ends with it; `stop_token`: it ended the sequence as a
        stop token and adds no text); returns whether the text now holds a stop string."""
        if self.stopped:
            return True
        self.num_tokens += 1
        searched = len(self._detokenizer.text)
        if not stop_token or self.include_stop:
            self._detokenizer.add(token)
        if final:
            self._detokenizer.flush()
        if self.stop and self.num_tokens > self.min_tokens and len(self._detokenizer.text) > searched:
            found = find_stop(self._detokenizer.text, self.stop, searched)
            if found is not None:
                begin, self.stop_string = found
                self.end = begin + len(self.stop_string) if self.include_stop else begin
        return self.stopped


def find_stop(text: str, stops: list[str], new_from: int = 0) -> tuple[int, str] | None:
    """The first stop string to end in `text[new_from:]` (a match may begin before `new_from`): where
    it begins, and which it is; ties go to the earlier in `stops`."""
    best = None
    for stop in stops:
        begin = text.find(stop, max(0, new_from - len(stop) + 1))
        if begin != -1 and (best is None or begin + len(stop) < best[0] + len(best[1])):
            best = (begin, stop)
    return best


def longest_stop(stops: list[str]) -> int:
    return max((len(s) for s in stops), default=0)
