"""Adapters coming and going while requests run: unloading without dropping a request, vLLM's max_loras
per step, and damaged adapter files refused at load."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from alphalora.adapters.inject import AdapterError
from alphalora.serving.engine import BlockManager, Engine, EngineConfig, SamplingParams, Scheduler, Sequence
from alphalora.serving.engine import adapters as adapter_loading
from tests.serving.test_engine import _adapter, _base, _hf_greedy, _prompts
from tests.serving.test_engine import adapters as adapters  # noqa: F401 - the module fixture

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _engine(adapters, **config) -> Engine:
    return Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=24, block_size=4,
        adapters={k: str(v) for k, v in adapters.items() if k != "peft"}, **config))


def test_an_adapter_unloaded_mid_generation_serves_its_running_requests_to_the_end(adapters):
    """Every sequence, the unloaded adapter's included, ends with exactly transformers' greedy tokens;
    new requests for the name are refused at once; its weights go after its last sequence."""
    engine = _engine(adapters)
    prompts = _prompts(3, (5, 9, 7, 12))
    names = ["moe_a", None, "moe_a", "lora"]
    seqs = [engine.add_request(p, GREEDY, n) for p, n in zip(prompts, names, strict=True)]
    engine.step()
    engine.step()
    engine.remove_adapter("moe_a")
    assert "moe_a" not in engine.adapters.paths
    with pytest.raises(AdapterError, match="unknown adapter 'moe_a'"):
        engine.add_request([1, 2, 3], GREEDY, "moe_a")
    while engine.has_work():
        engine.step()
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.finish_reason == "length"
        assert seq.output_ids == _hf_greedy("llama", prompt, 6, adapter=adapters[name] if name else None), name
    assert not engine.adapters.retired and all(not n.startswith("moe_a") for n in engine.adapters.resident)
    with pytest.raises(AdapterError):
        engine.remove_adapter("moe_a")


def test_a_name_loaded_again_while_its_old_weights_finish_serves_the_new_weights(adapters):
    engine = _engine(adapters)
    prompt = _prompts(4, (8,))[0]
    old = engine.add_request(prompt, GREEDY, "moe_a")
    engine.step()
    engine.remove_adapter("moe_a")
    engine.adapters.register("moe_a", adapters["moe_b"], load_now=True)  # another adapter under the same name
    new = engine.add_request(prompt, GREEDY, "moe_a")
    while engine.has_work():
        engine.step()
    assert old.output_ids == _hf_greedy("llama", prompt, 6, adapter=adapters["moe_a"])
    assert new.output_ids == _hf_greedy("llama", prompt, 6, adapter=adapters["moe_b"])
    assert not engine.adapters.retired


@pytest.mark.parametrize("then", ["replace its folder and load it again", "delete its folder, load another"])
def test_an_unloaded_adapters_running_requests_keep_its_weights_when_the_lru_has_room_for_one(adapters, tmp_path,
                                                                                              then):
    """max_loras 1: what comes after the unload (a load_inplace of new weights into the same folder, or another
    adapter once the old folder is deleted) must not evict the retired weights, to be read again from disk."""
    import shutil

    folder = shutil.copytree(adapters["moe_a"], tmp_path / "served")
    engine = _engine({"a": folder}, max_loras=1)
    prompt = _prompts(9, (6,))[0]
    seq = engine.add_request(prompt, GREEDY, "a")
    for _ in range(3):
        engine.step()
    engine.remove_adapter("a")
    shutil.rmtree(folder)
    if then.startswith("replace"):
        shutil.copytree(adapters["moe_b"], folder)
        engine.adapters.register("a", folder, load_now=True)
    else:
        engine.adapters.register("b", adapters["moe_b"], load_now=True)
    failed = []
    while engine.has_work():
        engine.step()
        failed += engine.take_failed()
    assert not failed and seq.finish_reason == "length"
    assert seq.output_ids == _hf_greedy("llama", prompt, 6, adapter=adapters["moe_a"])
    assert not engine.adapters.retired


def test_an_unused_adapter_is_unloaded_at_once_and_a_cancelled_last_user_frees_a_retired_one(adapters):
    engine = _engine(adapters)
    engine.adapters.get("lora")
    engine.remove_adapter("lora")
    assert "lora" not in engine.adapters.resident and not engine.adapters.retired
    seq = engine.add_request(_prompts(5, (6,))[0], GREEDY, "moe_b")
    engine.step()
    engine.remove_adapter("moe_b")
    assert len(engine.adapters.retired) == 1
    engine.abort(seq)
    assert not engine.adapters.retired and not any(n.startswith("moe_b") for n in engine.adapters.resident)


def test_the_scheduler_runs_at_most_max_adapters_distinct_adapters_and_others_keep_their_place():
    """vLLM's max_loras: a sequence whose adapter would be one too many waits; sequences behind it whose
    adapter already runs (or none) are admitted; it runs as soon as a slot frees."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64, max_adapters=2)
    seqs = [Sequence(i, [1, 2, 3], max_tokens=3 if i == 0 else 6, adapter=a)
            for i, a in enumerate(["a", "b", "c", "a", None, "b"])]
    for seq in seqs:
        scheduler.add(seq)
    running_adapters, scheduled = [], []
    while scheduler.has_work():
        output = scheduler.schedule()
        running_adapters.append({c.seq.adapter for c in output.chunks} - {None})
        scheduled.append([c.seq.seq_id for c in output.chunks])
        scheduler.update(output, {c.seq.seq_id: 7 for c in output.chunks if c.completes_prompt})
        for seq in list(scheduler.running):
            if len(seq.output_ids) >= seq.max_tokens:
                scheduler.finish(seq, "length")
    assert all(len(adapters) <= 2 for adapters in running_adapters)
    assert scheduled[0] == [0, 1, 3, 4, 5]  # c waits; the second a, None and the second b go ahead
    first_c = next(i for i, ids in enumerate(scheduled) if 2 in ids)
    assert all(running_adapters[i] == {"a", "b"} for i in range(first_c))  # a slot frees only then


