"""Prefix caching: block sharing and eviction by hand, no leak under random use, and the engine's
output with cached prefixes equal to transformers' generate (and to the engine without the cache)."""

from __future__ import annotations

import random

import pytest
import torch

from alphalora.serving.engine import BlockManager, Engine, EngineConfig, SamplingParams
from alphalora.serving.engine.prefix_cache import extend_block_hashes
from tests.conftest import requires_cuda
from tests.serving.test_engine import _adapter, _base, _hf_greedy


def test_hashes_cover_the_tokens_before_and_the_adapter():
    tokens = list(range(10))
    base = extend_block_hashes([], tokens, 4, "")
    assert len(base) == 2  # full blocks only
    assert extend_block_hashes([], tokens[:8] + [99, 98], 4, "") == base  # the partial block does not count
    assert extend_block_hashes(base[:1], tokens, 4, "") == base  # extending gives what hashing at once gives
    other_first = extend_block_hashes([], [7] + tokens[1:], 4, "")
    assert other_first[0] != base[0] and other_first[1] != base[1]  # block 1 depends on block 0's tokens
    lora = extend_block_hashes([], tokens, 4, "lora#0")
    assert not set(lora) & set(base)
    assert extend_block_hashes([], tokens, 4, "lora#1") != lora  # the same name registered again


def test_sharing_and_eviction_by_hand():
    manager = BlockManager(num_blocks=6, block_size=4, watermark=0.0)
    assert manager.allocate("a", 10) == [0, 1, 2]
    manager.register("a", 0, "h0")
    manager.register("a", 1, "h1")
    assert manager.cached_prefix(["h0", "h1", "h2"]) == [0, 1]
    assert manager.can_allocate(12, [0, 1]) and not manager.can_allocate(13, [0, 1])  # 3 blocks free
    assert manager.allocate("b", 6, [0, 1]) == [0, 1, 3, 4]  # shared prefix, then its own blocks
    assert manager.num_tokens("b") == 14 and manager.slot("b", 9) == 3 * 4 + 1
    manager.check_invariants()
    manager.free("a")
    assert manager.num_free_blocks == 2  # blocks 0 and 1 are still b's
    manager.free("b")
    assert manager.num_free_blocks == 6 and manager.num_cached_blocks == 2
    manager.check_invariants()
    # Never-cached blocks go first; then the cached block freed longest ago (a prefix's tail first).
    manager.allocate("c", 16)
    assert sorted(manager.block_table("c")) == [2, 3, 4, 5]
    assert manager.grow("c", 4) == [1] and manager.cached_prefix(["h0", "h1"]) == [0]
    # An idle cached block taken as a prefix leaves the free pool.
    assert manager.can_allocate(1, [0]) is False and manager.num_free_blocks == 1
    manager.free("c")
    table = manager.allocate("d", 1, [0])
    assert table[0] == 0 and len(table) == 2 and manager.num_tokens("d") == 5
    manager.check_invariants()


