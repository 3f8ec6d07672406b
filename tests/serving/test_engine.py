"""The engine's greedy output for a mixed batch equals transformers' generate, one request at a time."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from alphalora import allocate, analyze
from alphalora.adapters.inject import AdapterError
from alphalora.adapters.io import load_adapter, save_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation import Plan
from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from alphalora.serving.engine.family import attention_windows
from tests.conftest import requires_cuda
from tests.tiny_models import build, save_tiny, with_random_adapter

peft = pytest.importorskip("peft")
FAMILY_OVERRIDES = dict(initializer_range=0.2, max_position_embeddings=128)


def _base(family="llama"):
    return build(family, seed=0, **FAMILY_OVERRIDES)


def _adapter(folder, family, experts, rank_pattern=None, seed=1, targets=("q", "k", "v", "o", "gate", "up", "down"),
             base=None, **plan_fields):
    model = base if base is not None else _base(family)
    method = "hetero" if plan_fields.get("shortcuts") else "uniform"  # shortcut connections are HeteroLoRA's
    plan = Plan(method=method, base_model="tiny", experts_per_layer=list(experts),
                top_k_per_layer=[min(2, e) for e in experts], target_modules=list(targets), rank=4,
                rank_pattern=rank_pattern or {}, lora_alpha=8.0, lora_dropout=0.0, **plan_fields)
    save_adapter(with_random_adapter(model, plan, seed=seed, std=0.3), folder)
    return folder


def _hf_greedy(family, prompt, max_tokens, adapter=None, peft_dir=None):
    model = _base(family)
    if adapter is not None:
        load_adapter(model, adapter)
    if peft_dir is not None:
        model = peft.PeftModel.from_pretrained(model, peft_dir)
    model.eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    moe_a = _adapter(root / "moe_a", "llama", (3, 2), seed=1)
    moe_b = _adapter(root / "moe_b", "llama", (2, 4), seed=2, targets=("q", "v", "down"))
    moe_c = _adapter(root / "moe_c", "llama", (3, 2), seed=9)  # same shapes as moe_a: routed together
    lora = _adapter(root / "lora", "llama", (1, 1), rank_pattern={"q": 2, "down": 6}, seed=3)
    export_peft(lora, root / "peft")
    return {"moe_a": moe_a, "moe_b": moe_b, "moe_c": moe_c, "lora": lora, "peft": root / "peft"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_mixed_adapter_batch_equals_generate_one_request_at_a_time(adapters, device):
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=24, block_size=4, adapters={k: str(v) for k, v in adapters.items()},
        device=device))
    torch.manual_seed(7)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (5, 17, 9, 3, 30, 12, 7, 11)]
    names = ["moe_a", None, "moe_b", "lora", "peft", "moe_a", None, "moe_c"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        if name == "peft":
            expected = _hf_greedy("llama", prompt, 6, peft_dir=adapters["peft"])
        else:
            expected = _hf_greedy("llama", prompt, 6, adapter=adapters[name] if name else None)
        assert seq.output_ids == expected, (name, seq.output_ids, expected)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("names,path", [
    (["moe_a", "moe_c", "moe_a", "moe_c", "moe_c"], "routed"),  # one group of same-shaped routers
    (["lora", "lora", "lora"], "two GEMMs"),
    (["lora", "peft", "peft", "lora"], "dense-masked"),  # two plain adapters (the PEFT export: its own weights)
], ids=["same-shaped MoE-LoRA adapters", "one plain LoRA adapter", "plain LoRA adapters"])
def test_a_batch_whose_every_token_routes_one_way_equals_generate(adapters, names, path):
    """Every token of every step in one bucket: the engine routes in batch order (no gather), and
    plain LoRA skips the routing kernels: two GEMMs for one adapter, dense-masked ones for a few."""
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=64, block_size=4, adapters={k: str(v) for k, v in adapters.items()}))
    torch.manual_seed(11)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (9, 4, 14, 6, 11)[:len(names)]]
    # min_tokens is generate's min_new_tokens: no EOS before 5 tokens (one of these prompts' greedy 3rd token is EOS)
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        expected = (_hf_greedy("llama", prompt, 5, peft_dir=adapters["peft"]) if name == "peft"
                    else _hf_greedy("llama", prompt, 5, adapter=adapters[name]))
        assert seq.output_ids == expected, name
    layouts = list(engine.runner._step_layouts.values())  # the last step's
    assert layouts and all(layout.rows is None for layout in layouts)
    assert all((layout.only_adapter is not None) == (path == "two GEMMs") for layout in layouts)
    dense = {layout.dense for layout in layouts}
    # dense-masked while the stack's experts x rank is under half the width: the MoE pair's 2 x 2 experts
    # of rank 4 in layer 1 are, their 3 x 2 in layer 0 are not (hidden 32), so both paths ran
    assert dense == {"routed": {True, False}, "two GEMMs": {False}, "dense-masked": {True}}[path]


FAMILY_TARGETS = {"phi3": ("qkv", "o", "gate_up", "down")}  # fused projections


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "phi3"])
def test_other_decoder_families_match_generate(family, tmp_path):
    adapter = _adapter(tmp_path / "moe", family, (2, 3), **_targets(family))
    engine = Engine(_base(family), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, block_size=8, adapters={"moe": str(adapter)}))
    torch.manual_seed(3)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (6, 11)]
    # min_tokens is generate's min_new_tokens (which `_hf_greedy` sets): no EOS before the last token
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, ["moe", None])
    assert seqs[0].output_ids == _hf_greedy(family, prompts[0], 5, adapter=adapter)
    assert seqs[1].output_ids == _hf_greedy(family, prompts[1], 5)


def test_a_peft_lora_folder_on_fused_projections_matches_peft_generate(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj adapted by PEFT LoRA as users train them, beside the base model."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                             rank_pattern={"qkv_proj": 2}, init_lora_weights=False)
    peft.get_peft_model(_base("phi3"), config).save_pretrained(tmp_path / "peft")
    engine = Engine(_base("phi3"), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, block_size=8, adapters={"peft": str(tmp_path / "peft")}))
    torch.manual_seed(3)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (6, 11)]
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, ["peft", None])
    assert seqs[0].output_ids == _hf_greedy("phi3", prompts[0], 5, peft_dir=tmp_path / "peft")
    assert seqs[0].output_ids != _hf_greedy("phi3", prompts[0], 5)
    assert seqs[1].output_ids == _hf_greedy("phi3", prompts[1], 5)


def _targets(family):
    return {"targets": FAMILY_TARGETS[family]} if family in FAMILY_TARGETS else {}


@pytest.mark.parametrize("family,overrides", [
    ("mistral", dict(sliding_window=5)),
    ("phi3", dict(sliding_window=5)),  # every layer, like Mistral's
    # only layers from max_window_layers on slide: layer 0 attends to everything, layer 1 to the last 5
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # Phi-3's partial rotary embedding: Phi-4-mini's rotates 0.75 of each head
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # soft-capped attention and final logits (small caps here, so that they change the tokens), sliding and full
    # layers alternating, each sub-block's output normalised before the residual add
    ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # per-head q/k norms, local and global rotary frequencies per layer type
    ("gemma3", {}),
], ids=["mistral window", "phi3 window", "qwen2 windowed layers", "phi3 partial rotary", "gemma2", "gemma3"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_attention_windows_and_rotary_variants_match_generate(family, overrides, device, tmp_path):
    """Decode steps of several sequences (the batched paged attention; on a GPU the padded gather) and prompt
    chunks keep only each layer's window; rotary variants rotate what the model's own attention rotates."""
    def model():
        return build(family, seed=0, **FAMILY_OVERRIDES, **overrides)

    adapter = _adapter(tmp_path / "moe", family, (2, 3), base=model(), **_targets(family))
    _assert_mixed_batch_matches_generate(model, adapter, max_tokens=8, device=device)


def _assert_mixed_batch_matches_generate(model, adapter, max_tokens, device="cpu"):
    """Four prompts, two with `adapter`, in prompt chunks of 16 tokens and batched decode steps, against
    `generate` on `model()` (on the CPU) one request at a time."""
    engine = Engine(model(), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, block_size=4, max_num_batched_tokens=16, adapters={"moe": str(adapter)}, device=device))
    torch.manual_seed(5)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (9, 3, 14, 10)]
    names = [None, "moe", None, "moe"]
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        reference = model()
        if name:
            load_adapter(reference, adapter)
        out = reference.eval().generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                        do_sample=False, pad_token_id=0)
        assert seq.output_ids == out[0, len(prompt):].tolist(), name


@pytest.mark.parametrize("max_model_len", [32, 128], ids=["within the original context", "beyond it"])
def test_long_context_rope_is_fixed_by_max_model_len_as_vllm_fixes_it(max_model_len):
    """LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): vLLM uses the long factors for every token iff max_model_len
    exceeds original_max_position_embeddings, and the short ones otherwise. `generate` switches by a sequence's
    own length, so it is the oracle where that choice is the same for every length: sequences within the original
    context of 32, or a model whose short factors are its long ones."""
    def model(short_factor):
        return build("phi3", seed=0, **FAMILY_OVERRIDES, original_max_position_embeddings=32, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 32, "short_factor": short_factor, "long_factor": [3.0, 5.0]})

    engine = Engine(model([1.0, 1.5]), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, block_size=4, max_num_batched_tokens=16, max_model_len=max_model_len))
    torch.manual_seed(5)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (9, 3, 14, 10)]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0, ignore_eos=True))
    reference = model([1.0, 1.5] if max_model_len <= 32 else [3.0, 5.0]).eval()
    for prompt, seq in zip(prompts, seqs, strict=True):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
        assert seq.output_ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_mixture_of_experts_base_models_match_generate(family, device, tmp_path):
    """The base model's own experts run as its module; the adapters sit where `allocate` puts them by default: on
    attention, Qwen2-MoE's shared expert, and Qwen3-MoE's dense layer-0 MLP."""
    model = _base(family)
    targets = allocate(analyze(model), method="uniform", budget=2).target_modules
    assert set(targets) >= {"q", "k", "v", "o"}
    adapter = _adapter(tmp_path / "moe", family, (2, 3), targets=targets)
    _assert_mixed_batch_matches_generate(lambda: _base(family), adapter, max_tokens=6, device=device)


def test_lora_on_linears_the_engine_does_not_project_is_refused_not_ignored(tmp_path):
    # PEFT can put LoRA on the LM head
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    peft.get_peft_model(_base("llama"), config).save_pretrained(tmp_path / "peft")
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(max_num_seqs=2, block_size=4))
    with pytest.raises(AdapterError, match=r"lm_head.*runs without adapters"):
        engine.adapters.register("peft", str(tmp_path / "peft"), load_now=True)


def test_an_adapter_of_another_family_is_refused_though_its_shapes_fit(tmp_path):
    """Gemma 2 and Gemma 3 models of one size have the same linears: a Gemma 2 adapter would load onto the Gemma 3
    and compute nonsense (load_adapter refuses it by the base model's fingerprint; vLLM's bake too)."""
    folder = _adapter(tmp_path / "gemma2", "gemma2", (2, 2))
    engine = Engine(_base("gemma3"), tokenizer=None, config=EngineConfig(max_num_seqs=2, block_size=4))
    with pytest.raises(AdapterError, match=r"trained on a 'gemma2' model .*not a 'gemma3_text' one"):
        engine.adapters.register("other", str(folder), load_now=True)
    engine.adapters.register("own", str(_adapter(tmp_path / "gemma3", "gemma3", (2, 2))), load_now=True)


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_a_model_of_a_family_the_engine_does_not_run_is_refused_before_its_weights_load(family, tmp_path,
                                                                                         monkeypatch):
    """An encoder (all-MiniLM-L6-v2 is a BERT) used to fail sizing the KV pool, with an AttributeError on
    num_key_value_heads; the family is now checked first, from the config alone."""
    folder = save_tiny(family, tmp_path / family)
    with pytest.raises(ValueError, match=rf"model type '{family}' is not served: the engine generates with the "
                                         r"decoder families llama, mistral") as refused:
        Engine(build(family), tokenizer=None)
    assert ("an encoder such as BERT" in str(refused.value)) == (family == "bert")  # OPT is a decoder

    def no_weights(*_args, **_kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=rf"model type '{family}' is not served"):
        Engine.from_pretrained(folder)


def test_attention_of_other_kinds_is_refused():
    config = transformers.Qwen2Config(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match=r"chunked_attention.*not served"):
        attention_windows(config)


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    # the logprobs of soft-capped final logits (greedy tokens alone cannot tell: the cap keeps the order)
    ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
])
def test_prompt_logprobs_equal_the_models_full_forward(family, overrides):
    def model():
        return build(family, seed=0, **FAMILY_OVERRIDES, **overrides)

    engine = Engine(model(), tokenizer=None, config=EngineConfig(max_num_batched_tokens=8, block_size=4))
    prompt = torch.randint(1, 128, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    logits = model().eval()(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [None] + [float(logits[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    for i, ((got, top, rank), want) in enumerate(zip(seq.prompt_logprobs[1:], expected[1:], strict=True)):
        assert abs(got - want) < 1e-4
        assert list(top) == logits[i].topk(2).indices.tolist()  # the model's own top 2 at that position
        assert rank == int((logits[i] > logits[i, prompt[i + 1]]).sum()) + 1  # 1 + the more probable tokens


def test_prompt_logprobs_of_a_preempted_prompt_are_recomputed_not_appended():
    """A pool of 4 blocks of 4 tokens: b's 10-token prompt, prefilled 2 tokens a step beside a growing a, is
    preempted mid-prefill and recomputed from its start; its prompt logprobs are still one per prompt token,
    the model's own."""
    model = _base("llama")
    engine = Engine(model, tokenizer=None, config=EngineConfig(
        max_num_seqs=2, block_size=4, num_blocks=4, max_model_len=16, max_num_batched_tokens=3,
        enable_prefix_caching=False))
    engine.add_request(list(range(10, 13)), SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True))
    prompt = list(range(20, 30))
    b = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    preempted = False
    while engine.has_work():
        was_running = b in engine.scheduler.running
        engine.step()
        preempted |= was_running and b in engine.scheduler.waiting
    assert preempted
    logits = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert b.prompt_logprobs[0] is None and len(b.prompt_logprobs) == len(prompt)
    assert [e.logprob for e in b.prompt_logprobs[1:]] == pytest.approx(
        [float(logits[i, prompt[i + 1]]) for i in range(len(prompt) - 1)], abs=1e-4)