def test_max_loras_bounds_the_adapters_a_step_needs_so_none_is_loaded_over_and_over(adapters, monkeypatch):
    loads = []
    original = adapter_loading.load_serving_adapter

    def counting(name, *args, **kwargs):
        loads.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(adapter_loading, "load_serving_adapter", counting)
    engine = _engine(adapters, max_loras=1)
    prompts = _prompts(6, (5, 7, 6, 9))
    names = ["moe_a", "moe_b", "moe_a", "moe_b"]
    seqs = engine.generate(prompts, GREEDY, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.output_ids == _hf_greedy("llama", prompt, 6, adapter=adapters[name])
    assert loads == ["moe_a", "moe_b"]  # one load per adapter's turn, not one a step (or one a request)


def _damage(folder, how: str) -> None:
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("lora_B"))
    if how == "missing":
        del tensors[name]
    elif how == "nan":  # a well-formed file whose training diverged
        tensors[name] = tensors[name].clone().fill_(float("nan"))
    elif how == "rank 0":
        tensors[name] = tensors[name][..., :0].contiguous()
        tensors[name.replace("lora_B", "lora_A")] = tensors[name.replace("lora_B", "lora_A")][:, :0].contiguous()
    else:
        tensors[name] = tensors[name][..., :-1].contiguous()  # one rank short of its lora_A
    save_file(tensors, str(weights))
    config = json.loads((folder / "alphalora_config.json").read_text())
    config.pop("weights_sha256", None)  # as another tool would write it: no checksum to catch it first
    (folder / "alphalora_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("how, needle", [("missing", "the adapter is incomplete"),
                                         ("inconsistent", "are not E >= 1 experts of one rank r >= 1"),
                                         ("rank 0", "are not E >= 1 experts of one rank r >= 1"),
                                         ("nan", "holds NaN or infinite values")])
def test_a_damaged_adapter_is_refused_at_load_and_leaves_nothing_behind(tmp_path, how, needle):
    folder = _adapter(tmp_path / "damaged", "llama", (3, 2), seed=4)
    _damage(folder, how)
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(adapters={"bad": str(folder)}))
    with pytest.raises(AdapterError, match=needle):
        engine.add_request([1, 2, 3], GREEDY, "bad")
    assert engine.adapters.resident == [] and not engine.has_work()


