"""A step's inputs: built for the whole batch on the host, copied to the device at once.

Per sequence a step needs its new tokens, their positions and the KV slots of its context (read
off its block table). Built as small tensors per sequence that was a handful of ops (on a GPU,
kernel launches and synchronising copies) per sequence per step. Here the engine fills numpy
arrays for the whole batch, and `to_device` moves everything the step reads - token ids,
positions, slots, each entry's last row, the padded slots and queries of the decode sequences and
of the prompt chunks - in one host-to-device copy, each a view of it. The adapters' rows stay on
the host: each bucket's routing layout is built from them there and copied once (`routing_layout`).
A model whose layers attend over different sliding windows (Gemma 2 and 3, Qwen2 with
`max_window_layers`) gets each window's first attended positions in the same copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import LoadedAdapter
from .upload import upload


@dataclass
class SequenceBatchEntry:
    """One sequence's part of a step: its new tokens sit at [start, start + count) of the batch and
    are the last `count` positions of its context, whose KV slots sit at [context_start,
    context_start + context_len) of the step's context slots."""

    start: int
    count: int
    context_start: int
    context_len: int
    adapter: LoadedAdapter | None
    all_logits: bool = False  # also return logits for every new token (prompt logprobs)


@dataclass
class StepBatch:
    """The step on the host: int64 arrays over the batch's tokens and contexts."""

    input_ids: np.ndarray  # [tokens]
    positions: np.ndarray  # [tokens]
    new_slots: np.ndarray  # [tokens] the KV slots the new tokens are written to
    context_slots: np.ndarray  # every entry's context slots (positions [0, context_len)), one after another
    entries: list[SequenceBatchEntry]