@pytest.mark.parametrize("prompt, fragment", [([], "the prompt is empty"), ([5, 128], r"outside the vocabulary of 128"),
                                              ([5, -1], "outside the vocabulary")])
def test_a_prompt_the_model_cannot_read_is_refused_and_the_batch_runs_on(prompt, fragment):
    """An empty prompt would sample another sequence's row; an id past the embedding would fail every step."""
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(block_size=4))
    other = engine.add_request([5, 9, 17], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    with pytest.raises(ValueError, match=fragment):
        engine.add_request(prompt, SamplingParams(max_tokens=2))
    while engine.has_work():
        engine.step()
    assert other.output_ids == _hf_greedy("llama", [5, 9, 17], 4)


HEADS = ["lm_head", "model.embed_tokens"]  # modules_to_save: trained in full, swapped in per adapter


def test_adapters_that_replace_lm_head_and_embeddings_match_generate_in_a_mixed_batch(adapters, tmp_path):
    own_moe = _adapter(tmp_path / "moe_heads", "llama", (2, 3), seed=11, modules_to_save=HEADS)
    own_lora = _adapter(tmp_path / "lora_heads", "llama", (1, 1), seed=12, targets=("q", "v"),
                        modules_to_save=["lm_head"])
    peft_dir = export_peft(_adapter(tmp_path / "lora_both", "llama", (1, 1), seed=13, modules_to_save=HEADS),
                           tmp_path / "peft_heads")
    folders = {"moe_heads": own_moe, "lora_heads": own_lora, "peft_heads": peft_dir, "moe_a": adapters["moe_a"]}
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=20, block_size=4, adapters={k: str(v) for k, v in folders.items()}))
    torch.manual_seed(8)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (6, 13, 4, 9, 21, 5)]
    names = ["moe_heads", None, "peft_heads", "lora_heads", "moe_a", "moe_heads"]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        if name == "peft_heads":
            expected = _hf_greedy("llama", prompt, 6, peft_dir=peft_dir)
        else:
            expected = _hf_greedy("llama", prompt, 6, adapter=folders[name] if name else None)
        assert seq.output_ids == expected, (name, seq.output_ids, expected)


