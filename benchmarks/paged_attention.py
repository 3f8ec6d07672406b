"""Decode attention over the paged KV cache: our kernel against the gather-then-attention path, in one run.

The peer is what the serving engine ran on a GPU before the CUDA kernel (and still runs for Gemma 2's soft cap):
each sequence's context gathered from the cache into a padded [batch, kv heads, longest context, head_dim] copy,
a mask of the attended positions, then torch's scaled_dot_product_attention with grouped-query heads. Ours reads
the keys and values in place (`alphalora.ops.paged_decode_attention`). Both are checked equal first. Per layer
call: milliseconds, and the bytes of keys and values each must read at the least, at the copy bandwidth measured
in the same run (the roofline column).

    python benchmarks/paged_attention.py --device cuda --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from bench_modules import load_benchmark  # beside this script, on the path when it runs

from alphalora import ops

moe_lora_bench = load_benchmark("moe_lora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decode_inputs(args, dtype: torch.dtype):
    """A decode step's attention inputs: contexts of U[min, max] tokens in a shuffled cache of 16-token blocks."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_context, args.max_context + 1, (args.sequences,), generator=g)
    block = 16
    blocks_per_row = -(-lengths // block)
    order = torch.randperm(int(blocks_per_row.sum()), generator=g)  # blocks scattered over the pool
    slots = torch.zeros(args.sequences, int(lengths.max()), dtype=torch.long)
    taken = 0
    for row, (length, count) in enumerate(zip(lengths.tolist(), blocks_per_row.tolist(), strict=True)):
        mine = order[taken:taken + count]
        taken += count
        positions = torch.arange(length)
        slots[row, :length] = mine[positions // block] * block + positions % block
    cache = int(blocks_per_row.sum()) * block
    q = torch.randn(args.sequences, args.heads, args.head_dim, generator=g)
    k_cache = torch.randn(cache, args.kv_heads, args.head_dim, generator=g)
    v_cache = torch.randn(cache, args.kv_heads, args.head_dim, generator=g)
    starts = torch.zeros_like(lengths)
    return tuple(t.to(args.device, dtype) if t.is_floating_point() else t.to(args.device)
                 for t in (q, k_cache, v_cache, slots, lengths, starts))


def gathered_attention(q, k_cache, v_cache, slots, lengths, starts, scale):
    """The peer: a padded gather of every context, a mask, then SDPA (grouped-query heads)."""
    batch, width = slots.shape
    keys, values = (cache.index_select(0, slots.reshape(-1)).view(batch, width, cache.shape[1], -1).transpose(1, 2)
                    for cache in (k_cache, v_cache))
    positions = torch.arange(width, device=slots.device)
    mask = ((positions >= starts[:, None]) & (positions < lengths[:, None]))[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    return out[:, :, 0, :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--min-context", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    inputs = decode_inputs(args, dtype)
    scale = args.head_dim ** -0.5
    ours, peer = ops.paged_decode_attention(*inputs, scale), gathered_attention(*inputs, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), peer.float(), rtol=tol, atol=tol)  # the same attention
    seconds = {name: moe_lora_bench.per_call_seconds(lambda fn=fn: fn(*inputs, scale), args.repeats, args.device)
               for name, fn in (("ours", ops.paged_decode_attention), ("gather_sdpa", gathered_attention))}
    bandwidth = moe_lora_bench.copy_bandwidth(args.device, dtype, args.repeats)
    lengths = inputs[4]
    least = 2 * int(lengths.sum()) * args.kv_heads * args.head_dim * dtype.itemsize  # keys and values, once
    rows = {name: {"ms": s * 1e3, "roofline_fraction": least / bandwidth / s} for name, s in seconds.items()}
    print(f"{args.device} {args.dtype}: {args.sequences} sequences, contexts U[{args.min_context}, "
          f"{args.max_context}] ({int(lengths.sum())} tokens), {args.heads} heads / {args.kv_heads} kv heads x "
          f"{args.head_dim}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for name, row in rows.items():
        print(f"  {name:12s} {row['ms']:8.3f} ms  {row['roofline_fraction']:6.1%} of the roofline")
    speedup = seconds["gather_sdpa"] / seconds["ours"]
    print(f"  gather + SDPA / ours = {speedup:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:  # (the settings first: the device's name replaces "cuda")
            json.dump({**vars(args), "device": moe_lora_bench.device_name(args.device), "torch": torch.__version__,
                       "least_bytes": least, "rows": rows, "gather_sdpa_over_ours": speedup}, handle, indent=2)


if __name__ == "__main__":
    main()
