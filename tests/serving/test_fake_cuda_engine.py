"""The engine's GPU path without a GPU: every tensor of a step on `cuda:0`, the model in half precision.

Fake tensors (`tests.fake_cuda`) carry devices and dtypes but no values, so these tests check where each
step's tensors live and in which dtype (an op mixing devices or dtypes fails), not the tokens: the CPU
tests and the GPU tests compare outputs with transformers'.
"""

from __future__ import annotations

import pytest
import torch

from alphalora import allocate, analyze
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation.plan import RouterSettings
from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from alphalora.serving.engine.engine import auto_dtype
from alphalora.serving.engine.kv_pool import default_num_blocks
from alphalora.serving.engine.sampling import apply_penalties, filtered_probs
from alphalora.serving.engine.step_inputs import build_step_batch, to_device
from tests.fake_cuda import CUDA, assert_on_device, fake_cuda
from tests.serving.test_engine import FAMILY_OVERRIDES, _adapter, _targets
from tests.tiny_models import build

HALF = torch.bfloat16


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Every kind the engine serves: MoE-LoRA (two sharing shapes, so routed together), plain LoRA with
    a rank pattern, its PEFT export, HeteroLoRA shortcut connections and a shared router per block."""
    root = tmp_path_factory.mktemp("fake_cuda_adapters")
    folders = {"moe_a": _adapter(root / "moe_a", "llama", (3, 2), seed=1),
               "moe_b": _adapter(root / "moe_b", "llama", (2, 4), seed=2, targets=("q", "v", "down")),
               "moe_c": _adapter(root / "moe_c", "llama", (3, 2), seed=9),
               "lora": _adapter(root / "lora", "llama", (1, 1), rank_pattern={"q": 2, "down": 6}, seed=3),
               "shortcut": _adapter(root / "shortcut", "llama", (1, 1), seed=4,
                                    shortcuts={"layer0.residual1": 2, "layer1.shortcut2": 2}),
               "shared": _adapter(root / "shared", "llama", (2, 3), seed=5, router=RouterSettings(type="shared"))}
    export_peft(folders["lora"], root / "peft")
    folders["peft"] = root / "peft"
    return folders


def _model(family: str = "llama", **overrides):
    """A tiny model on the CPU (built outside `fake_cuda`: the engine moves it to the fake GPU)."""
    return build(family, seed=0, **FAMILY_OVERRIDES, **overrides)


def _engine(model, adapters: dict, dtype=HALF, **config) -> Engine:
    """An engine on fake `cuda:0` (call inside `fake_cuda`)."""
    return Engine(model, tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=24, block_size=4, num_blocks=64, device="cuda:0", dtype=dtype,
        adapters={name: str(path) for name, path in adapters.items()}, **config))


def _run_steps(engine: Engine, prompts, names, steps: int, prompt_logprobs: int | None = None) -> int:
    """Drives the engine's steps up to the forward (sampling reads values), each sequence's next token
    set by hand; checks each step's logits. Returns the number of steps run."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    for prompt, name in zip(prompts, names, strict=True):
        engine.add_request(prompt, params, name)
    for step in range(steps):
        output = engine.scheduler.schedule()
        engine._load_step_adapters(output)
        if not output.chunks:
            return step
        logits, every = engine.runner.forward(engine._batch_inputs(output.chunks))
        assert logits.shape == (len(output.chunks), engine.vocab_size)
        assert_on_device([logits, every], dtype=torch.float32)
        assert (prompt_logprobs is not None) == bool(every)
        engine.scheduler.update(output, {chunk.seq.seq_id: 1 for chunk in output.chunks if chunk.completes_prompt})
    return steps


def _prompts(lengths):
    return [[(7 * i + j) % 120 + 1 for j in range(n)] for i, n in enumerate(lengths)]