def test_a_content_registered_twice_keeps_its_first_block():
    manager = BlockManager(num_blocks=4, block_size=2, watermark=0.0)
    manager.allocate("a", 2)
    manager.allocate("b", 2)
    manager.register("a", 0, "same")
    manager.register("b", 0, "same")  # computed at the same time as a's: b keeps a private copy
    manager.free("a")
    manager.free("b")
    assert manager.cached_prefix(["same"]) == [0] and manager.num_cached_blocks == 1
    manager.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_no_block_leaks_with_sharing_after_thousands_of_random_operations(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4])
    manager = BlockManager(num_blocks=48, block_size=block_size, watermark=0.05)
    prompts = [[rng.randrange(3) for _ in range(40)] for _ in range(4)]  # few distinct prefixes: many hits
    live: dict[int, list[int]] = {}  # sequence -> its tokens so far
    registered: dict[int, int] = {}
    next_id = 0
    for _ in range(3000):
        action = rng.random()
        if action < 0.35:  # admit, starting from whatever prefix is cached
            tokens = rng.choice(prompts)[:rng.randint(1, 40)]
            hashes = extend_block_hashes([], tokens, block_size, "")
            prefix = manager.cached_prefix(hashes[:(len(tokens) - 1) // block_size])
            rest = len(tokens) - len(prefix) * block_size
            if manager.can_allocate(rest, prefix):
                manager.allocate(next_id, rest, prefix)
                live[next_id], registered[next_id] = tokens, 0
                next_id += 1
        elif action < 0.7 and live:  # compute: register the full blocks, maybe grow by a token
            seq = rng.choice(sorted(live))
            tokens = live[seq]
            hashes = extend_block_hashes([], tokens, block_size, "")
            for index in range(registered[seq], len(hashes)):
                manager.register(seq, index, hashes[index])
            registered[seq] = len(hashes)
            if manager.can_grow(seq, 1):
                manager.grow(seq, 1)
                tokens.append(rng.randrange(3))
        elif live:  # finish, cancel or preempt
            seq = rng.choice(sorted(live))
            manager.free(seq)
            del live[seq], registered[seq]
        manager.check_invariants()
    for seq in list(live):
        manager.free(seq)
    assert manager.num_free_blocks == 48
    manager.check_invariants()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {"moe": _adapter(root / "moe", "llama", (3, 2), seed=1),
            "lora": _adapter(root / "lora", "llama", (1, 1), rank_pattern={"q": 2}, seed=3)}


def _engine(adapters, caching=True, device="cpu"):
    return Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=32, block_size=4, enable_prefix_caching=caching,
        adapters={k: str(v) for k, v in adapters.items()}, device=device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_cached_prefixes_give_generates_tokens_per_adapter(adapters, device):
    """Two waves of requests on one shared system prompt: the second wave starts from the first's
    blocks (each adapter from its own: the adapter shapes the keys and values) and still equals
    generate; a prompt that is all cached recomputes its last token."""
    torch.manual_seed(5)
    shared = torch.randint(1, 128, (18,)).tolist()
    prompts = [shared + torch.randint(1, 128, (n,)).tolist() for n in (3, 9, 5)] + [shared[:16]]
    names = ["moe", "lora", None, "moe"]
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, ignore_eos=True)
    engine = _engine(adapters, device=device)
    engine.generate(prompts[:3], params, names[:3])  # wave 1 fills the cache
    assert engine.scheduler.prefix_hit_tokens == 0
    seqs = engine.generate(prompts, params, names)  # wave 2
    # Wave 1 computed every full block of its prompts under its own adapter; a prompt may start from
    # all of them short of its last token: 21 tokens -> 5 blocks of 4, 27 -> 6, 23 -> 5, and the
    # 16-token prompt (moe's shared blocks) 3 of its 4.
    assert engine.scheduler.prefix_hit_tokens == 4 * (5 + 6 + 5 + 3)
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.output_ids == _hf_greedy("llama", prompt, 5, adapter=adapters[name] if name else None), name
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def test_without_the_cache_nothing_is_shared_and_tokens_agree(adapters):
    torch.manual_seed(6)
    shared = torch.randint(1, 128, (12,)).tolist()
    prompts = [shared + [5, 6], shared + [7]] * 2
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    cached, plain = _engine(adapters), _engine(adapters, caching=False)
    first = cached.generate(prompts, params, ["lora", "lora", "lora", "lora"])
    second = cached.generate(prompts, params, ["lora", "lora", "lora", "lora"])
    reference = plain.generate(prompts, params, ["lora", "lora", "lora", "lora"])
    assert plain.scheduler.prefix_hit_tokens == 0 and plain.blocks.num_cached_blocks == 0
    assert cached.scheduler.prefix_hit_tokens > 0
    for a, b, c in zip(first, second, reference, strict=True):
        assert a.output_ids == b.output_ids == c.output_ids


def test_prompt_logprobs_are_computed_not_read_from_the_cache(adapters):
    torch.manual_seed(8)
    prompt = torch.randint(1, 128, (13,)).tolist()
    engine = _engine(adapters)
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], greedy)  # fills the cache
    wanted = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    (seq,) = engine.generate([prompt], wanted)
    (fresh,) = _engine(adapters, caching=False).generate([prompt], wanted)
    assert len(seq.prompt_logprobs) == len(prompt)
    assert [p if p is None else p.logprob for p in seq.prompt_logprobs] == pytest.approx(
        [p if p is None else p.logprob for p in fresh.prompt_logprobs])


