"""Prefix caching on a shared-system-prompt workload: the engine with and without it, and vLLM with
its automatic prefix caching, on the same requests in one run.

Workload (fixed seed): each of --adapters plain LoRA adapters (a tenant) has its own system prompt
of --system tokens; each request is its tenant's system prompt and a user turn of U[16, 64] tokens,
with --output tokens out, all submitted at once. Without the cache every request computes its
system prompt again; with it, the first request of each tenant computes it and the rest read its
KV blocks (the engine's and vLLM's caches are keyed by adapter, so tenants do not share). Each
engine starts with an empty cache.

    python benchmarks/prefix_cache.py --json out.json
    python benchmarks/prefix_cache.py --vllm-python .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
from bench_modules import load_benchmark  # beside this script, on the path when it runs

serving_bench = load_benchmark("serving")


def shared_prefix_workload(args) -> tuple[list[list[int]], list[str]]:
    g = torch.Generator().manual_seed(4321)
    systems = [torch.randint(10, 4000, (args.system,), generator=g).tolist() for _ in range(args.adapters)]
    prompts, names = [], []
    for i in range(args.requests):
        tenant = i % args.adapters
        user = torch.randint(10, 4000, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g).tolist()
        prompts.append(systems[tenant] + user)
        names.append(f"lora{tenant}")
    return prompts, names


def _row(label: str, result: dict) -> str:
    hit = (f", {result['prefix_hit_tokens'] / result['prompt_tokens']:.0%} of prompt tokens from the cache"
           if "prefix_hit_tokens" in result else "")
    return (f"{label:22s} {result['output_tok_s']:8.1f} tok/s  TTFT p50/p99 {result['ttft_p50']:.2f}/"
            f"{result.get('ttft_p99', float('nan')):.2f} s  in {result['seconds']:.1f} s{hit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4, help="tenants, each with its adapter and system prompt")
    parser.add_argument("--system", type=int, default=256, help="system prompt tokens")
    parser.add_argument("--output", type=int, default=16)
    parser.add_argument("--batched-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(serving_bench.DTYPES), default="fp32")
    parser.add_argument("--vllm-python", default=None, help="python of a vLLM environment: vLLM as the peer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    prompts, names = shared_prefix_workload(args)
    dirs = {f"lora{i}": serving_bench.make_adapter(args, work / f"lora{i}", 1, seed=i) for i in range(args.adapters)}
    adapters = {n: str(p) for n, p in dirs.items()}
    serving_bench.run_engine(args, prompts, names, adapters)  # warm-up: first calls, every context length
    cached = serving_bench.run_engine(args, prompts, names, adapters)
    uncached = serving_bench.run_engine(args, prompts, names, adapters, prefix_caching=False)
    print(f"{args.requests} requests over {args.adapters} adapters, system prompt {args.system} tokens, "
          f"Llama {args.layers} layers hidden {args.hidden}, {args.dtype} on {args.device}")
    print(_row("ours, prefix caching", cached))
    print(_row("ours, no caching", uncached))
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "workload": {"requests": args.requests, "adapters": args.adapters, "system": args.system,
                     "user": "U[16,64]", "output": args.output, "model": f"Llama {args.layers}x{args.hidden}"},
        "cached": cached, "uncached": uncached,
        "cached_over_uncached": cached["output_tok_s"] / uncached["output_tok_s"],
        "ttft_p50_uncached_over_cached": uncached["ttft_p50"] / cached["ttft_p50"],
    }
    print(f"throughput with / without the cache {summary['cached_over_uncached']:.2f}x, "
          f"TTFT p50 without / with {summary['ttft_p50_uncached_over_cached']:.2f}x")
    if args.vllm_python:
        peft_dirs = {n: p.with_name(p.name + "-peft") for n, p in dirs.items()}
        vllm = serving_bench.run_vllm(args, work, prompts, names, peft_dirs)
        vllm_uncached = serving_bench.run_vllm(args, work, prompts, names, peft_dirs, prefix_caching=False)
        if vllm and vllm_uncached:
            summary.update(vllm=vllm, vllm_uncached=vllm_uncached,
                           over_vllm=cached["output_tok_s"] / vllm["output_tok_s"],
                           vllm_cached_over_uncached=vllm["output_tok_s"] / vllm_uncached["output_tok_s"])
            print(_row("vLLM, prefix caching", vllm))
            print(_row("vLLM, no caching", vllm_uncached))
            print(f"ours / vLLM, both caching: {summary['over_vllm']:.2f}x; vLLM with / without its cache "
                  f"{summary['vllm_cached_over_uncached']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
