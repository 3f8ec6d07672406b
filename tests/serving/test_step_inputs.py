"""A step's inputs built for the whole batch at once, against the block manager's slot per token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from alphalora.serving.engine.adapters import LoadedAdapter
from alphalora.serving.engine.block_manager import BlockManager
from alphalora.serving.engine.step_inputs import build_step_batch, to_device


def _random_step(seed: int, block_size: int = 4, decode_only: bool = False):
    """Sequences with interleaved block tables (freed and reused blocks), each computing a chunk
    of new tokens at the end of its context; returns the batch, the block manager and the chunks."""
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks=200, block_size=block_size)
    adapters = [LoadedAdapter(f"a{i}", Path("."), {}) for i in range(3)]
    chunks = []  # (seq_id, first new position, new tokens, adapter)
    for seq_id in range(rng.randint(3, 9)):
        context = rng.randint(1, 40)
        blocks.allocate(seq_id, context)
        if rng.random() < 0.3:
            blocks.allocate(("gap", seq_id), rng.randint(1, 9))  # others' blocks in between
        count = 1 if decode_only or rng.random() < 0.6 else rng.randint(1, context)
        chunks.append((seq_id, context - count, count, rng.choice(adapters + [None])))
    for seq_id in range(0, len(chunks), 3):
        blocks.free(("gap", seq_id))
    token_ids = [rng.randint(0, 99) for _ in range(sum(c[2] for c in chunks))]
    batch = build_step_batch(token_ids, [c[1] for c in chunks], [c[2] for c in chunks],
                             [blocks.block_table(c[0]) for c in chunks], block_size, [c[3] for c in chunks],
                             [False] * len(chunks))
    return batch, blocks, chunks, token_ids


@pytest.mark.parametrize("seed", range(6))
def test_every_token_gets_the_block_managers_slot_and_position(seed):
    batch, blocks, chunks, token_ids = _random_step(seed)
    assert batch.input_ids.tolist() == token_ids
    row = 0
    for entry, (seq_id, first, count, adapter) in zip(batch.entries, chunks, strict=True):
        assert (entry.start, entry.count, entry.context_len, entry.adapter) == (row, count, first + count, adapter)
        context = batch.context_slots[entry.context_start:entry.context_start + entry.context_len].tolist()
        assert context == [blocks.slot(seq_id, p) for p in range(first + count)]
        assert batch.positions[row:row + count].tolist() == list(range(first, first + count))
        assert batch.new_slots[row:row + count].tolist() == context[first:]
        row += count


@pytest.mark.parametrize("seed,window", [(0, None), (1, None), (2, 5), (3, 7)])
def test_the_device_step_pads_decode_contexts_and_groups_adapter_rows(seed, window):
    batch, blocks, chunks, _ = _random_step(seed)
    windows = [window, None]  # a model mixing windowed and full layers gets both in one copy
    step = to_device(batch, "cpu", windows)
    decoding = [i for i, c in enumerate(chunks) if c[2] == 1]
    if len(decoding) < 2:
        assert step.decode is None
    else:
        decode = step.decode
        assert decode.entry_indices == set(decoding) and not decode.every_token
        for b, i in enumerate(decoding):
            entry, (seq_id, first, _, _) = batch.entries[i], chunks[i]
            n = first + 1
            assert decode.rows[b] == entry.start and decode.lengths[b] == n
            assert decode.slots[b, :n].tolist() == [blocks.slot(seq_id, p) for p in range(n)]
            for w in windows:
                assert decode.starts[w][b] == (max(0, n - w) if w else 0)
                allowed = decode.mask(w)[b, 0, 0].nonzero().flatten().tolist()
                assert allowed == list(range(int(decode.starts[w][b]), n))
    rows_by_adapter = {}
    for entry in batch.entries:
        if entry.adapter is not None:
            rows_by_adapter.setdefault(entry.adapter.uid, []).extend(range(entry.start, entry.start + entry.count))
    assert {a.uid: rows.tolist() for a, rows in step.adapter_rows} == rows_by_adapter
    assert step.last_rows.tolist() == [e.start + e.count - 1 for e in batch.entries]
    assert torch.equal(step.context_slots, torch.from_numpy(batch.context_slots))


def test_an_all_decode_batch_is_attended_in_row_order():
    batch, _, _, _ = _random_step(4, decode_only=True)
    step = to_device(batch, "cpu")
    assert step.decode.every_token and step.decode.rows.tolist() == list(range(len(batch.entries)))


@pytest.mark.parametrize("seed,window", [(0, None), (1, 6), (5, None), (7, 3)])
def test_prefill_groups_cover_every_other_token_with_its_causal_window(seed, window):
    batch, blocks, chunks, _ = _random_step(seed)
    windows = [None, window]
    step = to_device(batch, "cpu", windows)
    decoded = step.decode.entry_indices if step.decode is not None else set()
    expected_rows = sorted(row for i, e in enumerate(batch.entries) if i not in decoded
                           for row in range(e.start, e.start + e.count))
    assert sorted(row for g in step.prefills for row in g.kept_rows.tolist()) == expected_rows
    by_row = {}  # batch row -> (sequence, its position, its context length)
    for e, (seq_id, first, _, _) in zip(batch.entries, chunks, strict=True):
        for i in range(e.count):
            by_row[e.start + i] = (seq_id, first + i, e.context_len)
    for group in step.prefills:
        n, width = group.slots.shape
        assert all(len({by_row[r][0] for r in group.query_rows[b].tolist()}) == 1 for b in range(n))
        real_cells = sum(by_row[int(group.query_rows[b, 0])][2] for b in range(n))
        assert n == 1 or n * width <= 2 * real_cells  # padding at most doubles what is read
        flat_rows = group.query_rows.reshape(-1)
        for flat, row in zip(group.kept.tolist(), group.kept_rows.tolist(), strict=True):
            b, i = divmod(flat, group.query_rows.shape[1])
            assert flat_rows[flat] == row
            seq_id, position, _ = by_row[row]
            for w in windows:
                lo = max(0, position - w + 1) if w else 0
                assert group.mask(w)[b, 0, i].nonzero().flatten().tolist() == list(range(lo, position + 1))
            assert group.slots[b, :position + 1].tolist() == [blocks.slot(seq_id, p) for p in range(position + 1)]
