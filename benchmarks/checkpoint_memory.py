"""Peak memory of analysing a whole LLaMA-7B-shaped checkpoint from disk, against loading it.

Writes (once, into --dir) a 7B-shaped Llama checkpoint as sharded bf16 safetensors with
heavy-tailed random weights (Student-t, 3 dof), then in the same run:
  - ours: `alphalora analyze DIR` in a child process (weights read tensor by tensor);
  - the peer: `AutoModelForCausalLM.from_pretrained(DIR)` in a child process, then every weight
    read once (safetensors are memory-mapped: untouched pages are not resident): the least any
    tool that walks a loaded model (WeightWatcher, say) holds while it analyses.
Each child's peak resident set (getrusage) and wall time are printed with the ratio.

    python benchmarks/checkpoint_memory.py --dir /tmp/llama7b-shaped --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARD_BYTES = 2 * 2**30


def heavy_tailed(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    normal = torch.randn(shape, generator=generator)
    chi2 = torch.randn((3, *shape), generator=generator).square().mean(0)
    return (normal / chi2.sqrt() / shape[1] ** 0.5).to(torch.bfloat16)


def write_checkpoint(folder: Path, layers: int) -> None:
    """A Llama-7B-shaped Hugging Face folder: config.json, shards and the shard index."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16")  # the defaults are LLaMA-7B's shapes
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        prefix = f"model.layers.{n}."
        shapes.update({prefix + f"self_attn.{p}_proj.weight": (h, h) for p in "qkvo"})
        shapes.update({prefix + "mlp.gate_proj.weight": (i, h), prefix + "mlp.up_proj.weight": (i, h),
                       prefix + "mlp.down_proj.weight": (h, i)})
        shapes.update({prefix + "input_layernorm.weight": (h,), prefix + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    shard, shard_bytes, shards, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        shards.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, shape in tqdm(shapes.items(), desc="writing the checkpoint", unit="tensor"):
        shard[name] = heavy_tailed(shape, generator) if len(shape) == 2 else torch.ones(shape, dtype=torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(t * 2 for s in shapes.values() for t in [torch.Size(s).numel()])
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)  # last: its presence marks a complete checkpoint


def run_child(code: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a fresh Python running `code`; the child reports its own peak."""
    report = "\nimport resource; print('peak-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = result.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("peak-rss-kib")))
    peak_kib = next(int(line.split()[1]) for line in lines if line.startswith("peak-rss-kib"))
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/llama7b-shaped", help="where the checkpoint is (written if absent)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--precision", choices=["fp32", "fp64"], default="fp32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        write_checkpoint(folder, args.layers)
    size_gib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    print(f"checkpoint: {folder} ({size_gib:.1f} GiB bf16, {args.layers} layers)")

    peer_s, peer_mib = run_child(
        "import torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.bfloat16); "
        "print(f'  read {sum(p.numel() for p in m.parameters() if p.float().abs().sum() >= 0) / 1e9:.2f}B weights')")
    print(f"peer, from_pretrained + every weight read once (bf16, no analysis): {peer_s:.0f} s, "
          f"peak RSS {peer_mib:.0f} MiB")
    ours_s, ours_mib = run_child(
        "import alphalora; "
        f"r = alphalora.analyze({str(folder)!r}, estimator='xmin_peak', precision={args.precision!r}, device='cpu'); "
        "print(f'  {len(r.matrices)} matrices, {len(r.layers)} layers, mean layer alpha '"
        "      f'{sum(l.alpha for l in r.layers) / len(r.layers):.3f}')")
    print(f"ours, analyze ({args.precision}): {ours_s:.0f} s, peak RSS {ours_mib:.0f} MiB")
    print(f"peak RSS peer / ours = {peer_mib / ours_mib:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "checkpoint_gib": size_gib, "layers": args.layers, "precision": args.precision,
            "ours_s": ours_s, "ours_peak_rss_mib": ours_mib, "peer_s": peer_s, "peer_peak_rss_mib": peer_mib,
            "peer_over_ours_rss": peer_mib / ours_mib, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