def build_step_batch(token_ids: list[int], firsts: list[int], counts: list[int], tables: list[list[int]],
                     block_size: int, adapters: list[LoadedAdapter | None], all_logits: list[bool]) -> StepBatch:
    """Sequence i computes `counts[i]` new tokens at positions firsts[i], firsts[i] + 1, ... with the
    block table tables[i]; its context is positions [0, firsts[i] + counts[i])."""
    counts_np = np.asarray(counts, dtype=np.int64)
    context_lens = np.asarray(firsts, dtype=np.int64) + counts_np
    context_starts = np.concatenate(([0], np.cumsum(context_lens)[:-1]))
    token_starts = np.concatenate(([0], np.cumsum(counts_np)[:-1]))
    table_lens = np.asarray([len(t) for t in tables], dtype=np.int64)
    table_starts = np.concatenate(([0], np.cumsum(table_lens)[:-1]))
    flat_tables = np.fromiter((block for table in tables for block in table), dtype=np.int64, count=table_lens.sum())
    position = np.arange(context_lens.sum(), dtype=np.int64) - np.repeat(context_starts, context_lens)
    context_slots = (flat_tables[np.repeat(table_starts, context_lens) + position // block_size] * block_size
                     + position % block_size)
    # The new tokens are each context's last `count` positions.
    new = (np.repeat(context_starts + context_lens - counts_np, counts_np)
           + np.arange(counts_np.sum(), dtype=np.int64) - np.repeat(token_starts, counts_np))
    entries = [SequenceBatchEntry(int(token_starts[i]), counts[i], int(context_starts[i]), int(context_lens[i]),
                                  adapters[i], all_logits[i]) for i in range(len(counts))]
    return StepBatch(np.asarray(token_ids, dtype=np.int64), position[new], context_slots[new], context_slots, entries)


Window = int | None  # a layer's sliding window (None: the whole context)


@dataclass
class DecodeBatch:
    """The step's one-token (decode) sequences, attended to together over padded slot rows."""

    entry_indices: set[int]
    rows: torch.Tensor  # [B] batch rows of the decode tokens
    slots: torch.Tensor  # [B, max context] KV slots, padded with each row's last slot
    lengths: torch.Tensor  # [B] context lengths (the new token included)
    starts: dict[Window, torch.Tensor]  # per window: [B] first attended position (0 without a window)
    every_token: bool  # the batch is all decode tokens, in row order: rows is arange(B)
    _masks: dict[Window, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, window: Window) -> torch.Tensor:
        """[B, 1, 1, max context]: the attended positions, starts[b] <= j < lengths[b] (built once a step)."""
        if window not in self._masks:
            positions = torch.arange(self.slots.shape[1], device=self.slots.device)
            self._masks[window] = ((positions >= self.starts[window][:, None])
                                   & (positions < self.lengths[:, None]))[:, None, None, :]
        return self._masks[window]


@dataclass
class PrefillGroup:
    """Sequences computing several new tokens (prompt chunks), attended to together: queries and
    contexts padded to the group's longest, the padding masked out and never written back."""

    query_rows: torch.Tensor  # [N, max new] batch rows of each sequence's new tokens (padding: its last)
    slots: torch.Tensor  # [N, max context] KV slots (padding: the sequence's last slot)
    query_positions: torch.Tensor  # [N, max new] positions of the new tokens (padding: 0)
    kept: torch.Tensor  # indices into the flattened [N * max new] queries that are real tokens
    kept_rows: torch.Tensor  # their batch rows
    first_attended: dict[Window, torch.Tensor]  # per window: [N, max new] first position each query sees
    _masks: dict[Window, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, window: Window) -> torch.Tensor:
        """[N, 1, max new, max context]: first_attended <= j <= query position (causal, windowed)."""
        if window not in self._masks:
            j = torch.arange(self.slots.shape[1], device=self.slots.device)
            self._masks[window] = ((j <= self.query_positions[:, :, None])
                                   & (j >= self.first_attended[window][:, :, None]))[:, None]
        return self._masks[window]


@dataclass
class DeviceStep:
    """The step on the device: views of one copy."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    new_slots: torch.Tensor
    context_slots: torch.Tensor
    last_rows: torch.Tensor  # each entry's last new token's batch row
    # each adapter in the step (by uid: the same set, the same order) with its tokens' rows (host)
    adapter_rows: list[tuple[LoadedAdapter, np.ndarray]]
    decode: DecodeBatch | None
    prefills: list[PrefillGroup]  # every entry not in `decode`, in groups of similar context length
    entries: list[SequenceBatchEntry]


def to_device(batch: StepBatch, device, windows: Sequence[Window] = (None,)) -> DeviceStep:
    """The step on `device`, with first attended positions for each of the model's `windows`."""
    windows = list(dict.fromkeys(windows))
    entries = batch.entries
    arrays = {"input_ids": batch.input_ids, "positions": batch.positions, "new_slots": batch.new_slots,
              "context_slots": batch.context_slots,
              "last_rows": np.asarray([e.start + e.count - 1 for e in entries], dtype=np.int64)}
    adapters: dict[int, tuple[LoadedAdapter, list[np.ndarray]]] = {}
    for entry in entries:
        if entry.adapter is not None:
            adapters.setdefault(entry.adapter.uid, (entry.adapter, []))[1].append(
                np.arange(entry.start, entry.start + entry.count, dtype=np.int64))
    decoding = [i for i, e in enumerate(entries) if e.count == 1]
    if len(decoding) >= 2:
        arrays.update(_decode_arrays(batch, decoding, windows))
    else:
        decoding = []
    taken = set(decoding)
    groups = _prefill_groups([e for i, e in enumerate(entries) if i not in taken])
    for g, group in enumerate(groups):
        arrays.update({f"prefill{g}_{k}": v for k, v in _prefill_arrays(batch, group, windows).items()})
    views = upload(arrays, device)
    decode = None
    if decoding:
        decode = DecodeBatch(set(decoding), views["decode_rows"], views["decode_slots"], views["decode_lengths"],
                             {w: views[f"decode_starts_{w}"] for w in windows},
                             every_token=len(decoding) == batch.input_ids.size)
    fields = ("query_rows", "slots", "query_positions", "kept", "kept_rows")
    prefills = [PrefillGroup(*(views[f"prefill{g}_{name}"] for name in fields),
                             {w: views[f"prefill{g}_first_attended_{w}"] for w in windows})
                for g in range(len(groups))]
    adapter_rows = [(adapter, np.concatenate(spans)) for _, (adapter, spans) in sorted(adapters.items())]
    return DeviceStep(views["input_ids"], views["positions"], views["new_slots"], views["context_slots"],
                      views["last_rows"], adapter_rows, decode, prefills, entries)


def _prefill_groups(entries: list[SequenceBatchEntry]) -> list[list[SequenceBatchEntry]]:
    """Entries by context length, longest first, each group padding to at most twice the key/value
    cells it really reads (one long prompt beside short ones is not padded to)."""
    groups: list[list[SequenceBatchEntry]] = []
    real = 0
    for entry in sorted(entries, key=lambda e: -e.context_len):
        if groups and (len(groups[-1]) + 1) * groups[-1][0].context_len <= 2 * (real + entry.context_len):
            groups[-1].append(entry)
            real += entry.context_len
        else:
            groups.append([entry])
            real = entry.context_len
    return groups


def _prefill_arrays(batch: StepBatch, group: list[SequenceBatchEntry],
                    windows: list[Window]) -> dict[str, np.ndarray]:
    counts = np.asarray([e.count for e in group], dtype=np.int64)
    lengths = np.asarray([e.context_len for e in group], dtype=np.int64)
    starts = np.asarray([e.start for e in group], dtype=np.int64)
    column = np.arange(counts.max(), dtype=np.int64)
    real = column[None, :] < counts[:, None]
    query_rows = starts[:, None] + np.minimum(column[None, :], counts[:, None] - 1)
    # Query i of a sequence is its context position length - count + i; padding attends position 0 only.
    query_positions = np.where(real, (lengths - counts)[:, None] + column[None, :], 0)
    context_starts = np.asarray([e.context_start for e in group], dtype=np.int64)
    key_column = np.arange(lengths.max(), dtype=np.int64)
    slots = batch.context_slots[context_starts[:, None] + np.minimum(key_column[None, :], lengths[:, None] - 1)]
    kept = np.flatnonzero(real.ravel())
    arrays = {"query_rows": query_rows, "slots": slots, "query_positions": query_positions, "kept": kept,
              "kept_rows": query_rows.ravel()[kept]}
    for window in windows:
        first = np.maximum(0, query_positions - window + 1) if window else np.zeros_like(query_positions)
        arrays[f"first_attended_{window}"] = np.where(real, first, 0)
    return arrays


def _decode_arrays(batch: StepBatch, decoding: list[int], windows: list[Window]) -> dict[str, np.ndarray]:
    """Each decode sequence's context slots padded to the longest (with its own last slot: masked)."""
    chosen = [batch.entries[i] for i in decoding]
    lengths = np.asarray([e.context_len for e in chosen], dtype=np.int64)
    starts = np.asarray([e.context_start for e in chosen], dtype=np.int64)
    column = np.arange(lengths.max(), dtype=np.int64)
    slots = batch.context_slots[starts[:, None] + np.minimum(column[None, :], lengths[:, None] - 1)]
    arrays = {"decode_rows": np.asarray([e.start for e in chosen], dtype=np.int64), "decode_slots": slots,
              "decode_lengths": lengths}
    for window in windows:  # the one new token sits at position n - 1; a window keeps the last `window` positions
        arrays[f"decode_starts_{window}"] = np.maximum(0, lengths - window) if window else np.zeros_like(lengths)
    return arrays
