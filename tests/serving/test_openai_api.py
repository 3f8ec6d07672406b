"""The OpenAI-compatible API, driven by raw HTTP and by the official `openai` client."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from alphalora.serving.engine import SamplingParams
from alphalora.serving.openai import build_app
from alphalora.serving.openai.server import make_state
from tests.serving.test_engine import _adapter
from tests.tiny_models import build, save_tiny

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model_dir = save_tiny("llama", root / "tiny-llama", initializer_range=0.2, max_position_embeddings=128)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    adapters = root / "adapters"
    _adapter(adapters / "moe", "llama", (3, 2), seed=1)
    _adapter(adapters / "spare", "llama", (2, 2), seed=5)
    state = make_state(model_dir, {"moe": str(adapters / "moe")}, adapter_dir=adapters, max_num_seqs=8)
    client = TestClient(build_app(state))
    yield client, state, model_dir, adapters
    state.engine.close()


def test_models_lists_adapters_with_their_parent(served):
    client, state, _, _ = served
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [state.base_name, "moe"]
    assert data[1]["parent"] == state.base_name and data[0]["parent"] is None


def test_greedy_completion_equals_generate_with_the_adapter(served):
    client, _, model_dir, adapters = served
    prompt = [2, 5, 9, 14, 7, 30]
    body = client.post("/v1/completions", json={"model": "moe", "prompt": prompt, "max_tokens": 5,
                                                "temperature": 0, "ignore_eos": True, "logprobs": 1}).json()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = _hf_greedy_from_dir(model_dir, prompt, 5, adapters / "moe")
    # The text continues the prompt's (OpenAI's and vLLM's convention): what the tokens add to its decode.
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    assert body["choices"][0]["text"] == tokenizer.decode(prompt + hf, skip_special_tokens=True)[len(before):]
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == 5
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_repeated_prompt_prefix_is_served_from_the_cache_and_reported(served):
    """OpenAI's usage.prompt_tokens_details.cached_tokens and the Prometheus counters (block size 16:
    the 40-token prompt's first two blocks come from the first request's)."""
    client, _, _, _ = served
    def cache_hits() -> float:
        return _metric_samples(client)["alphalora_prefix_cache_hits_total"]

    hits_before = cache_hits()
    prompt = [3 + (7 * i) % 30 for i in range(40)]  # the tiny tokenizer's 34 ids
    request = {"model": "moe", "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    first = client.post("/v1/completions", json={**request, "prompt": prompt}).json()
    second = client.post("/v1/completions", json={**request, "prompt": prompt[:36] + [5, 6, 7]}).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert cache_hits() == hits_before + 32
    assert "# TYPE alphalora_prefix_cache_queries_total counter" in client.get("/metrics").text
    metrics = _metric_samples(client)
    # Nothing runs now: no block is held. The first prompt's two full blocks of 16 stay cached (its third
    # never filled: 40 tokens and one decoded), and the second prompt shares them (its own 4 new tokens
    # and one decoded fill none).
    assert metrics["alphalora_kv_cache_usage"] == 0
    assert metrics["alphalora_prefix_cache_blocks"] >= 2


def _metric_samples(client) -> dict[str, float]:
    """/metrics read by Prometheus' own parser: each unlabelled sample's value by name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def _hf_greedy_from_dir(model_dir, prompt, n, adapter):
    from transformers import AutoModelForCausalLM

    from alphalora.adapters.io import load_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(model, adapter)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_streaming_chat_with_usage_ends_with_done(served):
    client, state, _, _ = served
    payload = {"model": state.base_name, "messages": [{"role": "user", "content": "the cat sat on"}],
               "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    with client.stream("POST", "/v1/chat/completions", json=payload) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks[:-1])


def test_echo_logprobs_give_the_prompt_loglikelihood(served):
    client, state, model_dir, _ = served
    prompt = [2, 6, 18, 9, 8, 6, 25]
    body = client.post("/v1/completions", json={"model": state.base_name, "prompt": prompt, "max_tokens": 0,
                                                "echo": True, "logprobs": 1, "temperature": 0}).json()
    lps = body["choices"][0]["logprobs"]["token_logprobs"]
    from transformers import AutoModelForCausalLM

    logits = AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert lps[0] is None and len(lps) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(lps[i] - float(logits[i - 1, prompt[i]])) < 1e-4


def test_openai_client_completions_chat_and_streaming(served):
    openai = pytest.importorskip("openai")
    client, state, _, _ = served
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    completion = api.completions.create(model="moe", prompt="the cat sat on", max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens >= 1
    chat = api.chat.completions.create(model=state.base_name, messages=[{"role": "user", "content": "red green"}],
                                       max_tokens=3, n=2, seed=1)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    stream = api.chat.completions.create(model="moe", messages=[{"role": "user", "content": "one two"}],
                                         max_tokens=3, stream=True, temperature=0)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) >= 2
    models = [m.id for m in api.models.list()]
    assert "moe" in models


@pytest.mark.parametrize("payload, status", [
    ({"model": "nope", "prompt": "x"}, 404),
    ({"model": "BASE", "prompt": 5}, 400),
    ({"model": "BASE", "prompt": "x", "max_tokens": -1}, 400),
    ({"model": "BASE", "prompt": "x", "n": 10_000}, 400),
    ({"model": "BASE", "prompt": "x", "temperature": "hot"}, 400),
    ({"model": "BASE", "prompt": "x", "max_tokens": 3, "min_tokens": 4}, 400),
    ({"model": "BASE", "prompt": "x", "min_tokens": -1}, 400),
    ({"model": "BASE", "prompt": list(range(1, 120)), "max_tokens": 129}, 400),  # over max_model_len
    ({"model": "BASE", "prompt": list(range(1, 120)) * 2, "max_tokens": 5}, 400),  # a prompt past the context
    ({"model": "BASE", "prompt": [999999]}, 400),
    ({"model": "BASE"}, 400),
    ({"model": "BASE", "prompt": "x", "logit_bias": {"seven": 1.0}}, 400),
    ({"model": "BASE", "prompt": "x", "repetition_penalty": "Infinity"}, 400),  # (a number: not finite)
    ({"model": "BASE", "prompt": "x", "logit_bias": {"999999": 1.0}}, 400),
    ({"model": "BASE", "prompt": "x", "min_p": 2.0}, 400),
    ({"model": "BASE", "prompt": "x", "stop": [""]}, 400),
    ({"model": "BASE", "prompt": "x", "stop": ""}, 400),
    ({"model": "BASE", "prompt": "x", "seed": 2**70}, 400),
    ({"model": "BASE", "prompt": ["x"] * 600, "n": 2}, 400),  # 1200 sequences: more than the queue holds
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(served, payload, status):
    client, state, _, _ = served
    if payload.get("model") == "BASE":
        payload = {**payload, "model": state.base_name}
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    ok = client.post("/v1/completions", json={"model": state.base_name, "prompt": "the cat", "max_tokens": 2})
    assert ok.status_code == 200


def test_errors_name_the_field_at_fault(served):
    client, state, _, _ = served
    seed = client.post("/v1/completions", json={"model": state.base_name, "prompt": "x", "seed": 2**70}).json()
    assert seed["error"]["param"] == "seed"
    broken = client.post("/v1/completions", content=b'{"model": x}', headers={"content-type": "application/json"})
    assert broken.status_code == 400
    assert broken.json()["error"]["param"] is None and "not valid JSON" in broken.json()["error"]["message"]
    too_many = client.post("/v1/completions", json={"model": state.base_name, "prompt": ["x"] * 600, "n": 2})
    assert "1200 sequences" in too_many.json()["error"]["message"]  # not a 429 that no retry can pass


def test_non_text_chat_content_is_refused_not_dropped(served):
    client, state, _, _ = served
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    response = client.post("/v1/chat/completions", json={
        "model": state.base_name, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]})
    assert response.status_code == 400
    assert "image_url" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "messages.0.content"
    text_parts = [{"type": "text", "text": "the cat "}, {"type": "text", "text": "sat"}]
    as_parts = client.post("/tokenize", json={"messages": [{"role": "user", "content": text_parts}]}).json()
    as_string = client.post("/tokenize", json={"messages": [{"role": "user", "content": "the cat sat"}]}).json()
    assert as_parts["tokens"] == as_string["tokens"]


def test_invalid_utf8_and_huge_bodies(served):
    client, state, _, _ = served
    response = client.post("/v1/completions", content=b'{"model": "\xff\xfe", "prompt": "x"}',
                           headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500 and "error" in response.json()
    huge = client.post("/v1/completions", content=b"x" * (9 * 2**20), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert client.get("/health").status_code == 200


def test_runtime_adapter_loading_is_confined_to_the_adapter_dir(served):
    client, state, model_dir, adapters = served
    outside = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(model_dir)})
    assert outside.status_code == 400 and "adapter directory" in outside.json()["error"]["message"]
    loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "spare", "lora_path": str(adapters / "spare")})
    assert loaded.status_code == 200
    reply = client.post("/v1/completions", json={"model": "spare", "prompt": "the cat", "max_tokens": 2})
    assert reply.status_code == 200
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 200
    assert client.post("/v1/completions", json={"model": "spare", "prompt": "x"}).status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "spare"}).status_code == 404


