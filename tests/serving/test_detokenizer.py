"""Incremental detokenisation against the tokenizer's own whole-sequence decode, on four kinds of tokenizer."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from alphalora.serving.engine.detokenizer import IncrementalDetokenizer
from tests.tiny_models import tiny_tokenizer

SPECIALS = ["<pad>", "<s>", "</s>"]


def _stdlib_text() -> list[str]:
    """Real text with multi-byte characters: the standard library's json and email sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path.read_text(encoding="utf-8") for package in ("json", "email")
            for path in sorted((root / package).glob("*.py"))]


def _trained(pre_tokenizer, decoder, alphabet=()):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    tokenizer.train_from_iterator(_stdlib_text() + ["héllo wörld → ünïcode ✓ 日本語 😀"],
                                  trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS,
                                                      initial_alphabet=list(alphabet)))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module", params=["byte-level BPE", "sentencepiece-style BPE", "word-piece", "word-level"])
def tokenizer(request, minilm_dir):
    if request.param == "byte-level BPE":  # GPT-2, Llama 3, Qwen2: bytes, so a token can end mid-character
        return _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                        pre_tokenizers.ByteLevel.alphabet())
    if request.param == "sentencepiece-style BPE":  # Llama 2, Mistral, Gemma: "▁" marks a word's leading space
        return _trained(pre_tokenizers.Metaspace(), decoders.Metaspace())
    if request.param == "word-piece":  # BERT: "##" continues a word (all-MiniLM-L6-v2's real tokenizer)
        return AutoTokenizer.from_pretrained(minilm_dir)
    return tiny_tokenizer()


def _check(tokenizer, ids: list[int]) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = ""
    for n, token in enumerate(ids, start=1):
        streamed += detokenizer.add(token)
        assert detokenizer.text == streamed
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert whole.startswith(streamed), (n, whole[-40:], streamed[-40:])
    streamed += detokenizer.flush()
    assert streamed == detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_streamed_text_is_the_whole_decode_for_real_text(tokenizer):
    """What a model writes: tokenised text, with special tokens between pieces."""
    text = _stdlib_text()[1][:3000] + " héllo wörld → ünïcode ✓ 日本語 😀 done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token or tokenizer.sep_token)
    _check(tokenizer, ids[:400] + [special] + ids[400:800] + [special, special] + ids[800:])


def test_a_completion_continues_its_prompt_text(tokenizer):
    """After a prompt, the text is what the tokens add to the prompt's decode: a sentencepiece word that
    begins the completion keeps its leading space (decoded alone it would lose it), a word piece joins
    the prompt's last word."""
    text = " ".join(_stdlib_text()[3].split()[:300])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for split in (1, 7, 40, 41, 100, 170):
        prompt, output = ids[:split], ids[split:]
        if not tokenizer.decode(prompt[-5:], skip_special_tokens=True):
            continue  # the window's prompt tokens show no text (all unknown words here): nothing to continue
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        streamed = "".join(detokenizer.add(t) for t in output) + detokenizer.flush()
        before = tokenizer.decode(prompt, skip_special_tokens=True)
        whole = tokenizer.decode(prompt + output, skip_special_tokens=True)
        assert whole.startswith(before) and streamed == whole[len(before):], split


def test_streamed_text_is_the_whole_decode_for_random_tokens(tokenizer):
    """Any token after any other (sampling at a high temperature): byte tokens that never complete a
    character, special tokens, word pieces with nothing to continue."""
    rng = random.Random(0)
    for _ in range(20):
        _check(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))])