def _assert_engine_state_on_the_gpu(engine: Engine, dtype=HALF) -> None:
    runner = engine.runner
    assert_on_device([runner.k_cache, runner.v_cache], dtype=dtype)
    assert_on_device(list(engine.model.parameters()), dtype=dtype)
    for name in engine.adapters.resident:
        assert_on_device(engine.adapters.get(name).tensors(), dtype=dtype)
    for stack in runner.stacks._stacks.values():
        assert_on_device(list(stack.tensors), dtype=dtype)


def test_a_mixed_adapter_batch_steps_on_the_gpu_in_bfloat16(adapters, monkeypatch):
    names = ["moe_a", None, "moe_b", "lora", "peft", "moe_c", "shortcut", "shared"]
    model = _model()
    with fake_cuda(monkeypatch) as audit:
        engine = _engine(model, adapters, max_loras=len(adapters))
        steps = _run_steps(engine, _prompts((5, 9, 7, 3, 13, 6, 4, 8)), names, steps=7)
        _assert_engine_state_on_the_gpu(engine)
    assert steps == 7  # prompt chunks, mixed steps and decode steps (the padded GPU decode attention)
    assert audit.cpu_compute == []
    assert audit.unsafe_copies == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_only_steps_of_one_adapter_and_of_none_run_on_the_gpu(adapters, dtype, monkeypatch):
    """Every token one adapter's (its two-GEMM and dense-masked shortcuts) or the base model's."""
    for name in ("lora", "moe_a", None):
        model = _model()
        with fake_cuda(monkeypatch) as audit:
            engine = _engine(model, adapters, dtype=dtype)
            _run_steps(engine, _prompts((4, 6, 3)), [name] * 3, steps=4)
            _assert_engine_state_on_the_gpu(engine, dtype)
        assert audit.cpu_compute == [] and audit.unsafe_copies == [], name


def test_prompt_logprobs_logits_come_from_the_gpu(adapters, monkeypatch):
    model = _model()
    with fake_cuda(monkeypatch) as audit:
        engine = _engine(model, adapters)
        _run_steps(engine, _prompts((9, 5)), ["moe_a", None], steps=1, prompt_logprobs=2)
    assert audit.cpu_compute == []


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "phi3", "qwen3", "mistral", "qwen2_moe",
                                    "qwen3_moe"])
def test_other_families_step_on_the_gpu(family, tmp_path, monkeypatch):
    """Embedding scaling (Gemma), soft-capped and sliding-window attention (Gemma 2 and 3, Mistral), fused
    projections (Phi-3), per-head norms (Qwen3), mixture-of-experts blocks with a shared expert."""
    overrides = dict(sliding_window=4) if family == "mistral" else {}
    base = _model(family, **overrides)
    # (a mixture's routed experts take no adapters: `allocate` leaves them out, as it does by default)
    targets = dict(targets=allocate(analyze(base), method="uniform", budget=2).target_modules) if family.endswith(
        "moe") else _targets(family)
    adapter = _adapter(tmp_path / "adapter", family, (2, 3), seed=1, base=base, **targets)
    model = _model(family, **overrides)
    with fake_cuda(monkeypatch) as audit:
        engine = Engine(model, tokenizer=None, config=EngineConfig(
            max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_blocks=32, device="cuda:0", dtype=HALF,
            adapters={"a": str(adapter)}))
        _run_steps(engine, _prompts((9, 6, 3)), ["a", None, "a"], steps=5)
        _assert_engine_state_on_the_gpu(engine)
    assert audit.cpu_compute == [] and audit.unsafe_copies == []