def test_over_http_a_damaged_adapter_gets_a_400_and_is_not_listed(tmp_path):
    from alphalora.serving.openai import build_app
    from alphalora.serving.openai.server import make_state
    from tests.tiny_models import save_tiny

    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    _damage(_adapter(tmp_path / "adapters" / "bad", "llama", (2, 2), seed=4), "missing")
    _adapter(tmp_path / "adapters" / "good", "llama", (2, 2), seed=4)
    state = make_state(model_dir, {}, adapter_dir=tmp_path / "adapters")
    client = TestClient(build_app(state))
    try:
        load = {"lora_name": "x", "lora_path": str(tmp_path / "adapters" / "bad")}
        refused = client.post("/v1/load_lora_adapter", json=load)
        assert refused.status_code == 400 and "incomplete" in refused.json()["error"]["message"]
        assert "x" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
        loaded = client.post("/v1/load_lora_adapter", json={**load, "lora_path": str(tmp_path / "adapters" / "good")})
        assert loaded.status_code == 200
    finally:
        state.engine.close()


def _peft_folder(tmp_path, edit_config=None, edit_weights=None):
    """A PEFT LoRA folder (exported from one of ours), its config and weights edited as given."""
    from alphalora.adapters.peft_export import export_peft

    folder = export_peft(_adapter(tmp_path / "ours", "llama", (1, 1), seed=3), tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **(edit_config or {})}))
    if edit_weights is not None:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file(edit_weights(tensors), str(folder / "adapter_model.safetensors"))
    return folder


def _first_lora_B_nan(tensors):
    name = next(k for k in tensors if k.endswith("lora_B.weight"))
    return {**tensors, name: tensors[name].clone().fill_(float("nan"))}


@pytest.mark.parametrize("config, weights, needle", [
    ({"lora_alpha": float("inf")}, None, "'lora_alpha' must be a positive, finite number"),
    ({"r": 0}, None, "'r' must be a positive, finite number"),
    ({"alpha_pattern": {"(q_proj": 4}}, None, "is not a regular expression"),
    ({"alpha_pattern": {"q_proj": "4"}}, None, "it must be a positive, finite number"),
    ({"rank_pattern": ["q_proj"]}, None, "'rank_pattern' must map module names to numbers"),
    (None, _first_lora_B_nan, "holds NaN or infinite values"),
], ids=["infinite alpha", "rank 0", "bad regex", "alpha as text", "pattern not a map", "NaN weights"])
def test_a_malformed_peft_adapter_is_refused_at_load(tmp_path, config, weights, needle):
    """Each used to load (then fail every request of the batches it joined) or to raise a bare Python error."""
    folder = _peft_folder(tmp_path, config, weights)
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(adapters={"bad": str(folder)}))
    with pytest.raises(AdapterError, match=needle):
        engine.add_request([1, 2, 3], GREEDY, "bad")
    assert engine.adapters.resident == [] and not engine.has_work()


def test_over_http_a_name_reserved_for_retired_adapters_is_refused(tmp_path):
    """An adapter unloaded while in use goes on as "<name>#retired<n>"; loading another under that name served the
    retired weights and then vanished with them."""
    from alphalora.serving.openai import build_app
    from alphalora.serving.openai.server import make_state
    from tests.tiny_models import save_tiny

    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=64)
    _adapter(tmp_path / "adapters" / "a", "llama", (2, 2), seed=4)
    state = make_state(model_dir, {}, adapter_dir=tmp_path / "adapters")
    client = TestClient(build_app(state))
    try:
        refused = client.post("/v1/load_lora_adapter", json={"lora_name": "x#retired1", "lora_path": "a"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_name"
        assert "#retired" in refused.json()["error"]["message"]
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a"}).status_code == 200
    finally:
        state.engine.close()
    reserved = {"y#retired0": str(tmp_path / "adapters" / "a")}
    with pytest.raises(AdapterError, match="#retired"):  # (as `alphalora serve --adapter` names it)
        Engine(_base("llama"), tokenizer=None, config=EngineConfig(adapters=reserved))


def test_over_http_unloading_an_adapter_drops_no_request(tmp_path):
    """A stream on the adapter and a request on the base model, both running when the adapter is unloaded,
    end with all their tokens; the next request for it gets a 404."""
    from alphalora.serving.openai import build_app
    from alphalora.serving.openai.server import make_state
    from tests.tiny_models import save_tiny

    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=128)
    _adapter(tmp_path / "adapters" / "spare", "llama", (2, 2), seed=5)
    state = make_state(model_dir, {}, adapter_dir=tmp_path / "adapters")
    client = TestClient(build_app(state))
    request = {"prompt": "the cat sat", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    try:
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "spare", "lora_path": "spare"}).status_code \
            == 200
        step = state.engine.engine.step
        steps = threading.Semaphore(0)

        def counted():
            steps.release()
            return step()

        state.engine.engine.step = counted
        results = {}

        def base_request():
            results["base"] = client.post("/v1/completions", json={"model": "m", **request})

        with client.stream("POST", "/v1/completions", json={"model": "spare", "stream": True, **request}) as stream:
            worker = threading.Thread(target=base_request)
            worker.start()
            for _ in range(5):
                assert steps.acquire(timeout=30)
            unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "spare"})
            lines = [line for line in stream.iter_lines() if line]
        worker.join(timeout=60)
        assert unloaded.status_code == 200
        chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and len(chunks) == 40
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert results["base"].status_code == 200 and results["base"].json()["usage"]["completion_tokens"] == 40
        assert client.post("/v1/completions", json={"model": "spare", **request}).status_code == 404
        assert state.engine.run_locked(lambda: not state.engine.engine.adapters.retired)
    finally:
        state.engine.close()


