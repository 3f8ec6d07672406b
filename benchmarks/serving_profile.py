"""Where a serving decode step's time goes, one adapter against many: a diagnostic, not a claim.

The engine of `serving.py` on its workload, all requests prefilled, then steady decode steps
profiled with one adapter for every request against 16 distinct ones, plain LoRA and MoE-LoRA
(and the base model): wall time per step, the time the device was busy, kernels (device) or aten ops (CPU) per
step, host synchronisations per step and the ops that took the most time. The step is launch- or
host-bound where wall time is far above busy time; a synchronisation per step stalls the queue.

    python benchmarks/serving_profile.py --device cuda --dtype bf16 --json profile.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from bench_modules import load_benchmark  # beside this script, on the path when it runs

serving = load_benchmark("serving")
moe_lora_profile = load_benchmark("moe_lora_profile")


def decode_step(args, prompts, names, adapters: dict[str, str]):
    """One engine step at a time, after every request's prompt is in: the steady decode batch."""
    engine = serving.build_engine(args, adapters)
    params = serving.SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(p, params, n) for p, n in zip(prompts, names, strict=True)]
    while any(not s.output_ids for s in seqs):
        engine.step()
    return engine.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--batched-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(serving.DTYPES), default="fp32")
    parser.add_argument("--adapters", type=int, default=16, help="distinct adapters of the mixed row")
    parser.add_argument("--calls", type=int, default=8, help="profiled decode steps of each row")
    parser.add_argument("--top", type=int, default=12, help="ops listed per row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serving-profile-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    prompts = serving.workload(args)
    # No sequence may finish before the last profiled step, or the batch drains while it is measured: the first
    # sequences have a token after the first step, the last ones after every prompt is in (prefill steps), and then
    # come the warm-up, timed and profiled decode steps.
    prefill_steps = -(-sum(len(p) for p in prompts) // args.batched_tokens) + 1
    args.output = prefill_steps + 3 + 2 * args.calls + 2
    rows = {"base": ([None] * args.requests, {})}
    for kind, experts in (("lora", 1), ("moe", 4)):  # serving.py's plain LoRA and MoE-LoRA adapters
        dirs = {f"{kind}{i}": str(serving.make_adapter(args, work / f"{kind}{i}", experts, seed=i))
                for i in range(args.adapters)}
        rows[f"{kind}_1"] = ([f"{kind}0"] * args.requests, {f"{kind}0": dirs[f"{kind}0"]})
        rows[f"{kind}_{args.adapters}"] = ([f"{kind}{i % args.adapters}" for i in range(args.requests)], dirs)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": args.dtype, "requests": args.requests, "rows": {}}
    for name, (names, adapters) in rows.items():
        row = moe_lora_profile.profiled(decode_step(args, prompts, names, adapters), args.calls, args.device, args.top)
        report["rows"][name] = row
        moe_lora_profile.print_row(name, row, args.device, "decode step", ops=8)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
