"""Continuous batching without a model: budgets, chunked prefill, preemption, cancellation."""

from __future__ import annotations

import random

import pytest

from alphalora.serving.engine import BlockManager, QueueFullError, Scheduler, Sequence, SequenceStatus


def _step(scheduler: Scheduler, rng: random.Random):
    """Runs one step as an engine would: every chunk that reaches the end samples a token."""
    output = scheduler.schedule()
    sampled = {c.seq.seq_id: rng.randint(0, 99) for c in output.chunks if c.completes_prompt}
    scheduler.update(output, sampled)
    for chunk in output.chunks:
        seq = chunk.seq
        if len(seq.output_ids) >= seq.max_tokens and not seq.is_finished:
            scheduler.finish(seq, "length")
    return output


def test_prefill_is_chunked_to_the_token_budget_and_decodes_share_the_step():
    scheduler = Scheduler(BlockManager(64, 4, watermark=0.0), max_num_seqs=8, max_num_batched_tokens=16)
    long = Sequence(0, list(range(40)), max_tokens=2)
    short = Sequence(1, list(range(3)), max_tokens=5)
    scheduler.add(long)
    scheduler.add(short)
    rng = random.Random(0)
    first = _step(scheduler, rng)
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in first.chunks] == [(0, 0, 16)]
    second = _step(scheduler, rng)
    assert [(c.seq.seq_id, c.num_tokens) for c in second.chunks] == [(0, 16)]
    third = _step(scheduler, rng)  # the long prompt's last 8 tokens, then the short prompt
    assert [(c.seq.seq_id, c.num_tokens) for c in third.chunks] == [(0, 8), (1, 3)]
    assert len(long.output_ids) == 1 and len(short.output_ids) == 1
    fourth = _step(scheduler, rng)  # both decode one token each
    assert [(c.seq.seq_id, c.num_tokens) for c in fourth.chunks] == [(0, 1), (1, 1)]
    assert long.status is SequenceStatus.FINISHED and long.finish_reason == "length"
    assert not scheduler.blocks.has(0)


def test_queue_bound_and_length_checks():
    scheduler = Scheduler(BlockManager(8, 4), max_waiting=2, max_model_len=20)
    scheduler.add(Sequence(0, [1, 2], 4))
    scheduler.add(Sequence(1, [1, 2], 4))
    with pytest.raises(QueueFullError, match="retry later"):
        scheduler.add(Sequence(2, [1, 2], 4))
    with pytest.raises(ValueError, match="maximum context length of 20"):
        Scheduler(BlockManager(8, 4), max_model_len=20).add(Sequence(3, list(range(18)), 4))
    with pytest.raises(ValueError, match="cannot fit the KV cache"):
        Scheduler(BlockManager(2, 4), max_model_len=100).add(Sequence(4, list(range(9)), 4))


def test_preemption_frees_blocks_and_recomputes_later():
    scheduler = Scheduler(BlockManager(4, 4, watermark=0.0), max_num_seqs=4, max_num_batched_tokens=64)
    a, b = Sequence(0, list(range(7)), max_tokens=9), Sequence(1, list(range(7)), max_tokens=9)
    scheduler.add(a)
    scheduler.add(b)
    rng = random.Random(1)
    preempted = []
    for _ in range(40):
        if not scheduler.has_work():
            break
        preempted += _step(scheduler, rng).preempted
        scheduler.blocks.check_invariants()
    assert b in preempted  # 16 slots cannot hold two 16-token sequences at once
    assert a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED
    assert len(a.output_ids) == 9 and len(b.output_ids) == 9
    assert scheduler.blocks.num_free_blocks == 4


