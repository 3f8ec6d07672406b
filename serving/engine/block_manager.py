"""The paged KV cache's bookkeeping: a pool of fixed-size blocks and a block table per sequence.

Plain Python, no tensors: the model runner owns the KV tensors ([num_blocks, block_size, ...])
and asks this class which block and slot each token goes to.

Prefix caching (vLLM's automatic prefix caching): a full block whose keys and values are computed
can be registered under the hash of its content (its tokens, every token before it and the
adapter: `prefix_cache.py`). A later sequence whose prompt starts with the same blocks takes them
into its own table instead of computing them again; a block is then held by several sequences
(reference counted) and only read, since a sequence writes only past its computed prefix. A
registered block that no sequence holds stays cached but counts as free: it is handed out again,
least recently freed first, only when no never-cached block is left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than the operation needs (the scheduler checks first)."""


class BlockManager:
    """Allocates KV blocks to sequences, shares cached prefix blocks, frees blocks when sequences
    finish or are cancelled."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Blocks kept back from new admissions so running sequences can still grow.
        self.watermark_blocks = int(watermark * num_blocks)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by no sequence; oldest first
        self._refs = [0] * num_blocks  # sequences holding each block
        self._hash_of: dict[int, Hashable] = {}  # registered block -> content hash
        self._block_of: dict[Hashable, int] = {}  # content hash -> registered block
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can be given: never-cached ones and cached ones no sequence holds."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """The share of the pool held by sequences (cached blocks no sequence holds count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._lengths[seq_id]

    def num_holders(self, block: int) -> int:
        """How many sequences hold the block (more than one: a shared cached prefix, only read)."""
        return self._refs[block]

    def cached_prefix(self, hashes: Sequence[Hashable]) -> list[int]:
        """The registered blocks of the longest run of `hashes` (a sequence's block hashes in order)."""
        blocks = []
        for content in hashes:
            block = self._block_of.get(content)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = (), keep_watermark: bool = True) -> bool:
        """Whether a new sequence fits while keeping the watermark free: `prefix` cached blocks taken
        as they are (those no sequence holds leave the free pool) and room for num_tokens more. The
        watermark is kept for running sequences to grow into: with none running (keep_watermark
        False) a sequence may take the whole pool, or one that needs it would never run."""
        new = self.blocks_for(len(prefix) * self.block_size + num_tokens) - len(prefix)
        idle = sum(1 for block in prefix if self._refs[block] == 0)
        return new + idle <= self.num_free_blocks - (self.watermark_blocks if keep_watermark else 0)

    def can_grow(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        needed = self.blocks_for(self._lengths[seq_id] + num_new_tokens) - len(self._tables[seq_id])
        return needed <= self.num_free_blocks

    def slot(self, seq_id: Hashable, position: int) -> int:
        """The flat KV slot (block * block_size + offset) of the token at `position`."""
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # -- changes ---------------------------------------------------------------------------------
    def allocate(self, seq_id: Hashable, num_tokens: int, prefix: Sequence[int] = ()) -> list[int]:
        """Gives a new sequence the cached `prefix` blocks (from `cached_prefix`) and room for its next
        num_tokens tokens after them."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        for block in prefix:
            if block not in self._hash_of:
                raise ValueError(f"block {block} holds no cached prefix")
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self._tables[seq_id] = list(prefix)
        self._lengths[seq_id] = len(prefix) * self.block_size
        self.grow(seq_id, num_tokens)
        return self.block_table(seq_id)

    def grow(self, seq_id: Hashable, num_new_tokens: int) -> list[int]:
        """Makes room for num_new_tokens more tokens; returns the blocks added."""
        table = self._tables[seq_id]
        needed = self.blocks_for(self._lengths[seq_id] + num_new_tokens) - len(table)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(f"sequence {seq_id!r} needs {needed} blocks, {self.num_free_blocks} are free")
        added = [self._take_free_block() for _ in range(max(0, needed))]
        table.extend(added)
        self._lengths[seq_id] += num_new_tokens
        return added

    def register(self, seq_id: Hashable, index: int, content: Hashable) -> None:
        """Records that block `index` of the sequence's table is full and computed, with this content
        hash, so later sequences can share it. A content already cached in another block keeps that one."""
        block = self._tables[seq_id][index]
        if content in self._block_of or block in self._hash_of:
            return
        self._block_of[content] = block
        self._hash_of[block] = content

    def free(self, seq_id: Hashable) -> int:
        """Drops a sequence's hold on its blocks (finished, cancelled or preempted); count released.
        Blocks no sequence holds go back to the pool, the cached ones as the last to be reused, a
        sequence's later blocks before its earlier ones (a prefix is worth more than its tail)."""
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table is None:
            return 0
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        return len(table)

    def _take_free_block(self) -> int:
        """A never-cached block if there is one, else the cached block freed longest ago (uncached)."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def check_invariants(self) -> None:
        """Each block is free, cached and idle, or held by as many sequences as list it (for tests)."""
        held: dict[int, int] = {}
        for table in self._tables.values():
            for block in table:
                held[block] = held.get(block, 0) + 1
        for block in range(self.num_blocks):
            if self._refs[block] != held.get(block, 0):
                raise AssertionError(f"block {block} counts {self._refs[block]} holders, {held.get(block, 0)} hold it")
        free, idle = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & idle or (free | idle) & set(held):
            raise AssertionError("a block is both free and held, or listed twice")
        if len(free) + len(idle) + len(held) != self.num_blocks:
            raise AssertionError(f"leak: {self.num_blocks - len(free) - len(idle) - len(held)} blocks unaccounted for")
        if free & set(self._hash_of) or not idle <= set(self._hash_of):
            raise AssertionError("a never-cached free block has a hash, or an idle cached block has none")
        if {b: h for h, b in self._block_of.items()} != self._hash_of:
            raise AssertionError("the hash -> block and block -> hash maps disagree")
        for seq_id, table in self._tables.items():
            if len(table) != self.blocks_for(self._lengths[seq_id]):
                raise AssertionError(
                    f"sequence {seq_id!r} holds {len(table)} blocks for {self._lengths[seq_id]} tokens")