def test_prompt_logprobs_use_the_adapters_own_lm_head(tmp_path):
    folder = _adapter(tmp_path / "heads", "llama", (2, 2), seed=14, modules_to_save=HEADS)
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_batched_tokens=8, block_size=4, adapters={"heads": str(folder)}))
    prompt = torch.randint(1, 128, (15,), generator=torch.Generator().manual_seed(3)).tolist()
    (seq,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), ["heads"])
    model = _base("llama")
    load_adapter(model, folder)
    logits = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for i, entry in enumerate(seq.prompt_logprobs[1:]):
        assert abs(entry.logprob - float(logits[i, prompt[i + 1]])) < 1e-4 and entry.top == {}


@pytest.mark.parametrize("case,needle", [
    ("wider_model", "in this base model but the adapter's weights are"),
    ("deeper_model", "which this base model does not have as a linear layer"),
    ("classifier_head", "does not generate text"),
    ("resized_vocabulary", "resize the vocabulary"),
    ("peft_bias", "trains the base model's biases"),
    ("peft_embedding_lora", "LoRA on embedding"),
    ("peft_dora", "DoRA"),
    ("peft_pickled", "pickled"),
    ("peft_not_json", "is not valid JSON"),
])
def test_adapters_that_do_not_fit_the_served_model_are_refused_at_load(tmp_path, case, needle):
    folder = tmp_path / case

    def peft_folder(**config):
        model = peft.get_peft_model(_base("llama"), peft.LoraConfig(
            r=4, target_modules=["q_proj", "embed_tokens"] if case == "peft_embedding_lora" else ["q_proj"],
            **config))
        model.save_pretrained(folder)
        return folder

    def rewrite_config(**fields):
        import json

        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **fields}))

    if case == "wider_model":
        _adapter(folder, "llama", (2, 2), base=build("llama", 0, **FAMILY_OVERRIDES, hidden_size=64))
    elif case == "deeper_model":
        _adapter(folder, "llama", (2, 2, 2), base=build("llama", 0, **FAMILY_OVERRIDES, num_hidden_layers=3))
    elif case == "classifier_head":
        _adapter(folder, "llama", (2, 2), modules_to_save=["score"],
                 base=transformers.LlamaForSequenceClassification(_base("llama").config))
    elif case == "resized_vocabulary":
        _adapter(folder, "llama", (1, 1), modules_to_save=["lm_head"],
                 base=build("llama", 0, **FAMILY_OVERRIDES, vocab_size=130))
    elif case == "peft_bias":
        peft_folder(bias="all")
    elif case == "peft_embedding_lora":
        peft_folder()
    elif case == "peft_dora":
        peft_folder()
        rewrite_config(use_dora=True)
    elif case == "peft_pickled":
        peft_folder()
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    elif case == "peft_not_json":
        peft_folder()
        (folder / "adapter_config.json").write_text("{not json")
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(adapters={"bad": str(folder)}))
    with pytest.raises(AdapterError, match=re.escape(needle)):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), "bad")
    assert engine.adapters.resident == [] and not engine.has_work()


