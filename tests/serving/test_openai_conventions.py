"""The OpenAI API's finer conventions, as OpenAI documents them and vLLM serves them: completion text that
continues the prompt, stop strings with min_tokens, echo, logprobs (streamed or not), usage, parameter
checks and the API key. A model whose vocabulary is its tokenizer's, so every token has text."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from alphalora.serving.engine import SamplingParams
from alphalora.serving.openai import build_app
from alphalora.serving.openai.server import make_state
from tests.serving.test_openai_api import CHAT_TEMPLATE
from tests.tiny_models import save_tiny, save_word_model

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_word_model(tmp_path_factory.mktemp("conventions") / "words", CHAT_TEMPLATE)
    state = make_state(model_dir, {}, max_num_seqs=8)
    yield TestClient(build_app(state)), state, model_dir
    state.engine.close()


def _completion(client, state, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": state.base_name, "prompt": PROMPT, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def _stream(client, path: str, payload: dict) -> list[dict]:
    with client.stream("POST", path, json={**payload, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def _output_ids(state, params: SamplingParams) -> list[int]:
    """The token ids the engine samples for PROMPT with these parameters (a seed makes them the server's)."""
    prompt = state.tokenizer(PROMPT)["input_ids"]
    (seq,) = state.engine.run_locked(state.engine.engine.generate, [prompt], params)
    return seq.output_ids


def _continuations(tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    """The text the first n output tokens add to the prompt's, n = 1, 2, ..., by whole decodes."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    return [tokenizer.decode(prompt + output[:n], skip_special_tokens=True)[len(before):]
            for n in range(1, len(output) + 1)]


def _expected_stop(texts: list[str], stop: str, min_tokens: int) -> tuple[int, str] | None:
    """vLLM's rule: the first token n > min_tokens whose text completes `stop`; the text is cut where
    that match begins."""
    for n in range(min_tokens + 1, len(texts) + 1):
        before = len(texts[n - 2]) if n >= 2 else 0
        begin = texts[n - 1].find(stop, max(0, before - len(stop) + 1))
        if begin != -1:
            return n, texts[n - 1][:begin]
    return None


def test_the_text_continues_the_prompt(served):
    """OpenAI's convention: prompt + text reads as one text, so the first word keeps its space."""
    client, state, _ = served
    body = _completion(client, state, max_tokens=6, temperature=0, ignore_eos=True)
    prompt = state.tokenizer(PROMPT)["input_ids"]
    texts = _continuations(state.tokenizer, prompt, _output_ids(state, SamplingParams(max_tokens=6, temperature=0,
                                                                                      ignore_eos=True)))
    assert body["choices"][0]["text"] == texts[-1] and texts[-1].startswith(" ")


@pytest.mark.parametrize("min_tokens", ["none", "past the first match"])
def test_stop_strings_with_min_tokens_cut_the_text_as_the_engine_stops(served, min_tokens):
    """A stop string ends the text where it begins, from token min_tokens + 1 on (one inside the first
    min_tokens tokens' text does not count); streamed and whole responses agree and a stream sends one
    finish, on the token that completed the stop string."""
    client, state, _ = served
    sampling = dict(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    output = _output_ids(state, SamplingParams(**sampling))
    texts = _continuations(state.tokenizer, state.tokenizer(PROMPT)["input_ids"], output)
    words = texts[-1].split()
    stop = next((w for w in words[2:] if words.count(w) >= 2), words[-1])  # one that comes again, if any
    first, _ = _expected_stop(texts, stop, 0)
    minimum = 0 if min_tokens == "none" else first
    expected = _expected_stop(texts, stop, minimum)
    cut_at, text = expected or (len(output), texts[-1])

    body = _completion(client, state, **sampling, stop=[stop], min_tokens=minimum)
    choice = body["choices"][0]
    assert choice["text"] == text and body["usage"]["completion_tokens"] == cut_at
    assert (choice["finish_reason"], choice["stop_reason"]) == (("stop", stop) if expected else ("length", None))
    chunks = _stream(client, "/v1/completions", {"model": state.base_name, "prompt": PROMPT, **sampling,
                                                 "stop": [stop], "min_tokens": minimum})
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks].count(None) == len(chunks) - 1
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_echo_returns_the_prompt_as_sent(served):
    """Not the decode of its token ids, which would lose the unknown word and the double space."""
    client, state, _ = served
    prompt = "the  GIRAFFE sat"
    body = _completion(client, state, prompt=prompt, echo=True, max_tokens=2, temperature=0, ignore_eos=True)
    assert body["choices"][0]["text"].startswith(prompt)
    chunks = _stream(client, "/v1/completions", {"model": state.base_name, "prompt": prompt, "echo": True,
                                                 "max_tokens": 2, "temperature": 0, "ignore_eos": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]


def _hf_logprobs(model_dir, prompt: list[int], output: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].double().log_softmax(-1)
    return logits[len(prompt) - 1:-1]  # row i: the distribution output[i] was sampled from


def test_completion_logprobs_always_hold_the_chosen_token(served):
    """OpenAI's completions: "the API will always return the logprob of the sampled token, so there may be
    up to logprobs+1 elements". Sampled at a high temperature, some chosen tokens are outside the top 2;
    every value is the model's own log-softmax (transformers' forward as the oracle)."""
    client, state, model_dir = served
    sampling = dict(max_tokens=12, temperature=2.0, seed=5, ignore_eos=True)
    output = _output_ids(state, SamplingParams(**sampling))
    reference = _hf_logprobs(model_dir, state.tokenizer(PROMPT)["input_ids"], output)
    for k in (0, 2):
        logprobs = _completion(client, state, **sampling, logprobs=k)["choices"][0]["logprobs"]
        for i, token in enumerate(output):
            piece, value, top = logprobs["tokens"][i], logprobs["token_logprobs"][i], logprobs["top_logprobs"][i]
            assert value == pytest.approx(float(reference[i, token]), abs=1e-4)
            best = reference[i].topk(k).indices.tolist() if k else []
            assert top[piece] == value and len(top) <= k + 1
            for t in best:
                assert top[state.tokenizer.decode([t])] == pytest.approx(float(reference[i, t]), abs=1e-4)


def test_streamed_logprobs_equal_the_whole_responses(served):
    """Chunk by chunk, with echo: the prompt's logprobs in the first chunk, text offsets counted on
    across chunks; with max_tokens 0 (lm-eval's loglikelihood), the prompt alone."""
    client, state, _ = served
    for max_tokens in (4, 0):
        request = dict(prompt=PROMPT, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        whole = _completion(client, state, **request)["choices"][0]
        chunks = _stream(client, "/v1/completions", {"model": state.base_name, **request})
        streamed = {key: [v for c in chunks for v in c["choices"][0]["logprobs"][key]] for key in whole["logprobs"]}
        assert streamed == whole["logprobs"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
        pieces = whole["logprobs"]["tokens"]
        assert whole["logprobs"]["text_offset"] == [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        assert len(pieces) == len(state.tokenizer(PROMPT)["input_ids"]) + max_tokens
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"


def test_chat_usage_counts_the_prompt_once_for_n_choices(served):
    client, state, _ = served
    messages = [{"role": "user", "content": "red green"}]
    body = client.post("/v1/chat/completions", json={"model": state.base_name, "messages": messages, "n": 3,
                                                     "max_tokens": 2, "seed": 1}).json()
    prompt_tokens = client.post("/tokenize", json={"messages": messages}).json()["count"]
    assert len(body["choices"]) == 3 and body["usage"]["prompt_tokens"] == prompt_tokens


@pytest.mark.parametrize("path, payload, fragment", [
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": 3, "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, "content"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
])
def test_requests_the_server_cannot_honour_get_a_400_naming_the_field(served, path, payload, fragment):
    client, state, _ = served
    response = client.post(path, json={"model": state.base_name, **payload})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"] + str(response.json()["error"]["param"])
    assert client.post(path, json={"model": state.base_name, "prompt": "the cat", "max_tokens": 1,
                                   "messages": [{"role": "user", "content": "x"}]}).status_code == 200


def test_best_of_equal_to_n_is_accepted(served):
    client, state, _ = served
    assert len(_completion(client, state, best_of=2, n=2, max_tokens=1)["choices"]) == 2


def test_a_chunked_body_over_the_limit_gets_a_413(served):
    """No Content-Length to refuse it by: the size is counted as the body arrives."""
    client, state, _ = served
    chunk = b" " * 2**20

    def body():
        yield b'{"model": "x", "prompt": "'
        for _ in range(9):
            yield chunk
        yield b'"}'

    response = client.post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

    def small():
        yield json.dumps({"model": state.base_name, "prompt": "the cat", "max_tokens": 1}).encode()

    assert client.post("/v1/completions", content=small(), headers={"content-type": "application/json"}).status_code \
        == 200


def test_every_protected_route_wants_the_key_before_reading_the_body(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    state = make_state(model_dir, {}, api_key="sekrit", adapter_dir=tmp_path)
    client = TestClient(build_app(state))
    good = {"Authorization": "Bearer sekrit"}
    routes = [("get", "/v1/models", None), ("post", "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1}),
              ("post", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
              ("post", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a"}),
              ("post", "/v1/unload_lora_adapter", {"lora_name": "a"}), ("post", "/tokenize", {"prompt": "x"}),
              ("post", "/detokenize", {"tokens": [1]}), ("get", "/v1/no/such/route", None)]
    try:
        for method, path, payload in routes:
            for headers in ({}, {"Authorization": "Bearer sekri"}, {"Authorization": "sekrit"}):
                response = getattr(client, method)(path, headers=headers, **({"json": payload} if payload else {}))
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["type"] == "authentication_error"
        malformed = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 401
        assert client.post("/v1/completions", content=b"{not json", headers={**good, "content-type":
                                                                              "application/json"}).status_code == 400
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/tokenize", json={"prompt": "the cat"}, headers=good).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    finally:
        state.engine.close()


def test_time_to_first_token_counts_from_the_requests_arrival(served, monkeypatch):
    """vLLM's TTFT: from when the request reached the server, its tokenization included."""
    import re
    import time

    client, state, _ = served

    class SlowTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            time.sleep(0.3)
            return self.inner(*args, **kwargs)

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def ttft_sum() -> float:
        metrics = client.get("/metrics").text
        return float(re.search(r"^alphalora_time_to_first_token_seconds_sum (\S+)$", metrics, re.M)[1])

    before = ttft_sum()
    monkeypatch.setattr(state, "tokenizer", SlowTokenizer(state.tokenizer))
    _completion(client, state, max_tokens=1)
    assert ttft_sum() - before >= 0.3
