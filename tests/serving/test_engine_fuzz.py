"""A randomized differential test of the engine under pressure, against transformers' generate.

Each case draws an engine configuration (a KV pool barely larger than one sequence, so sequences wait
and are preempted; chunked prefill with budgets down to one token; prefix caching with prompts sharing
prefixes across adapters; max_loras below the adapters in flight) and a stream of requests (mixed
MoE-LoRA, shared-router, shortcut, plain LoRA and PEFT adapters and the base model; prompts of one
token and of max_model_len - 1; max_tokens 1; min_tokens; stop token ids), with cancellations, adapter
unloads and re-registrations (a name re-registered with another folder) between steps. Every greedy
output must equal generate on the base model with that request's adapter alone, the block manager's
invariants hold after every step, and every block is free at the end.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from alphalora.adapters.io import load_adapter, save_adapter
from alphalora.adapters.peft_export import export_peft
from alphalora.allocation import Plan
from alphalora.allocation.plan import RouterSettings
from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from tests.tiny_models import build, with_random_adapter

peft = pytest.importorskip("peft")
OVERRIDES = dict(initializer_range=0.2, max_position_embeddings=128)
EOS = 2  # LlamaConfig's


def _base():
    return build("llama", seed=0, **OVERRIDES)


def _adapter(folder, experts, seed, targets=("q", "k", "v", "o", "gate", "up", "down"), rank_pattern=None, **fields):
    method = "hetero" if fields.get("shortcuts") else "uniform"
    plan = Plan(method=method, base_model="tiny", experts_per_layer=list(experts),
                top_k_per_layer=[min(2, e) for e in experts], target_modules=list(targets), rank=4,
                rank_pattern=rank_pattern or {}, lora_alpha=8.0, lora_dropout=0.0, **fields)
    save_adapter(with_random_adapter(_base(), plan, seed=seed, std=0.3), folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_adapters")
    out = {
        "moe_a": _adapter(root / "moe_a", (3, 2), 1),
        "moe_b": _adapter(root / "moe_b", (2, 4), 2, targets=("q", "v", "down")),
        "moe_c": _adapter(root / "moe_c", (3, 2), 9),  # moe_a's shapes: stacked and routed with it
        "lora": _adapter(root / "lora", (1, 1), 3, rank_pattern={"q": 2, "down": 6}),
        "lora_r8": _adapter(root / "lora_r8", (1, 1), 4, targets=("q", "k", "up"), rank_pattern={"k": 8}),
        "shared": _adapter(root / "shared", (3, 2), 23, router=RouterSettings(type="shared")),
        "hetero": _adapter(root / "hetero", (1, 1), 17, targets=("q", "v", "o", "down"), rank_pattern={"v": 2},
                           shortcuts={"layer0.residual1": 2, "layer1.shortcut2": 4}, shortcut_alpha=6.0),
    }
    out["peft"] = export_peft(out["lora"], root / "peft")
    return {name: str(folder) for name, folder in out.items()}


class _Suppress(LogitsProcessor):
    """The engine's min_tokens: EOS and the stop token ids cannot be produced before min_tokens outputs."""

    def __init__(self, prompt_len: int, min_tokens: int, ids: list[int]):
        self.prompt_len, self.min_tokens, self.ids = prompt_len, min_tokens, ids

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len < self.min_tokens:
            scores[:, self.ids] = -float("inf")
        return scores


class _Oracle:
    """generate on the base model with one adapter (ours through load_adapter, PEFT's through peft)."""

    def __init__(self):
        self.models, self.results = {}, {}

    def _model(self, folder: str | None):
        if folder not in self.models:
            model = _base()
            if folder is not None and (Path(folder) / "adapter_config.json").exists():
                model = peft.PeftModel.from_pretrained(model, folder)
            elif folder is not None:
                load_adapter(model, folder)
            model.eval().generation_config.eos_token_id = None
            self.models[folder] = model
        return self.models[folder]

    def greedy(self, folder: str | None, prompt: list[int], params: SamplingParams) -> list[int]:
        key = (folder, tuple(prompt), params.max_tokens, params.min_tokens, tuple(params.stop_token_ids),
               params.ignore_eos)
        if key not in self.results:
            stops = list(params.stop_token_ids) + ([] if params.ignore_eos else [EOS])
            suppress = _Suppress(len(prompt), params.min_tokens, sorted({*params.stop_token_ids, EOS}))
            with torch.no_grad():
                out = self._model(folder).generate(torch.tensor([prompt]), max_new_tokens=params.max_tokens,
                                                   do_sample=False, eos_token_id=stops or None, pad_token_id=0,
                                                   logits_processor=LogitsProcessorList([suppress]))
            self.results[key] = out[0, len(prompt):].tolist()
        return self.results[key]