def test_peft_scales_follow_peft_for_alpha_patterns_and_rslora():
    from alphalora.adapters.peft_format import peft_scaling

    for rslora in (False, True):
        config = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=rslora, lora_dropout=0.0,
                                 target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 4},
                                 alpha_pattern={"v_proj": 40, "layers.1.self_attn.q_proj": 2, "proj": 99})
        model = peft.get_peft_model(_base("llama"), config)
        as_dict = config.to_dict()
        layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "scaling")
                  and isinstance(m.scaling, dict) and "default" in m.scaling}
        assert len(layers) == 6
        for name, layer in layers.items():
            assert peft_scaling(as_dict, name, layer.r["default"]) == pytest.approx(layer.scaling["default"]), name


# -- half precision, and on a CUDA GPU (skipped without one) ---------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def _engine_on(adapters, dtype=None, device="cuda", **config):
    return Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        device=device, dtype=dtype, max_num_seqs=8, max_num_batched_tokens=24, block_size=4,
        adapters={k: str(v) for k, v in adapters.items()}, **config))


def _prompt_logprobs_by_transformers(prompt: list[int], adapter, device: str, dtype) -> torch.Tensor:
    model = _base("llama")
    if adapter is not None:
        load_adapter(model, adapter)
    model = model.to(device, dtype).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device)).logits[0].float().log_softmax(-1).cpu()
    return torch.tensor([float(logits[i, prompt[i + 1]]) for i in range(len(prompt) - 1)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,slack", [(torch.bfloat16, 0.01), (torch.float16, 0.002)])
@pytest.mark.parametrize("name", [None, "moe_a", "lora"])
def test_half_precision_is_as_close_to_fp32_as_transformers_in_that_precision(adapters, dtype, slack, name, device):
    """bf16/fp16 round differently from any fp32 oracle (and top-k routing can flip on a rounding), so
    the engine's prompt logprobs in half precision must be about as close to the fp32 model's as
    transformers' own forward in that precision on the same device is."""
    errors = []
    for seed in (2, 3):
        (prompt,) = _prompts(seed, lengths=(29,))
        engine = _engine_on(adapters, dtype=dtype, device=device)
        (seq,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                                 [name])
        exact = _prompt_logprobs_by_transformers(prompt, adapters[name] if name else None, "cpu", torch.float32)
        ours = torch.tensor([entry.logprob for entry in seq.prompt_logprobs[1:]])
        theirs = _prompt_logprobs_by_transformers(prompt, adapters[name] if name else None, device, dtype)
        errors.append(((ours - exact).abs().mean(), (theirs - exact).abs().mean()))
    ours_error = sum(e for e, _ in errors) / 2
    theirs_error = sum(e for _, e in errors) / 2
    assert ours_error <= 2 * theirs_error + slack, (ours_error, theirs_error)


@requires_cuda
def test_cuda_penalties_and_seeded_sampling_follow_the_cpu_engine(adapters):
    """Penalties index and count on the device; greedy with penalties equals the CPU engine, and a
    seeded sampled request repeats itself exactly."""
    prompts = _prompts(11, lengths=(8, 13, 21))
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.7)
    names = ["moe_a", "lora", None]
    cpu = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, block_size=4, adapters={k: str(v) for k, v in adapters.items()}))
    want = [s.output_ids for s in cpu.generate(prompts, greedy, names)]
    assert [s.output_ids for s in _engine_on(adapters).generate(prompts, greedy, names)] == want

    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=20, seed=5, ignore_eos=True,
                             frequency_penalty=0.3, logprobs=3)
    first = [s.output_ids for s in _engine_on(adapters).generate(prompts, sampled, names)]
    second = [s.output_ids for s in _engine_on(adapters).generate(prompts, sampled, names)]
    assert first == second and all(len(ids) == 8 for ids in first)