@pytest.mark.parametrize("caching", [False, True], ids=["no cache", "prefix cache"])
@pytest.mark.parametrize("seed", range(4))
def test_random_admit_finish_cancel_leaks_nothing(seed, caching):
    """With the prefix cache on (two adapters' worth of salts, prompts from a few templates, so that
    prompts share blocks), a step also never writes into a block another sequence holds."""
    rng = random.Random(seed)
    scheduler = Scheduler(BlockManager(48, 4, watermark=0.02), max_num_seqs=6, max_num_batched_tokens=32,
                          max_waiting=30, max_model_len=120)
    templates = [[rng.randint(0, 99) for _ in range(60)] for _ in range(3)]
    sequences = []
    for _ in range(1500):
        if rng.random() < 0.3 and len(scheduler.waiting) < 30:
            seq = Sequence(len(sequences), rng.choice(templates)[:rng.randint(1, 60)], max_tokens=rng.randint(1, 40))
            if caching:
                seq.cache_salt = rng.choice(["", "adapter#0"])
            scheduler.add(seq)
            sequences.append(seq)
        if rng.random() < 0.05 and sequences:
            victim = rng.choice(sequences)
            scheduler.finish(victim, "abort", cancelled=True)
        output = _step(scheduler, rng)
        assert output.num_tokens <= 32 and len(scheduler.running) <= 6
        scheduler.blocks.check_invariants()
        for chunk in output.chunks:
            if chunk.seq.status is SequenceStatus.RUNNING:
                table = scheduler.blocks.block_table(chunk.seq.seq_id)
                written = range(chunk.start // 4, (chunk.start + chunk.num_tokens - 1) // 4 + 1)
                assert all(scheduler.blocks.num_holders(table[i]) == 1 for i in written)
        live = {s.seq_id for s in scheduler.running}
        assert all(not scheduler.blocks.has(s.seq_id) for s in sequences if s.seq_id not in live)
    while scheduler.has_work():
        _step(scheduler, rng)
    assert scheduler.blocks.num_free_blocks == 48
    assert all(s.is_finished for s in sequences)
    assert all(len(s.output_ids) == s.max_tokens for s in sequences if s.status is SequenceStatus.FINISHED)
    assert (scheduler.prefix_hit_tokens > 0) == caching


def test_a_sequence_waits_for_the_prompt_blocks_another_is_computing():
    """Two requests on the same 12-token prompt (blocks of 4): the second is not admitted beside the
    first to compute the same blocks again; it waits a step, then reads two of them from the cache.
    A different request behind it is not held up."""
    scheduler = Scheduler(BlockManager(32, 4, watermark=0.0), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(10, 22))
    first, twin, other = Sequence(0, prompt, 3), Sequence(1, list(prompt), 3), Sequence(2, list(range(50, 56)), 3)
    for seq in (first, twin, other):
        seq.cache_salt = ""
        scheduler.add(seq)
    rng = random.Random(0)
    step1 = _step(scheduler, rng)
    assert [(c.seq.seq_id, c.start, c.num_tokens) for c in step1.chunks] == [(0, 0, 12), (2, 0, 6)]
    assert list(scheduler.waiting) == [twin]
    step2 = _step(scheduler, rng)
    assert (1, 8, 4) in [(c.seq.seq_id, c.start, c.num_tokens) for c in step2.chunks]
    assert twin.num_cached_tokens == 8 and scheduler.prefix_hit_tokens == 8


def test_a_sequence_that_fits_the_pool_only_without_the_watermark_runs_when_it_is_alone():
    """The watermark keeps blocks back for running sequences to grow into. With none running there is
    nothing to keep them for: a sequence that `add` accepted (it fits the pool) but that needs more
    than the pool less the watermark at admission waited for ever, every step empty (with 100 or more
    blocks, e.g. max_num_seqs 1 and a prompt of nearly max_model_len)."""
    scheduler = Scheduler(BlockManager(4, 2, watermark=0.25), max_num_seqs=2, max_num_batched_tokens=64,
                          max_model_len=8)
    seq = Sequence(0, list(range(7)), max_tokens=1)
    scheduler.add(seq)  # 8 tokens: the pool's 4 blocks
    rng = random.Random(0)
    for _ in range(3):
        _step(scheduler, rng)
    assert seq.status is SequenceStatus.FINISHED and len(seq.output_ids) == 1
    assert scheduler.blocks.num_free_blocks == 4


def test_the_watermark_still_holds_back_admissions_while_others_run():
    scheduler = Scheduler(BlockManager(4, 2, watermark=0.25), max_num_seqs=2, max_num_batched_tokens=64,
                          max_model_len=8)
    running, waiting = Sequence(0, [1], max_tokens=2), Sequence(1, list(range(5)), max_tokens=1)
    scheduler.add(running)
    _step(scheduler, random.Random(0))
    scheduler.add(waiting)  # 5 tokens: 3 blocks, and 1 of the 3 free ones is the watermark
    output = scheduler.schedule()
    assert [c.seq.seq_id for c in output.chunks] == [0] and waiting.status is SequenceStatus.WAITING