def test_an_adapter_for_another_model_gets_a_400_at_load_and_serving_goes_on(served):
    client, state, _, adapters = served
    _adapter(adapters / "wide", "llama", (2, 2), seed=6, base=build("llama", 0, hidden_size=64))
    refused = client.post("/v1/load_lora_adapter", json={"lora_name": "wide", "lora_path": str(adapters / "wide")})
    assert refused.status_code == 400 and "trained for another model" in refused.json()["error"]["message"]
    assert "wide" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    ok = client.post("/v1/completions", json={"model": "moe", "prompt": "the cat", "max_tokens": 2})
    assert ok.status_code == 200


def test_tokenize_detokenize_and_metrics(served):
    client, state, _, _ = served
    tokens = client.post("/tokenize", json={"prompt": "the cat sat"}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 3
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "the cat sat"
    assert client.post("/tokenize", json={"model": "moe", "prompt": "the cat sat"}).json() == tokens
    for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        unknown = client.post(route, json={**body, "model": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    metrics = client.get("/metrics").text
    assert "alphalora_generation_tokens_total" in metrics and 'alphalora_requests_total{adapter="moe"}' in metrics
    assert "alphalora_time_to_first_token_seconds_bucket" in metrics


def test_metrics_parse_with_prometheus_own_parser_whatever_the_adapter_names(served):
    from prometheus_client.parser import text_string_to_metric_families

    client, _, _, adapters = served
    name = 'team "a"\\eval'  # a quote and a backslash: label values the text format must escape
    assert client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters / "spare")}
                       ).status_code == 200
    before = client.post("/tokenize", json={"prompt": "the cat"}).json()["count"]
    assert client.post("/v1/completions", json={"model": name, "prompt": "the cat", "max_tokens": 3, "n": 2,
                                                "ignore_eos": True}).status_code == 200
    client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    requests = {sample.labels["adapter"]: sample.value for sample in families["alphalora_requests"].samples
                if sample.name == "alphalora_requests_total"}
    assert requests[name] == 2  # two sequences (n=2)
    prompt = next(s.value for s in families["alphalora_prompt_tokens"].samples)
    assert prompt >= 2 * before
    ttft = {s.labels.get("le"): s.value for s in families["alphalora_time_to_first_token_seconds"].samples
            if s.name.endswith("_bucket")}
    assert ttft["+Inf"] >= 2 and sorted(ttft.values()) == list(ttft.values())  # cumulative buckets