def test_auto_dtype_reads_like_vllm_on_a_gpu_and_keeps_float32_on_the_cpu(tmp_path):
    from alphalora.serving.engine.engine import auto_dtype

    assert auto_dtype(torch.bfloat16, "cpu") == torch.float32
    assert auto_dtype(torch.float16, "cuda:0") == torch.float16
    assert auto_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert auto_dtype(torch.float32, "cuda", bf16_supported=True) == torch.bfloat16
    assert auto_dtype(None, "cuda", bf16_supported=False) == torch.float16
    folder = save_tiny("llama", tmp_path / "bf16-model")
    _base("llama").to(torch.bfloat16).save_pretrained(folder)  # the checkpoint in bfloat16
    engine = Engine.from_pretrained(folder, EngineConfig(max_num_seqs=2))
    assert next(engine.model.parameters()).dtype == torch.float32  # auto on the CPU


def test_logit_bias_equals_generate_with_sequence_bias(adapters):
    """OpenAI's logit_bias against transformers' own sequence_bias (single-token sequences), greedy,
    with an adapter: a banned favourite and a boosted outsider change the tokens the same way."""
    torch.manual_seed(21)
    prompt = torch.randint(1, 128, (9,)).tolist()
    plain = _hf_greedy("llama", prompt, 6, adapter=adapters["moe_a"])
    bias = {plain[0]: -100.0, plain[1]: -100.0, 77: 4.0}
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, block_size=4, adapters={"moe_a": str(adapters["moe_a"])}))
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.0, ignore_eos=True, logit_bias=bias)
    (seq,) = engine.generate([prompt], params, ["moe_a"])
    model = _base("llama")
    load_adapter(model, adapters["moe_a"])
    out = model.eval().generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0, sequence_bias={(t,): b for t, b in bias.items()})
    assert seq.output_ids == out[0, len(prompt):].tolist() != plain
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(prompt, SamplingParams(logit_bias={10**6: 1.0}), "moe_a")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_heterolora_shortcut_connections_equal_generate_in_a_mixed_batch(adapters, tmp_path, device):
    """HeteroLoRA's residual and cross-layer shortcuts (d -> d LoRA maps added inside a block's attention
    or FFN sum) served beside MoE-LoRA and plain requests: each equals generate with the adapter loaded
    by the training side, whose hooks are the independent implementation."""
    shortcuts = {"layer0.residual1": 2, "layer0.shortcut1": 3, "layer1.residual2": 2, "layer1.shortcut2": 4}
    # LoRA on o and down as well: the shortcut terms join those projections' adapted outputs
    hetero = _adapter(tmp_path / "hetero", "llama", (1, 1), seed=17, targets=("q", "v", "o", "down"),
                      rank_pattern={"v": 2}, shortcuts=shortcuts, shortcut_alpha=6.0)
    only_shortcuts = _adapter(tmp_path / "only", "llama", (1, 1), seed=18, targets=("q",),
                              shortcuts={"layer1.shortcut1": 2})
    served = {"hetero": hetero, "only": only_shortcuts, "moe_a": adapters["moe_a"]}
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=24, block_size=4, adapters={k: str(v) for k, v in served.items()},
        device=device))
    torch.manual_seed(19)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (7, 12, 5, 9, 15)]
    names = ["hetero", "moe_a", None, "only", "hetero"]
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.output_ids == _hf_greedy("llama", prompt, 5, adapter=served[name] if name else None), name
    assert engine.adapters.get("hetero").shortcuts.keys() == {(0, "residual1"), (0, "shortcut1"), (1, "residual2"),
                                                              (1, "shortcut2")}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_shared_router_adapters_equal_generate_in_a_mixed_batch(adapters, tmp_path, device):
    """The shared-router option (one router per block, reading the block's input, gating every adapted
    module of the block) beside per-module-router MoE-LoRA, plain LoRA and the base."""
    from alphalora.allocation.plan import RouterSettings

    shared = _adapter(tmp_path / "shared", "llama", (3, 2), seed=23, router=RouterSettings(type="shared"))
    served = {"shared": shared, "moe_a": adapters["moe_a"], "lora": adapters["lora"]}
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=24, block_size=4, adapters={k: str(v) for k, v in served.items()},
        device=device))
    torch.manual_seed(29)
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (8, 13, 6, 10, 4)]
    names = ["shared", "moe_a", "shared", None, "lora"]
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.output_ids == _hf_greedy("llama", prompt, 5, adapter=served[name] if name else None), name
    loaded = engine.adapters.get("shared")
    assert set(loaded.layer_routers) == {0, 1} and all(m.shared_router for m in loaded.modules.values())
    (alone,) = engine.generate(prompts[:1], params, ["shared"])  # all the step's tokens: no row gather
    assert alone.output_ids == seqs[0].output_ids


