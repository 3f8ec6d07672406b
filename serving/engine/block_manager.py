"""The paged KV cache's bookkeeping: a pool of fixed-size blocks and a block table per sequence.

Plain Python, no tensors: the model runner owns the KV tensors ([num_blocks, block_size, ...])
and asks this class which block and slot each token goes to.
"""

from __future__ import annotations

from collections.abc import Hashable


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than the operation needs (the scheduler checks first)."""


class BlockManager:
    """Allocates KV blocks to sequences and frees them when sequences finish or are cancelled."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Blocks kept back from new admissions so running sequences can still grow.
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._lengths[seq_id]

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of num_tokens fits while keeping the watermark free."""
        return self.blocks_for(num_tokens) <= self.num_free_blocks - self.watermark_blocks

    def can_grow(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        needed = self.blocks_for(self._lengths[seq_id] + num_new_tokens) - len(self._tables[seq_id])
        return needed <= self.num_free_blocks

    def slot(self, seq_id: Hashable, position: int) -> int:
        """The flat KV slot (block * block_size + offset) of the token at `position`."""
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # -- changes ---------------------------------------------------------------------------------
    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Reserves blocks for a new sequence's first num_tokens tokens."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0
        self.grow(seq_id, num_tokens)
        return self.block_table(seq_id)

    def grow(self, seq_id: Hashable, num_new_tokens: int) -> list[int]:
        """Makes room for num_new_tokens more tokens; returns the blocks added."""
        table = self._tables[seq_id]
        needed = self.blocks_for(self._lengths[seq_id] + num_new_tokens) - len(table)
        if needed > len(self._free):
            raise OutOfBlocksError(f"sequence {seq_id!r} needs {needed} blocks, {len(self._free)} are free")
        added = [self._free.pop() for _ in range(max(0, needed))]
        table.extend(added)
        self._lengths[seq_id] += num_new_tokens
        return added

    def free(self, seq_id: Hashable) -> int:
        """Returns a sequence's blocks to the pool (finished, cancelled or preempted); count freed."""
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table is None:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    def check_invariants(self) -> None:
        """Every block is either free or owned by exactly one sequence (for tests and debugging)."""
        owned = [b for table in self._tables.values() for b in table]
        if len(owned) != len(set(owned)) or set(owned) & set(self._free):
            raise AssertionError("a block is owned twice or both owned and free")
        if len(owned) + len(self._free) != self.num_blocks:
            raise AssertionError(f"leak: {self.num_blocks - len(owned) - len(self._free)} blocks unaccounted for")
        for seq_id, table in self._tables.items():
            if len(table) != self.blocks_for(self._lengths[seq_id]):
                raise AssertionError(
                    f"sequence {seq_id!r} holds {len(table)} blocks for {self._lengths[seq_id]} tokens")
