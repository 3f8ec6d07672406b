"""Decode attention over the paged KV cache (the serving engine's): typed wrapper and fake kernel.

The CPU and CUDA kernels read keys and values where the block table put them: no gathered copy of the
context, no mask, one call per layer. The CUDA kernel takes head_dim up to 256; where a value the CPU
refuses (a slot outside the cache, lengths beyond the slots) reaches it, its row comes out NaN, as
checking would read the values back every layer.
"""

from __future__ import annotations

import torch

from . import _library  # noqa: F401  (defines the op, or loads the library that does, first)


@torch.library.register_fake("alphalora::paged_decode_attention")
def _paged_decode_attention_fake(q, k_cache, v_cache, slots, lengths, starts, scale):
    return torch.empty_like(q)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                           lengths: torch.Tensor, starts: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token per row over its cached context.

    q [B, H, D]; k_cache, v_cache [S, Hkv, D] (H a multiple of Hkv: grouped-query attention);
    slots [B, W]: row b's context positions 0..W-1 as cache slots (padding beyond lengths[b] is
    never read); row b attends positions starts[b] .. lengths[b]-1 (a sliding window starts
    later than 0). Returns [B, H, D] in q's dtype.
    """
    return torch.ops.alphalora.paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, float(scale))