def test_a_shortcut_for_another_model_is_refused_at_load(tmp_path):
    """Shortcut maps are d -> d in a given block: one of another width, or for a block this model does
    not have, is refused before it is copied to the device (the adapter's modules may fit)."""
    from alphalora.serving.engine.adapters import LoadedAdapter, ModuleAdapter, ServedModel

    model = _base("llama")
    fits = ServedModel.of(model, {})
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers

    def with_shortcut(layer, width):
        shortcut = ModuleAdapter(A=torch.zeros(1, 2, width), B=torch.zeros(1, width, 2), scaling=1.0)
        return LoadedAdapter("x", tmp_path, {}, {}, {(layer, "residual1"): shortcut})

    fits.check(with_shortcut(layers - 1, hidden))
    for layer, width in ((0, hidden + 16), (layers, hidden)):
        with pytest.raises(AdapterError, match="trained for another model"):
            fits.check(with_shortcut(layer, width))


@pytest.mark.parametrize("field", ["max_num_seqs", "max_loras", "max_num_batched_tokens", "max_waiting", "block_size"])
def test_a_limit_of_zero_is_refused_not_left_to_hang_every_request(field):
    """With no sequence (or no adapter) ever admitted, every request would wait for ever."""
    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got 0"):
        EngineConfig(**{field: 0})