def test_api_key(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    state = make_state(model_dir, {}, api_key="sekrit")
    client = TestClient(build_app(state))
    try:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert client.get("/health").status_code == 200
    finally:
        state.engine.close()


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(served, monkeypatch):
    client, state, _, _ = served
    runner = state.engine.engine.runner
    original = runner.forward
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "forward", broken)
    failed = client.post("/v1/completions", json={"model": state.base_name, "prompt": "the cat", "max_tokens": 3})
    assert failed.status_code == 500 and "injected failure" in failed.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"model": state.base_name, "prompt": "the cat", "max_tokens": 3})
    assert ok.status_code == 200
    assert state.engine.engine.blocks.num_free_blocks == state.engine.engine.blocks.num_blocks


def test_a_refused_request_leaves_nothing_behind(tmp_path):
    from alphalora.serving.engine import Engine, EngineConfig
    from alphalora.serving.engine.async_engine import AsyncEngine
    from alphalora.serving.openai import ServerState

    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    engine = Engine.from_pretrained(model_dir, EngineConfig(max_waiting=2, max_num_seqs=1))
    async_engine = AsyncEngine(engine)
    state = ServerState(engine=async_engine, tokenizer=engine.tokenizer, base_name="m", max_model_len=64)
    client = TestClient(build_app(state))
    try:  # three sequences can never wait together in a queue of two: refused whole, not told to retry
        response = client.post("/v1/completions", json={"model": "m", "prompt": "the cat", "max_tokens": 2, "n": 3})
        assert response.status_code == 400 and "smaller requests" in response.json()["error"]["message"]
        assert async_engine.run_locked(lambda: not engine.scheduler.waiting and not engine.scheduler.running)
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        ok = client.post("/v1/completions", json={"model": "m", "prompt": "the cat", "max_tokens": 2, "n": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    finally:
        async_engine.close()
    response = client.post("/v1/completions", json={"model": "m", "prompt": "the cat", "max_tokens": 2})
    assert response.status_code == 503 and "shut down" in response.json()["error"]["message"]


def test_a_request_the_full_queue_cannot_take_whole_is_withdrawn_whole_with_a_429(tmp_path):
    import asyncio

    from alphalora.serving.engine import Engine, EngineConfig, QueueFullError
    from alphalora.serving.engine.async_engine import AsyncEngine
    from alphalora.serving.openai import ServerState

    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    engine = Engine.from_pretrained(model_dir, EngineConfig(max_waiting=2, max_num_seqs=1))
    async_engine = AsyncEngine(engine, background=False)  # nothing steps: the queue stays as this test fills it
    params = SamplingParams(max_tokens=2)
    waiting = engine.add_request([5, 6], params)

    async def admit_two():
        admission = asyncio.ensure_future(async_engine.add([([5, 6], params), ([7, 8], params)], None))
        await asyncio.sleep(0)
        async_engine._empty_inboxes()  # the step boundary: the first fits the queue, the second does not
        return await admission

    with pytest.raises(QueueFullError):
        asyncio.run(admit_two())
    assert list(engine.scheduler.waiting) == [waiting]  # the admitted first sequence was withdrawn

    # Over HTTP, through the real admission path on a stepping engine: a queue with no room left (its bound
    # lowered to nothing, so that no step can make room before the request arrives) answers 429.
    stepping = AsyncEngine(Engine.from_pretrained(model_dir, EngineConfig(max_waiting=2, max_num_seqs=1)))
    try:
        stepping.run_locked(setattr, stepping.engine.scheduler, "max_waiting", 0)
        state = ServerState(engine=stepping, tokenizer=engine.tokenizer, base_name="m", max_model_len=64)
        response = TestClient(build_app(state)).post("/v1/completions", json={"model": "m", "prompt": "the cat"})
        assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_exceeded"
        assert "already waiting; retry later" in response.json()["error"]["message"]
    finally:
        stepping.close()


def test_chat_template_from_the_command_line(tmp_path):
    """A tokenizer without a chat template: chat is refused naming the fix; --chat-template (a file)
    supplies one, and the prompt is that template applied."""
    from alphalora.serving.openai.server import read_chat_template

    model_dir = save_tiny("llama", tmp_path / "plain", initializer_range=0.2, max_position_embeddings=128)
    chat = {"model": "plain", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
    state = make_state(model_dir, {})
    try:
        response = TestClient(build_app(state)).post("/v1/chat/completions", json=chat)
        assert response.status_code == 400 and "--chat-template" in response.json()["error"]["message"]
    finally:
        state.engine.close()
    (tmp_path / "template.jinja").write_text(CHAT_TEMPLATE)
    state = make_state(model_dir, {}, chat_template=str(tmp_path / "template.jinja"))
    try:
        body = TestClient(build_app(state)).post("/v1/chat/completions", json=chat).json()
        expected = state.tokenizer("user hello </s> assistant ", add_special_tokens=False)["input_ids"]
        assert body["usage"]["prompt_tokens"] == len(expected)
    finally:
        state.engine.close()
    assert read_chat_template(CHAT_TEMPLATE) == CHAT_TEMPLATE
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_logit_bias_and_min_p_reach_the_sampler(served):
    client, state, _, _ = served
    request = {"model": state.base_name, "prompt": [2, 5, 9, 14], "max_tokens": 1, "temperature": 0, "logprobs": 1}
    engine = state.engine.engine
    (greedy,) = state.engine.run_locked(engine.generate, [request["prompt"]], SamplingParams(max_tokens=1,
                                                                                             temperature=0.0))
    favourite = greedy.output_ids[0]
    first = client.post("/v1/completions", json=request).json()["choices"][0]["logprobs"]["token_logprobs"][0]
    banned = client.post("/v1/completions", json={**request, "logit_bias": {str(favourite): -100}}).json()
    assert banned["choices"][0]["logprobs"]["token_logprobs"][0] < first  # the next best token instead
    # min_p = 1 keeps only the most probable token: sampling at any temperature is then greedy
    sampled = client.post("/v1/completions", json={**request, "temperature": 1.5, "min_p": 1.0, "seed": 3}).json()
    assert sampled["choices"][0]["logprobs"]["token_logprobs"][0] == first