def test_a_steps_inputs_are_one_pinned_non_blocking_copy(monkeypatch):
    batch = build_step_batch(list(range(1, 10)), [0, 4, 6, 2], [5, 1, 1, 2], [[0, 1], [2, 3], [4, 5], [6]], 4,
                             [None] * 4, [False] * 4)
    with fake_cuda(monkeypatch) as audit:
        step = to_device(batch, CUDA, windows=(None, 3))
        decode = step.decode
        masks = [decode.mask(None), decode.mask(3), *(group.mask(3) for group in step.prefills)]
    assert_on_device([step.input_ids, step.positions, step.new_slots, step.context_slots, step.last_rows],
                     dtype=torch.int64)
    assert_on_device([decode.rows, decode.slots, decode.lengths, decode.starts], dtype=torch.int64)
    assert_on_device(masks, dtype=torch.bool)
    assert step.prefills
    for group in step.prefills:
        assert_on_device([group.query_rows, group.slots, group.kept, group.kept_rows, group.first_attended],
                         dtype=torch.int64)
    assert audit.unsafe_copies == [] and audit.cpu_compute == []
    assert len(audit.host_to_device) == 1, audit.host_to_device  # both windows' inputs in one transfer


def test_a_step_waits_for_the_gpu_once_to_read_its_samples(adapters, monkeypatch):
    """Greedy and random rows, top logprobs and penalties (rows sampled on their own) all come back in one
    transfer per step; a seeded row adds one (its generator draws on the host), as does a prompt chunk whose
    prompt logprobs were asked for. Each read waits for the GPU to finish the step's work queued so far."""
    model = _model()
    rows = [(SamplingParams(temperature=0.0, logprobs=2), "moe_a"), (SamplingParams(temperature=0.8, top_p=0.9), None),
            (SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.2), "lora"),
            (SamplingParams(temperature=0.7, repetition_penalty=1.2, logprobs=1), "moe_b")]
    seeded = (SamplingParams(temperature=0.7, seed=3), "shared")
    with fake_cuda(monkeypatch) as audit:
        engine = _engine(model, adapters, max_loras=len(adapters))
        reads = []
        for added in ([], [seeded]):
            batch = rows + added
            for prompt, (params, name) in zip(_prompts((5, 9, 7, 3, 6)[:len(batch)]), batch, strict=True):
                params.max_tokens, params.ignore_eos = 3, True
                engine.add_request(prompt, params, name)
            while engine.has_work():
                before = len(audit.host_reads)
                engine.step()
                reads.append(audit.host_reads[before:])
    assert reads == [["Tensor.tolist"]] * 3 + [["aten._to_copy.default", "Tensor.tolist"]] * 3, reads
    model = _model()
    with fake_cuda(monkeypatch) as audit:
        engine = _engine(model, adapters)
        engine.add_request(_prompts((6,))[0], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2), None)
        engine.step()
    assert audit.host_reads == ["Tensor.tolist"] * 2


def test_sampling_filters_and_penalties_stay_on_the_gpu(monkeypatch):
    with fake_cuda(monkeypatch) as audit:
        logits = torch.randn(3, 50, device=CUDA)
        rows = torch.tensor([1.0, 0.5, 2.0], device=CUDA)
        probs = filtered_probs(logits, rows, torch.tensor([5, -1, 50], device=CUDA), rows.clamp(max=1.0), rows / 4)
        params = SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5,
                                frequency_penalty=0.2, logit_bias={4: 2.0})
        penalised = apply_penalties(logits[0].clone(), params, [1, 2, 3], [3, 4])
    assert_on_device([probs, penalised], dtype=torch.float32)
    assert audit.cpu_compute == []


def test_the_kv_pool_is_sized_from_the_gpus_free_memory(monkeypatch):
    config = build("llama").config
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**30))
    blocks = default_num_blocks(config, max_model_len=64, block_size=4, max_num_seqs=1000, dtype=HALF,
                                device="cuda")
    per_block = 2 * config.num_hidden_layers * 4 * config.num_key_value_heads * 8 * 2
    assert blocks == int(2**20 * 0.9) // per_block


def test_auto_dtype_on_a_gpu_is_half_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert auto_dtype(torch.float32, "cuda") == torch.float16
    assert auto_dtype(torch.float32, "cuda", bf16_supported=True) == torch.bfloat16
    assert auto_dtype(torch.float16, "cuda:1") == torch.float16