@pytest.fixture(scope="module")
def oracle():
    return _Oracle()


def _run_case(seed: int, folders: dict[str, str], oracle: _Oracle) -> int:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 4, 8])
    max_model_len = rng.choice([16, 24, 40])
    one_sequence = -(-max_model_len // block_size)
    names = list(folders)
    served = {name: folders[name] for name in rng.sample(names, rng.randint(1, len(names)))}
    engine = Engine(_base(), tokenizer=None, config=EngineConfig(
        max_num_seqs=rng.choice([1, 2, 3, 5, 8]), max_num_batched_tokens=rng.choice([1, 2, 3, 5, 8, 16, 64]),
        block_size=block_size, max_model_len=max_model_len, max_loras=rng.choice([1, 2, 3, 8]),
        num_blocks=rng.choice([one_sequence, one_sequence + 1, one_sequence + 3, 2 * one_sequence, None]),
        enable_prefix_caching=rng.random() < 0.8, adapters=dict(served)))
    current = dict(served)  # what each name serves now
    prefixes = [[rng.randrange(3, 128) for _ in range(rng.randint(1, max_model_len - 1))] for _ in range(3)]
    live, done, issued, steps = [], [], 0, 0
    num_requests = rng.randint(3, 14)
    while issued < num_requests or engine.has_work():
        while issued < num_requests and rng.random() < 0.4:
            issued += 1
            adapter = rng.choice([None, *current])
            draw = rng.random()
            length = max_model_len - 1 if draw < 0.15 else 1 if draw < 0.25 else rng.randint(1, max_model_len - 1)
            if rng.random() < 0.6:  # a shared prefix, perhaps under another adapter
                prompt = (rng.choice(prefixes) + [rng.randrange(3, 128) for _ in range(max_model_len)])[:length]
            else:
                prompt = [rng.randrange(3, 128) for _ in range(length)]
            max_tokens = 1 if rng.random() < 0.15 else rng.randint(1, min(max_model_len - length, 12))
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=rng.random() < 0.5,
                min_tokens=rng.randint(0, max_tokens) if rng.random() < 0.3 else 0,
                stop_token_ids=rng.sample(range(3, 128), rng.randint(1, 20)) if rng.random() < 0.3 else [])
            live.append((engine.add_request(prompt, params, adapter), current.get(adapter)))
        event = rng.random()
        if event < 0.05 and live:
            engine.abort(rng.choice(live)[0])
        elif event < 0.08 and current:
            name = rng.choice(list(current))
            engine.remove_adapter(name)  # its running and waiting requests finish on its weights
            del current[name]
        elif event < 0.12:  # a name registered again, perhaps with another adapter's folder
            name = rng.choice([*names, "alias"])
            folder = folders[rng.choice(names)] if name == "alias" or rng.random() < 0.3 else folders[name]
            if name in engine.adapters.paths:
                engine.remove_adapter(name)
            engine.adapters.register(name, folder)
            current[name] = folder
        engine.step()
        steps += 1
        engine.blocks.check_invariants()
        assert steps < 3000, f"seed {seed}: no progress ({len(engine.scheduler.waiting)} waiting)"
        done += [entry for entry in live if entry[0].is_finished]
        live = [entry for entry in live if not entry[0].is_finished]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine._generators and not engine.adapters.retired
    checked = 0
    for seq, folder in done:
        if seq.finish_reason != "abort":
            expected = oracle.greedy(folder, seq.prompt_ids, seq.params)
            assert seq.output_ids == expected, (seed, seq.seq_id, folder, len(seq.prompt_ids), seq.output_ids)
            checked += 1
    return checked


@pytest.mark.parametrize("seeds", [range(0, 6), range(6, 12)], ids=["0-5", "6-11"])
def test_random_engine_runs_equal_generate_request_by_request(folders, oracle, seeds):
    checked = sum(_run_case(seed, folders, oracle) for seed in seeds)
    assert checked > 20  # the cases do finish requests (not all cancelled)