def test_a_context_longer_than_the_models_is_refused():
    """As vLLM: positions past max_position_embeddings would be served without a word."""
    with pytest.raises(ValueError, match="longer than the model's context of 128 tokens"):
        Engine(_base("llama"), tokenizer=None, config=EngineConfig(max_model_len=129))
    assert Engine(_base("llama"), tokenizer=None, config=EngineConfig(max_model_len=128)).max_model_len == 128


@pytest.mark.parametrize("kind", ["shortcuts", "shared_router"])
def test_block_level_adapter_parts_leave_the_base_models_tokens_alone(tmp_path, kind):
    """A step whose only adapter has block-level parts (HeteroLoRA's shortcuts, a shared router) beside
    base-model requests: those parts run on the adapter's tokens only. Its tokens are every adapted
    token of the step but not every token, and the base requests' tokens came out adapted."""
    from alphalora.allocation.plan import RouterSettings

    if kind == "shortcuts":
        folder = _adapter(tmp_path / "hetero", "llama", (1, 1), seed=17, targets=("q", "v"),
                          shortcuts={"layer0.residual1": 2, "layer1.shortcut2": 4}, shortcut_alpha=6.0)
    else:
        folder = _adapter(tmp_path / "shared", "llama", (3, 2), seed=23, router=RouterSettings(type="shared"))
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=24, block_size=4, adapters={"x": str(folder)}))
    prompts = [[65, 61, 52], [69], [7, 8, 9, 10, 11]]
    names = [None, "x", None]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.output_ids == _hf_greedy("llama", prompt, 3, adapter=folder if name else None), name