def test_an_adapter_whose_files_broke_after_it_was_checked_fails_only_its_own_requests(adapters, tmp_path):
    """Evicted (max_loras 1), then damaged on disk: when its turn comes, its sequences fail with the
    reason and the others in the engine run on to transformers' tokens."""
    import shutil

    folder = shutil.copytree(adapters["moe_b"], tmp_path / "moe_b")
    engine = _engine({"moe_a": adapters["moe_a"], "moe_b": folder}, max_loras=1)
    engine.adapters.get("moe_b")
    engine.adapters.get("moe_a")  # evicts moe_b
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    prompts = _prompts(8, (6, 5, 9))
    names = ["moe_a", "moe_b", None]
    seqs = [engine.add_request(p, GREEDY, n) for p, n in zip(prompts, names, strict=True)]
    failed = []
    while engine.has_work():
        engine.step()
        failed += engine.take_failed()
    assert [(seq.seq_id, type(error)) for seq, error in failed] == [(seqs[1].seq_id, AdapterError)]
    assert "adapter_model.safetensors" in str(failed[0][1]) and seqs[1].finish_reason == "abort"
    for index in (0, 2):
        assert seqs[index].output_ids == _hf_greedy("llama", prompts[index], 6,
                                                    adapter=adapters[names[index]] if names[index] else None)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_an_adapter_trained_without_renormalised_gates_is_refused(tmp_path):
    """The engine's expert kernels renormalise the top-k gates; serving such an adapter would not compute
    what it was trained to."""
    from alphalora.allocation.plan import RouterSettings

    folder = _adapter(tmp_path / "plain_gates", "llama", (3, 2), seed=4, router=RouterSettings(renormalize=False))
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(adapters={"plain": str(folder)}))
    with pytest.raises(AdapterError, match="un-renormalised router gates"):
        engine.add_request([1, 2, 3], GREEDY, "plain")


def test_a_refused_request_leaves_nothing_queued_and_prompts_may_be_arrays():
    """add_request raised after queuing a request whose seed the generator refused, and generate() left the prompts
    before a refused one queued: the next generate() ran them unseen. Oracle: a fresh engine's greedy tokens."""
    import numpy as np
    import torch

    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(block_size=4))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([[5, 9, 14], []], GREEDY)
    with pytest.raises(ValueError, match="2 prompts but 1 adapters"):
        engine.generate([[5, 9, 14], [3, 4]], GREEDY, adapters=[None])
    assert not engine.has_work()
    (seq,) = engine.generate([np.array([5, 9, 14])], GREEDY)
    (again,) = engine.generate([torch.tensor([5, 9, 14])], GREEDY)
    fresh = Engine(_base("llama"), tokenizer=None, config=EngineConfig(block_size=4)).generate([[5, 9, 14]], GREEDY)
    assert seq.output_ids == again.output_ids == fresh[0].output_ids
    with pytest.raises(ValueError, match="one sequence of token ids"):
        engine.add_request(np.array([[5, 9], [14, 3]]), GREEDY)