def test_an_adapter_registered_again_does_not_read_its_predecessors_blocks(adapters, tmp_path):
    """Unloaded and loaded again under the same name with other weights: the old blocks would be wrong."""
    torch.manual_seed(9)
    prompt = torch.randint(1, 128, (14,)).tolist()
    params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0, ignore_eos=True)
    engine = _engine(adapters)
    engine.generate([prompt], params, ["moe"])
    other = _adapter(tmp_path / "other", "llama", (3, 2), seed=21)
    engine.adapters.unregister("moe")
    engine.adapters.register("moe", other)
    before = engine.scheduler.prefix_hit_tokens
    (seq,) = engine.generate([prompt], params, ["moe"])
    assert engine.scheduler.prefix_hit_tokens == before
    assert seq.output_ids == _hf_greedy("llama", prompt, 4, adapter=other)


def test_a_second_turn_reuses_the_first_turns_generated_blocks(adapters):
    """Chat: turn 2's prompt is turn 1's prompt, its answer and a new message. Blocks filled while
    decoding are cached too, so turn 2 computes only the new message (and generate agrees)."""
    torch.manual_seed(12)
    first_prompt = torch.randint(1, 128, (10,)).tolist()
    params = SamplingParams(max_tokens=9, min_tokens=9, temperature=0.0, ignore_eos=True)
    engine = _engine(adapters)
    (turn1,) = engine.generate([first_prompt], params, ["moe"])
    second_prompt = first_prompt + turn1.output_ids + torch.randint(1, 128, (5,)).tolist()
    (turn2,) = engine.generate([second_prompt], params, ["moe"])
    # Turn 1 computed the KV of its prompt and of its first 8 answer tokens (the 9th was sampled last):
    # 18 tokens, 4 full blocks of 4.
    assert turn2.num_cached_tokens == 16 > len(first_prompt)
    assert turn2.output_ids == _hf_greedy("llama", second_prompt, 9, adapter=adapters["moe"])


def test_preempted_sequences_resume_from_the_cache_and_equal_generate(adapters):
    """A pool too small for the batch (14 blocks of 4 for four sequences of 24-28 tokens): sequences are
    preempted, their blocks freed but left cached, and readmitted ones start from them."""
    torch.manual_seed(13)
    shared = torch.randint(1, 128, (12,)).tolist()
    prompts = [shared + torch.randint(1, 128, (n,)).tolist() for n in (2, 5, 3, 6)]
    names = ["lora", "moe", "lora", None]
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_blocks=14,
        adapters={k: str(v) for k, v in adapters.items()}))
    preempted, preempt = [], engine.scheduler._preempt_last

    def counting(output):
        preempted.append(preempt(output))
        return preempted[-1]

    engine.scheduler._preempt_last = counting
    params = SamplingParams(max_tokens=10, min_tokens=10, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params, names)
    assert preempted and engine.scheduler.prefix_hit_tokens > 0
    for prompt, name, seq in zip(prompts, names, seqs, strict=True):
        assert seq.output_ids == _hf_greedy("llama", prompt, 10, adapter=adapters[name] if name else None), name
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def test_parallel_samples_of_one_prompt_compute_it_once(adapters):
    """n > 1 (three sequences on one prompt, submitted together): the first computes the prompt, the
    others wait a step and read its blocks (all but the last token's), with generate's tokens."""
    torch.manual_seed(14)
    prompt = torch.randint(1, 128, (13,)).tolist()
    engine = _engine(adapters)
    params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0, ignore_eos=True)
    seqs = engine.generate([prompt] * 3, params, ["moe"] * 3)
    assert [s.num_cached_tokens for s in seqs] == [0, 12, 12]
    expected = _hf_greedy("llama", prompt, 4, adapter=adapters["moe"])
    assert all(s.output_ids == expected for s in seqs)
