"""vLLM's request fields beyond OpenAI's, and its refusals, as `alphalora serve` honours them: what the chat
template renders (tools, chat_template_kwargs, continue_final_message), truncate_prompt_tokens, an unset
model, clamped logit_bias, continuous usage stats, load_inplace, the `vllm:` gauges routers read, and a
400 (never a 500, never a silent drop) for what this server cannot do.

Oracles: transformers' own `apply_chat_template` for the prompts, the engine's greedy output for the same
token ids, and vLLM 0.32's status codes and messages (checked live in test_vllm_extensions.py)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from alphalora.adapters.io import save_adapter
from alphalora.allocation import Plan
from alphalora.serving.engine import SamplingParams
from alphalora.serving.openai import build_app
from alphalora.serving.openai.server import make_state
from tests.tiny_models import save_tiny, save_word_model, with_random_adapter

# Roles must alternate (as Llama 2's, Mistral's and Gemma's templates demand); tools and a thinking switch
# are rendered when given.
TEMPLATE = ("{% if tools %}tools {% for t in tools %}{{ t['function']['name'] }} {% endfor %}</s> {% endif %}"
            "{% for m in messages %}"
            "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
            "{% endif %}{{ m['role'] }} {{ m['content'] }}"
            "{% if not (loop.last and continue_final_message is defined and continue_final_message) %} </s> "
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant {% if enable_thinking %}think {% endif %}{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "red", "parameters": {"type": "object", "properties": {}}}}]
USER = [{"role": "user", "content": "the cat"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    model_dir = save_word_model(root / "words", TEMPLATE)
    adapters = root / "adapters"
    for seed in (1, 2):
        _random_adapter(model_dir, adapters / f"moe{seed}", seed)
    state = make_state(model_dir, {"moe": adapters / "moe1"}, max_num_seqs=4, adapter_dir=adapters)
    yield TestClient(build_app(state)), state, adapters
    state.engine.close()


def _random_adapter(model_dir, folder, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[2, 3], top_k_per_layer=[2, 2],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, lora_dropout=0.0)
    save_adapter(with_random_adapter(AutoModelForCausalLM.from_pretrained(model_dir), plan, seed=seed, std=0.3),
                 folder)


def _ok(client, route: str, **fields) -> dict:
    response = client.post(route, json=fields)
    assert response.status_code == 200, response.text
    return response.json()


def _template_ids(state, messages, **kwargs) -> list[int]:
    """transformers' rendering, with vLLM's default of add_generation_prompt=True."""
    kwargs = {"add_generation_prompt": True, **kwargs}
    return state.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def _greedy(state, prompt: list[int], max_tokens: int, adapter: str | None = None) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    (seq,) = state.engine.run_locked(state.engine.engine.generate, [prompt], params, [adapter])
    return seq.output_ids


def _served_ids(client, route: str, **fields) -> list[int]:
    """The token ids a greedy request generates, read off its logprobs (vLLM's return_tokens_as_token_ids):
    some tokens have no text of their own."""
    body = _ok(client, route, temperature=0, ignore_eos=True, return_tokens_as_token_ids=True,
               logprobs=0 if route == COMPLETIONS else True, **fields)
    logprobs = body["choices"][0]["logprobs"]
    names = logprobs["tokens"] if route == COMPLETIONS else [entry["token"] for entry in logprobs["content"]]
    return [int(name.removeprefix("token_id:")) for name in names]


# -- what the chat template renders ------------------------------------------------------------------------
@pytest.mark.parametrize("fields, template_kwargs", [
    ({"tools": TOOLS, "tool_choice": "none"}, {"tools": TOOLS}),
    ({"chat_template_kwargs": {"enable_thinking": True}}, {"enable_thinking": True}),
    ({"messages": [*USER, {"role": "assistant", "content": "on the"}], "continue_final_message": True,
      "add_generation_prompt": False}, {"continue_final_message": True, "add_generation_prompt": False}),
], ids=["tools", "chat_template_kwargs", "continue_final_message"])
def test_the_chat_template_renders_the_requests_own_variables(served, fields, template_kwargs):
    client, state, _ = served
    messages = fields.pop("messages", USER)
    expected = _template_ids(state, messages, **template_kwargs)
    assert expected != _template_ids(state, USER, add_generation_prompt=True)  # the field changes the prompt
    body = _ok(client, CHAT, messages=messages, max_tokens=3, **fields)
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert _served_ids(client, CHAT, messages=messages, max_tokens=3, **fields) == _greedy(state, expected, 3)
    tokenized = _ok(client, "/tokenize", messages=messages, **fields)
    assert tokenized["tokens"] == expected


@pytest.mark.parametrize("route", [CHAT, "/tokenize"])
def test_a_conversation_the_template_refuses_is_a_400_naming_its_reason(served, route):
    client, _, _ = served
    response = client.post(route, json={"messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert "roles must alternate" in response.json()["error"]["message"]
    assert client.post(route, json={"messages": USER, "max_tokens": 1}).status_code == 200


def test_any_error_the_servers_template_raises_on_a_requests_variables_is_a_400(tmp_path):
    """A template that divides by a variable the request sets: 0 raised ZeroDivisionError, a 500."""
    model_dir = save_word_model(tmp_path / "words", TEMPLATE)
    state = make_state(model_dir, {}, chat_template="{{ messages[0]['content'] }} {{ 10 // parts }}")
    client = TestClient(build_app(state))
    try:
        for route in (CHAT, "/tokenize"):
            parts = lambda n: {"messages": USER, "max_tokens": 1, "chat_template_kwargs": {"parts": n}}  # noqa: E731
            response = client.post(route, json=parts(0))
            assert response.status_code == 400, response.text
            assert "ZeroDivisionError" in response.json()["error"]["message"]
            ok = client.post(route, json=parts(2))
            assert ok.status_code == 200, ok.text
    finally:
        state.engine.close()


# -- fields that change what is generated -----------------------------------------------------------------
@pytest.mark.parametrize("keep", [3, -1])
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(served, keep):
    client, state, _ = served
    prompt = state.tokenizer("the cat sat on the red tree")["input_ids"]
    kept = prompt[-keep:] if keep > 0 else prompt
    body = _ok(client, COMPLETIONS, prompt=prompt, max_tokens=4, temperature=0, truncate_prompt_tokens=keep)
    assert body["usage"]["prompt_tokens"] == len(kept)
    assert body["choices"][0]["text"] == _ok(client, COMPLETIONS, prompt=kept, max_tokens=4,
                                             temperature=0)["choices"][0]["text"]
    chat = _ok(client, CHAT, messages=USER, max_tokens=1, truncate_prompt_tokens=2)
    assert chat["usage"]["prompt_tokens"] == 2
    assert client.post(COMPLETIONS, json={"prompt": "x", "truncate_prompt_tokens": 4096}).status_code == 400


def test_a_request_without_a_model_is_served_by_the_base_model(served):
    client, state, _ = served
    prompt = state.tokenizer("the cat")["input_ids"]
    assert _ok(client, COMPLETIONS, prompt=prompt, max_tokens=1)["model"] == state.base_name
    assert _served_ids(client, COMPLETIONS, prompt=prompt, max_tokens=4) == _greedy(state, prompt, 4)
    assert _ok(client, CHAT, messages=USER, max_tokens=1)["model"] == state.base_name


def test_logit_bias_beyond_100_is_clamped_to_100_as_vllm_clamps_it(served):
    client, state, _ = served
    texts = [_ok(client, COMPLETIONS, prompt="the cat", max_tokens=4, temperature=0,
                 logit_bias={"9": bias})["choices"][0]["text"] for bias in (100, 500, 1e9)]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0] != _ok(client, COMPLETIONS, prompt="the cat", max_tokens=4, temperature=0)["choices"][0]["text"]


@pytest.mark.parametrize("route, fields", [(COMPLETIONS, {"prompt": "the cat"}), (CHAT, {"messages": USER})])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(served, route, fields):
    client, _, _ = served
    with client.stream("POST", route, json={**fields, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                            "stream": True, "stream_options": {"include_usage": True,
                                                                               "continuous_usage_stats": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert all("usage" in e for e in events)
    # one more token a chunk (a chat stream's role chunk first, with none)
    assert counts == ([0] if route == CHAT else []) + [1, 2, 3, 4, 5]
    assert {e["usage"]["prompt_tokens"] for e in events} == {final["usage"]["prompt_tokens"]}


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_prompt_logprobs_list_each_prompt_tokens_logprob_rank_and_top_alternatives(served, route):
    """vLLM's prompt_logprobs, against the model's own forward pass over the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    client, state, adapters = served
    if route == COMPLETIONS:
        prompt = state.tokenizer("the cat sat on the red tree")["input_ids"]
        body = _ok(client, route, prompt=prompt, max_tokens=1, prompt_logprobs=2)
        listed = body["choices"][0]["prompt_logprobs"]
    else:
        prompt = _template_ids(state, USER)
        body = _ok(client, route, messages=USER, max_tokens=1, prompt_logprobs=2)
        listed = body["prompt_logprobs"]
    model = AutoModelForCausalLM.from_pretrained(adapters.parent / "words").eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert listed[0] is None and len(listed) == len(prompt)
    for position, entry in enumerate(listed[1:]):
        row, token = logprobs[position], prompt[position + 1]
        top = row.topk(2).indices.tolist()
        assert list(entry) == list(dict.fromkeys(map(str, [token, *top])))  # the token first, then the top 2
        assert entry[str(token)]["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        assert [entry[str(t)]["rank"] for t in top if t != token] == [r for r, t in enumerate(top, 1) if t != token]
        assert entry[str(token)]["decoded_token"] == state.tokenizer.decode([token])
    assert client.post(route, json={"prompt": "x", "messages": USER, "prompt_logprobs": 1,
                                    "stream": True}).status_code == 400


# -- what this server cannot do: a 400 naming the field, as vLLM's -----------------------------------------
@pytest.mark.parametrize("route, fields, fragment", [
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
    (COMPLETIONS, {"prompt": "x", "n": 2, "temperature": 0}, "n must be 1 when using greedy sampling"),
    (CHAT, {"messages": USER, "n": 3, "temperature": 0}, "n must be 1 when using greedy sampling"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {}}}, "guided decoding"),
    (CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"messages": USER, "tools": TOOLS}, "tool_choice 'auto'"),  # OpenAI's default with tools
    (CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "red"}}},
     "tool_choice"),
    (CHAT, {"messages": USER, "continue_final_message": True}, "continue_final_message"),
    (COMPLETIONS, {"prompt": "x", "temperature": "NaN"}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"9": "NaN"}}, "logit_bias"),
    ("/tokenize", {"messages": []}, "messages"),
    # a template is a program the server would run on its own time (vLLM refuses it too, by default)
    (CHAT, {"messages": USER, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat template sent with"),
    (CHAT, {"messages": USER, "chat_template": "{{ 1 }}"}, "chat template sent with"),
    ("/tokenize", {"messages": USER, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat template sent with"),
])
def test_what_the_server_cannot_do_is_a_400_naming_it(served, route, fields, fragment):
    client, _, _ = served
    response = client.post(route, json=fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"] + str(error["param"])
    assert not error["message"].startswith("Value error")


def test_a_number_too_large_for_a_float_is_refused(served):
    client, _, _ = served
    response = client.post(COMPLETIONS, content=b'{"prompt": "x", "repetition_penalty": 1e999}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and "repetition_penalty" in response.json()["error"]["param"]


def test_n_samples_with_a_temperature_and_the_text_template_format_are_served(served):
    client, _, _ = served
    body = _ok(client, COMPLETIONS, prompt="the cat", n=2, temperature=1.0, max_tokens=2,
               response_format={"type": "text"})
    assert len(body["choices"]) == 2


# -- the rest of vLLM's surface -------------------------------------------------------------------------------
def test_tokenize_returns_the_token_strings_on_request(served):
    client, state, _ = served
    body = _ok(client, "/tokenize", prompt="the cat sat", return_token_strs=True)
    assert body["token_strs"] == state.tokenizer.convert_ids_to_tokens(body["tokens"])
    assert _ok(client, "/tokenize", prompt="the cat")["token_strs"] is None


def test_load_inplace_replaces_an_adapter_and_a_bad_replacement_keeps_the_old_one(served):
    client, state, adapters = served
    prompt = state.tokenizer("the cat sat")["input_ids"]

    def served_text() -> list[int]:
        return _served_ids(client, COMPLETIONS, model="moe", prompt=prompt, max_tokens=6)

    first = served_text()
    load = {"lora_name": "moe", "lora_path": str(adapters / "moe2")}
    again = client.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]
    assert client.post("/v1/load_lora_adapter", json={**load, "load_inplace": True}).status_code == 200
    replaced = served_text()
    assert replaced != first
    assert replaced == _greedy(state, prompt, 6, "moe")
    broken = adapters / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{}")
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "moe", "lora_path": str(broken),
                                                           "load_inplace": True})
    assert response.status_code == 400
    assert served_text() == replaced  # still the adapter loaded before
    assert client.post("/v1/load_lora_adapter", json={**load, "lora_path": str(adapters / "moe1"),
                                                      "load_inplace": True}).status_code == 200
    assert served_text() == first


def test_the_api_key_scheme_is_case_insensitive(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    state = make_state(model_dir, {}, api_key="sekrit")
    client = TestClient(build_app(state))
    try:
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert client.get("/v1/models", headers={"Authorization": f"{scheme} sekrit"}).status_code == 200
        for header in ("bearer Sekrit", "Basic sekrit", "bearersekrit", "sekrit"):
            assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401, header
    finally:
        state.engine.close()


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def test_vllms_router_gauges_are_served_under_vllms_names(tmp_path):
    """The queue, KV-cache and LoRA gauges the Gateway API Inference Extension reads from vLLM."""
    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    _random_adapter(model_dir, tmp_path / "moe", 1)
    state = make_state(model_dir, {"moe": tmp_path / "moe"}, engine_thread=False, max_loras=3)  # steps by hand
    client, engine, name = TestClient(build_app(state)), state.engine.engine, state.base_name
    try:
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=4), "moe")
        engine.add_request([5, 6], SamplingParams(max_tokens=4))
        text = client.get("/metrics").text
        assert _samples(text, "vllm:num_requests_waiting") == [({"model_name": name}, 2.0)]
        assert _samples(text, "vllm:num_requests_running") == [({"model_name": name}, 0.0)]
        assert _samples(text, "vllm:kv_cache_usage_perc") == [({"model_name": name}, 0.0)]
        ((labels, stamp),) = _samples(text, "vllm:lora_requests_info")
        assert labels == {"max_lora": "3", "waiting_lora_adapters": "moe", "running_lora_adapters": ""}
        assert stamp > 1.7e9  # a timestamp, as vLLM's
        engine.step()
        text = client.get("/metrics").text
        assert _samples(text, "vllm:num_requests_running") == [({"model_name": name}, 2.0)]
        ((labels, _),) = _samples(text, "vllm:lora_requests_info")
        assert labels["running_lora_adapters"] == "moe" and labels["waiting_lora_adapters"] == ""
        ((_, usage),) = _samples(text, "vllm:kv_cache_usage_perc")
        assert usage == 1 - engine.blocks.num_free_blocks / engine.blocks.num_blocks > 0
        assert client.get("/ping").status_code == 200 and "version" in client.get("/version").json()
    finally:
        state.engine.close()
