"""The KV block pool: exact block counts, slots, and no leak after thousands of random operations."""

from __future__ import annotations

import random

import pytest

from alphalora.serving.engine import BlockManager, OutOfBlocksError


def test_blocks_and_slots_by_hand():
    manager = BlockManager(num_blocks=8, block_size=4, watermark=0.0)
    assert manager.allocate("a", 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert manager.allocate("b", 4) == [2]
    assert manager.slot("a", 0) == 0 and manager.slot("a", 4) == 4 and manager.slot("b", 3) == 11
    assert manager.grow("a", 3) == []  # 8 tokens still fit in 2 blocks
    assert manager.grow("a", 1) == [3]
    assert manager.num_free_blocks == 4
    assert manager.free("a") == 3 and manager.num_free_blocks == 7
    assert manager.free("a") == 0  # freeing twice is harmless
    manager.check_invariants()


def test_out_of_blocks_and_watermark():
    manager = BlockManager(num_blocks=4, block_size=2, watermark=0.25)
    assert manager.can_allocate(6) and not manager.can_allocate(7)  # one block kept back
    manager.allocate("a", 6)
    with pytest.raises(OutOfBlocksError):
        manager.grow("a", 3)
    with pytest.raises(ValueError, match="already has blocks"):
        manager.allocate("a", 1)


@pytest.mark.parametrize("seed", range(5))
def test_no_block_leaks_after_thousands_of_random_operations(seed):
    rng = random.Random(seed)
    manager = BlockManager(num_blocks=64, block_size=rng.choice([1, 4, 16]), watermark=0.05)
    live: set[int] = set()
    next_id = 0
    for _ in range(3000):
        action = rng.random()
        if action < 0.4:  # admit
            tokens = rng.randint(1, 80)
            if manager.can_allocate(tokens):
                manager.allocate(next_id, tokens)
                live.add(next_id)
                next_id += 1
        elif action < 0.75 and live:  # grow (decode or a prefill chunk)
            seq = rng.choice(sorted(live))
            extra = rng.randint(1, 8)
            if manager.can_grow(seq, extra):
                manager.grow(seq, extra)
        elif live:  # finish or cancel
            seq = rng.choice(sorted(live))
            manager.free(seq)
            live.discard(seq)
        manager.check_invariants()
    for seq in list(live):
        manager.free(seq)
    assert manager.num_free_blocks == 64
    manager.check_invariants()
