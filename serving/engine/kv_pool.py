"""How many KV-cache blocks the engine preallocates when it is not told.

The default is room for `max_num_seqs` sequences of the full context. For a long-context model served
without `--max-model-len` (128k positions, 32 sequences) that is hundreds of GiB, and the allocation would
fail, or on the CPU swap the machine to a halt, before anything is served. vLLM sizes its pool from the
memory the device has; here the default is capped the same way: to a share of the memory free once the
weights are loaded. Too little for even one full-length sequence is refused with the context that fits.
"""

from __future__ import annotations

import logging
import math
import os

import torch

logger = logging.getLogger("alphalora.serving")

GPU_SHARE = 0.9  # of the free device memory, the rest left to activations (vLLM's gpu_memory_utilization)
CPU_SHARE = 0.5  # of the available host memory: the step's activations and the server share the rest


def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of `block_size` tokens in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * head_dim * dtype.itemsize


def free_memory(device: str | torch.device) -> int | None:
    """Bytes free for the pool on `device`; None where that cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
        return pages * os.sysconf("SC_PAGE_SIZE") if pages else None


def default_num_blocks(config, max_model_len: int, block_size: int, max_num_seqs: int, dtype: torch.dtype,
                       device: str | torch.device, free: int | None = None) -> int:
    """`max_num_seqs` full-length sequences' blocks, or as many as fit in the device's share of free memory
    (with a warning); ValueError where not even one full-length sequence fits."""
    per_sequence = math.ceil(max_model_len / block_size)
    wanted = per_sequence * max(1, max_num_seqs)
    free = free_memory(device) if free is None else free
    if free is None:
        return wanted
    share = GPU_SHARE if torch.device(device).type == "cuda" else CPU_SHARE
    block_bytes = bytes_per_block(config, block_size, dtype)
    fitting = int(free * share) // block_bytes
    if fitting >= wanted:
        return wanted
    gib = 2**30
    if fitting < per_sequence:
        tokens = fitting * block_size
        raise ValueError(f"the KV cache for one {max_model_len}-token sequence needs "
                         f"{per_sequence * block_bytes / gib:.1f} GiB, more than the {free * share / gib:.1f} GiB "
                         f"this {torch.device(device).type} can give it ({share:.0%} of {free / gib:.1f} GiB free): "
                         f"pass --max-model-len {tokens} or less")
    logger.warning("KV cache: %d blocks (%d sequences of the full %d tokens at once, not --max-num-seqs %d) fit in "
                   "%.1f GiB (%.0f%% of the %.1f GiB free); pass --max-model-len to serve more sequences at once",
                   fitting, fitting // per_sequence, max_model_len, max_num_seqs, free * share / gib, share * 100,
                   free / gib)
    return fitting
