"""Content hashes of a sequence's full KV blocks, for prefix caching.

Block i's hash covers its tokens and, through the previous block's hash, every token before it,
and the first block's covers the adapter: two sequences share block i only if they agree on
everything that went into its keys and values. A cryptographic hash (BLAKE2b, 128 bits), not
Python's `hash`: requests come from many clients, and a collision would hand one of them another's
cache.
"""

from __future__ import annotations

import hashlib

import numpy as np


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, salt: str) -> list[bytes]:
    """Appends to `hashes` (the hashes of the first len(hashes) blocks) those of the further full
    blocks of token_ids; returns it. `salt` names what else shapes the cache (the adapter)."""
    previous = hashes[-1] if hashes else hashlib.blake2b(salt.encode(), digest_size=16).digest()
    for index in range(len(hashes), len(token_ids) // block_size):
        block = np.asarray(token_ids[index * block_size:(index + 1) * block_size], dtype=np.int64)
        previous = hashlib.blake2b(previous + block.tobytes(), digest_size=16).digest()
        hashes.append(previous)
    return hashes