def test_a_character_split_across_tokens_is_held_back_until_complete():
    tokenizer = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                         pre_tokenizers.ByteLevel.alphabet())
    byte_token = {ch: tokenizer.convert_tokens_to_ids(ch) for ch in pre_tokenizers.ByteLevel.alphabet()}
    mapping = dict(zip(range(256), _bytes_to_unicode(), strict=True))
    emoji = [byte_token[mapping[b]] for b in "😀".encode()]  # four byte tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add(t) for t in [byte_token["a"], *emoji]] == ["a", "", "", "", "😀"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def test_streamed_choice_text_ends_where_the_first_stop_string_begins(tokenizer):
    """TextTracker against the whole decode cut at the first stop string: the deltas join to it, and
    no delta ever carries text from the stop string on."""
    from alphalora.serving.openai.text import TextTracker

    rng = random.Random(1)
    text = _stdlib_text()[2][:2000] + " héllo wörld → ünïcode ✓ 日本語 😀 done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(10):
        at = rng.randrange(len(whole) // 4, len(whole) - 8)
        stops = [whole[at:at + rng.randrange(1, 8)], "never in this text \x00"]
        cut = min(i for i in (whole.find(s) for s in stops) if i != -1)
        tracker = TextTracker(tokenizer, [], stops)
        deltas = []
        for n, token in enumerate(ids, start=1):
            deltas.append(tracker.add(token, final=n == len(ids)))
            assert len("".join(deltas)) <= cut
            if tracker.stopped:
                break
        assert tracker.stopped and "".join(deltas) == tracker.full_text() == whole[:cut]


def _first_stop_token(texts: list[str], stop: str, min_tokens: int) -> int | None:
    """The first token n > min_tokens whose text completes `stop` (a match may begin in earlier tokens'
    text), from the whole decodes texts[n - 1] of the first n tokens."""
    for n in range(min_tokens + 1, len(texts) + 1):
        before = len(texts[n - 2]) if n >= 2 else 0
        if stop in texts[n - 1][max(0, before - len(stop) + 1):]:
            return n
    return None


def test_the_engine_ends_a_sequence_at_the_token_whose_text_first_holds_a_stop_string():
    """vLLM's rules: from token min_tokens + 1 on, in the text each token adds (a match may begin in the
    text before it); a stop string wholly inside the first min_tokens tokens' text does not count."""
    from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
    from tests.tiny_models import build

    tokenizer = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                         pre_tokenizers.ByteLevel.alphabet())
    engine = Engine(build("llama", 0, vocab_size=len(tokenizer)), tokenizer=tokenizer,
                    config=EngineConfig(block_size=4))
    prompt = [5, 9, 14]
    sampling = dict(max_tokens=32, temperature=1.0, seed=3, ignore_eos=True)
    (plain,) = engine.generate([prompt], SamplingParams(**sampling))
    texts = [tokenizer.decode(plain.output_ids[:n], skip_special_tokens=True) for n in range(1, 33)]
    # A stop string across two tokens' text (the end of one and the start of the next), first seen there.
    first, stop = next((n, texts[n - 1][len(texts[n - 2]) - 2:len(texts[n - 2]) + 2]) for n in range(6, 33)
                       if len(texts[n - 2]) >= 2 and len(texts[n - 1]) >= len(texts[n - 2]) + 2
                       and not any(texts[n - 1][len(texts[n - 2]) - 2:len(texts[n - 2]) + 2] in t
                                   for t in texts[:n - 1]))
    for min_tokens in (0, first - 1, first, 20):
        expected = _first_stop_token(texts, stop, min_tokens)
        (stopped,) = engine.generate([prompt], SamplingParams(**sampling, min_tokens=min_tokens,
                                                              stop=["not in this text \x00", stop]))
        assert stopped.output_ids == plain.output_ids[:expected or 32], min_tokens
        assert stopped.finish_reason == ("stop" if expected else "length")
        assert stopped.stop_reason == (stop if expected else None)
    assert _first_stop_token(texts, stop, 0) == _first_stop_token(texts, stop, first - 1) == first
    assert _first_stop_token(texts, stop, first) != first  # the stop string then lies inside min_tokens' text


def test_of_several_stop_strings_the_one_that_ends_first_wins():
    """vLLM's rule when one token's text completes several: the earliest to end, not to begin."""
    from alphalora.serving.engine.detokenizer import find_stop

    assert find_stop("xx abcd", ["abcd", "bc"], new_from=3) == (4, "bc")
    assert find_stop("xx abcd", ["bc", "abcd"], new_from=3) == (4, "bc")
    assert find_stop("xx abcd", ["cd", "bc"], new_from=6) == (5, "cd")  # "bc" ended before the new text
    assert find_stop("xx abcd", ["ab"], new_from=6) is None
