"""Where a MoE-LoRA training step's time goes, next to plain LoRA's: a diagnostic, not a claim.

For the dense-masked layer (forward + backward) and for a whole training step of the small Llama of
`moe_lora.py` (plain LoRA r=8 against MoE-LoRA, 5 experts top-2), it prints wall time, the time the
device was busy, the number of kernels (device) or aten calls (CPU) per call, and the ops that took
the most time. Wall time far above busy time means launch-bound: fewer, larger kernels are the fix;
busy time near wall time means the kernels themselves are the cost.

    python benchmarks/moe_lora_profile.py --device cuda --dtype bf16 --json profile.json

`--adapter-first` and `--token-splits N` profile another product form of the fused functions (the `forms` stage of
gpu_checks.sh times them all; this shows where the winner's time goes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from bench_modules import load_benchmark  # beside this script, on the path when it runs
from torch import nn
from torch.profiler import ProfilerActivity, profile

from alphalora.adapters import MoELoRALinear, product_forms
from alphalora.adapters.product_forms import ProductForms

moe_lora_bench = load_benchmark("moe_lora")


def _inside_aten(event) -> bool:
    """Whether an aten op was called by another (on the CPU only the outermost ones are counted)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profiled(fn, calls: int, device: str, top: int) -> dict:
    """Per call: wall ms, device-busy ms, kernels (CUDA) or aten ops (CPU), host synchronisations with
    the device (a copy to or from pageable memory, `.item()`, ...); and the top ops by time."""
    for _ in range(3):
        fn()
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wall = moe_lora_bench.seconds_of_one_call(lambda: [fn() for _ in range(calls)], device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)
    else:
        kernels = [e for e in events if e.name.startswith("aten::") and not _inside_aten(e)]
        busy_us = sum(e.cpu_time_total for e in kernels)
    syncs = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and "Synchronize" in e.name)
    syncs -= 1 if cuda else 0  # (the harness's own synchronize after the calls, inside the profile)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time if cuda else e.cpu_time_total
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return {"wall_ms": wall / calls * 1e3, "busy_ms": busy_us / calls / 1e3, "kernels_per_call": len(kernels) / calls,
            "syncs_per_call": syncs / calls,
            "top": [{"name": n, "calls_per_call": c / calls, "ms_per_call": t / calls / 1e3} for n, (c, t) in ranked]}


def print_row(name: str, row: dict, device: str, per: str, ops: int = 6) -> None:
    """One profiled step: wall and busy time, kernels (or aten ops) and synchronisations, then its top ops."""
    unit = "kernels" if device.startswith("cuda") else "aten ops"
    print(f"{name:9s} wall {row['wall_ms']:8.2f} ms  busy {row['busy_ms']:8.2f} ms  {row['kernels_per_call']:6.0f} "
          f"{unit}  {row['syncs_per_call']:4.1f} syncs per {per}")
    for op in row["top"][:ops]:
        print(f"    {op['ms_per_call']:8.3f} ms  x{op['calls_per_call']:<5.0f} {op['name']}")


def layer_steps(args) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = nn.Linear(args.hidden, args.hidden, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    modules = {"base": base,
               "lora_r8": MoELoRALinear(base, 1, 1, args.rank, lora_alpha=2.0 * args.rank),
               "moe_lora": MoELoRALinear(base, args.experts, args.top_k, args.rank, lora_alpha=2.0 * args.rank)}
    return {name: moe_lora_bench.forward_backward(module, x) for name, module in modules.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--hidden", type=int, default=1024, help="the layer's width (4096 on a GPU)")
    parser.add_argument("--tokens", type=int, default=2048, help="the layer's tokens (8192 on a GPU)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--model-layers", type=int, default=4)
    parser.add_argument("--model-hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5, help="profiled calls of each step")
    parser.add_argument("--top", type=int, default=12, help="ops listed per step")
    parser.add_argument("--adapter-first", action="store_true",
                        help="profile the adapter_first product form (alphalora/adapters/product_forms.py)")
    parser.add_argument("--token-splits", type=int, default=1, help="profile this token_splits product form")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    product_forms.forms = ProductForms(args.adapter_first, args.token_splits)
    report = {"device": moe_lora_bench.device_name(args.device), "dtype": args.dtype,
              "forms": dataclasses.asdict(product_forms.forms)}
    model_steps = moe_lora_bench.training_steps(args, names=("lora_r8", "moe_lora"))
    for level, steps in (("layer", layer_steps(args)), ("model", model_steps)):
        report[level] = {name: profiled(fn, args.calls, args.device, args.top) for name, fn in steps.items()}
        print(f"\n== {level}")
        for name, row in report[level].items():
            print_row(name, row, args.device, "call")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
