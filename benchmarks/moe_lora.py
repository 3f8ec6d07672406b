"""MoE-LoRA layer and training-step speed against the MoLA-style loop, measured in one run.

Layer level (forward + backward, frozen base): the base linear alone, a MoLA-style Python loop
over experts (gather, per-expert LoRA, index_add; how the MoLA and AlphaLoRA code do it), and
ours. adapter_overhead_ratio = (ours - base) / (loop - base): the share of the loop's adapter
cost that ours still pays.

Model level: training steps of a small Llama with MoE-LoRA on all 7 projections (5 experts per
layer, i.e. 160 scaled from 32 layers, top-2, rank 8), the same with the loop, and plain LoRA r=8.

    python benchmarks/moe_lora.py --json out.json
    python benchmarks/moe_lora.py --device cuda --hidden 4096 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import types

import torch
from torch import nn

from alphalora.adapters import MoELoRALinear, adapter_parameters, inject_adapters, product_forms
from alphalora.adapters.product_forms import ProductForms
from alphalora.allocation import Plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device (what a result was measured on), else the device as given."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def seconds_of_one_call(fn, device: str) -> float:
    """Wall seconds of fn(), GPU work included."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = sorted(seconds_of_one_call(fn, device) for _ in range(repeats))
    return times[len(times) // 2]


def per_call_seconds(fn, repeats: int, device: str, calls: int = 20) -> float:
    """Median over `repeats` of the mean seconds of `calls` back-to-back calls: the host runs ahead of the
    device as in a model's forward over many layers, so launch gaps are amortised (device throughput)."""
    def batch():
        for _ in range(calls):
            fn()
    return timed(batch, repeats, device) / calls


def copy_bandwidth(device: str, dtype: torch.dtype, repeats: int) -> float:
    """Measured memory bandwidth in bytes/s (read + write) of a large device-to-device copy."""
    source = torch.empty(256 * 2**20 // dtype.itemsize, device=device, dtype=dtype).normal_()
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), repeats, device)
    return 2 * source.numel() * dtype.itemsize / seconds


def adapter_min_bytes(tokens: int, width_in: int, width_out: int, dtype: torch.dtype) -> int:
    """The least memory traffic of the adapter part of a forward + backward, weights and the
    [T, k*r] bottleneck neglected: forward reads x and updates the output (read + write);
    backward reads the output gradient and x again and updates x's gradient (read + write)."""
    return (tokens * (4 * width_in + 3 * width_out)) * dtype.itemsize


def mola_style_forward(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter computed the way MoLA's `Linear_MoE.forward` (and so AlphaLoRA) does it: a
    one-hot expert mask, then per expert torch.where, index lists converted with .tolist(),
    list-indexed gathers, the expert's own dropout call, and index_add_ into a buffer."""
    result = layer.base(x)
    x2 = x.reshape(-1, layer.in_features)
    # (float32 adapter weights over a bfloat16 base compute in bfloat16, as ours and autocast do)
    router, lora_A, lora_B = (w.to(x2.dtype) for w in (layer.router.weight, layer.lora_A, layer.lora_B))
    logits = torch.nn.functional.linear(x2, router)
    weights = torch.softmax(logits, dim=1, dtype=torch.float)
    weights, selected = torch.topk(weights, layer.top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x2.dtype)
    mask = torch.nn.functional.one_hot(selected, num_classes=layer.num_experts).permute(2, 1, 0)
    final = torch.zeros(x2.shape[0], layer.out_features, dtype=x2.dtype, device=x2.device)
    for e in range(layer.num_experts):
        slot, rows = torch.where(mask[e])
        if rows.shape[0] == 0:
            continue
        rows_list, slot_list = rows.tolist(), slot.tolist()
        state = x2[None, rows_list].reshape(-1, layer.in_features)
        out = torch.nn.functional.linear(torch.nn.functional.linear(layer.dropout(state), lora_A[e]),
                                         lora_B[e]) * layer.scaling
        final.index_add_(0, rows, out * weights[rows_list, slot_list, None])
    return result + final.reshape(*x.shape[:-1], layer.out_features)


def use_loop(module: MoELoRALinear) -> None:
    """Makes one layer compute its adapter the MoLA way."""
    module.forward = types.MethodType(mola_style_forward, module)


def forward_backward(module: nn.Module, x: torch.Tensor):
    """One call of it: the module's forward and backward on x (x's gradient included)."""
    def run():
        x.grad = None
        module(x).float().square().mean().backward()
    return run


def benchmark_layer(args) -> tuple[nn.Linear, MoELoRALinear, torch.Tensor]:
    """The frozen base linear, our MoE-LoRA layer over it (B drawn, so the experts matter) and its input."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    base = nn.Linear(args.hidden, args.hidden, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    layer = MoELoRALinear(base, args.experts, args.top_k, args.rank, lora_alpha=2.0 * args.rank)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    return base, layer, x


def roofline_fraction(args, adapter_seconds: float, bandwidth: float) -> float:
    """The adapter part's least traffic at the measured copy bandwidth (bytes/s), over the time it took."""
    least = adapter_min_bytes(args.tokens, args.hidden, args.hidden, DTYPES[args.dtype])
    return least / bandwidth / max(adapter_seconds, 1e-12)


def layer_benchmark(args) -> dict:
    base, layer, x = benchmark_layer(args)
    loop = MoELoRALinear(base, args.experts, args.top_k, args.rank, lora_alpha=2.0 * args.rank)
    loop.load_state_dict(layer.state_dict())
    use_loop(loop)
    torch.testing.assert_close(layer(x), loop(x), rtol=2e-2, atol=2e-2)  # the same function
    results = {name: timed(forward_backward(module, x), args.repeats, args.device)
               for name, module in [("base", base), ("loop", loop), ("ours", layer)]}
    results["adapter_overhead_ratio"] = (results["ours"] - results["base"]) / (results["loop"] - results["base"])
    # Roofline of the adapter part alone: the time its least traffic takes at the measured
    # copy bandwidth, over the time it adds to the base linear.
    results["copy_bandwidth_gb_s"] = copy_bandwidth(args.device, DTYPES[args.dtype], args.repeats) / 1e9
    results["adapter_min_bytes"] = adapter_min_bytes(args.tokens, args.hidden, args.hidden, DTYPES[args.dtype])
    results["adapter_roofline_fraction"] = roofline_fraction(args, results["ours"] - results["base"],
                                                             results["copy_bandwidth_gb_s"] * 1e9)
    # The same back to back, as inside a model (see forms_benchmark): without one call's launch latency.
    queued = {name: per_call_seconds(forward_backward(module, x), args.repeats, args.device, calls=10)
              for name, module in [("base", base), ("ours", layer)]}
    results["adapter_roofline_fraction_back_to_back"] = roofline_fraction(args, queued["ours"] - queued["base"],
                                                                          results["copy_bandwidth_gb_s"] * 1e9)
    return results


FORM_SWEEP = [ProductForms(adapter_first, splits) for adapter_first in (False, True) for splits in (1, 2, 4, 8)]


def forms_benchmark(args) -> dict:
    """The layer (forward + backward) under each product form of `alphalora.adapters.product_forms`, timed in
    interleaved rounds with the base alone: per form, the adapter part's seconds and its roofline fraction."""
    base, layer, x = benchmark_layer(args)
    steps = {"base": forward_backward(base, x)}
    steps.update({form_name(forms): under_forms(forms, forward_backward(layer, x)) for forms in FORM_SWEEP})
    seconds = interleaved(steps, args.repeats, args.device)
    # The same back to back (10 calls between synchronisations): what the layer costs inside a model, where the
    # host has queued the next layers' work while this one runs, without one call's launch latency.
    back_to_back = {name: per_call_seconds(step, args.repeats, args.device, calls=10) for name, step in steps.items()}
    bandwidth = copy_bandwidth(args.device, DTYPES[args.dtype], args.repeats)
    rows = {}
    for name in list(steps)[1:]:  # (every form, in the sweep's order, after the base)
        adapter, queued = seconds[name] - seconds["base"], back_to_back[name] - back_to_back["base"]
        rows[name] = {"adapter_s": adapter, "roofline_fraction": roofline_fraction(args, adapter, bandwidth),
                      "adapter_s_back_to_back": queued,
                      "roofline_fraction_back_to_back": roofline_fraction(args, queued, bandwidth)}
    return {"base_s": seconds["base"], "base_s_back_to_back": back_to_back["base"],
            "copy_bandwidth_gb_s": bandwidth / 1e9, "forms": rows,
            "best": max(rows, key=lambda name: rows[name]["roofline_fraction"])}


def under_forms(forms: ProductForms, run):
    """run, with the fused functions computing in `forms` while it runs."""
    def step():
        product_forms.forms = forms
        try:
            run()
        finally:
            product_forms.forms = ProductForms()
    return step


def form_name(forms: ProductForms) -> str:
    return f"{'adapter_first' if forms.adapter_first else 'base_first'}, {forms.token_splits} token splits"


def many_experts_benchmark(args) -> dict:
    """Dense-masked experts against the grouped routing kernels where E x r rivals the width."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    base = nn.Linear(args.hidden, args.hidden, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    layers = {kernel: MoELoRALinear(base, args.many_experts, args.top_k, args.many_rank,
                                    lora_alpha=2.0 * args.many_rank, kernel=kernel)
              for kernel in ("dense", "grouped")}
    with torch.no_grad():
        layers["dense"].lora_B.normal_(0, 0.02)  # (zero, as initialised, they would compare nothing)
    layers["grouped"].load_state_dict(layers["dense"].state_dict())
    loop = MoELoRALinear(base, args.many_experts, args.top_k, args.many_rank, lora_alpha=2.0 * args.many_rank)
    loop.load_state_dict(layers["dense"].state_dict())
    use_loop(loop)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    # The same function (checked in float32: with 64 experts, bfloat16 router logits tie often enough that the
    # paths' different roundings pick other experts for a few tokens)
    for kernel in ("dense", "grouped") if dtype == torch.float32 else ():
        torch.testing.assert_close(layers[kernel](x), loop(x), rtol=2e-2, atol=2e-2)
    results = {name: timed(forward_backward(module, x), args.repeats, args.device)
               for name, module in [("base", base), ("loop", loop), ("dense", layers["dense"]),
                                    ("grouped", layers["grouped"])]}
    results["grouped_over_dense"] = (results["dense"] - results["base"]) / (results["grouped"] - results["base"])
    return results


def small_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=args.model_hidden, intermediate_size=args.model_hidden * 8 // 3,
                         num_hidden_layers=args.model_layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(args.device, DTYPES[args.dtype])


def interleaved(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function over `repeats` rounds that call every function once in turn
    (after two warm-up rounds), so that a noisy machine's slow spells hit all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(repeats + 2):
        for name, fn in fns.items():
            seconds = seconds_of_one_call(fn, device)
            if round_index >= 2:
                times[name].append(seconds)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def training_steps(args, names=("lora_r8", "moe_lora", "moe_lora_loop")) -> dict:
    """One training step (forward, backward, optimizer) of the small Llama per variant: plain LoRA
    r=8, MoE-LoRA (5 experts per layer, 160 scaled from 32 layers, top-2, r=8), and the same MoE-LoRA
    computed with the MoLA loop."""
    layers = args.model_layers
    experts = max(1, round(160 / 32))
    variants = {
        "lora_r8": ([1] * layers, [1] * layers, False),
        "moe_lora": ([experts] * layers, [min(2, experts)] * layers, False),
        "moe_lora_loop": ([experts] * layers, [min(2, experts)] * layers, True),
    }
    ids = torch.randint(0, 4096, (args.batch, args.seq), device=args.device)
    steps = {}
    for name in names:
        counts, top_k, loop = variants[name]
        model = small_llama(args).train()
        plan = Plan(method="uniform", base_model="small-llama", experts_per_layer=counts, top_k_per_layer=top_k,
                    rank=8, lora_alpha=16.0, lora_dropout=0.0)
        state = inject_adapters(model, plan)
        if loop:
            for module_name in state.module_names:
                use_loop(model.get_submodule(module_name))
        # transformers.Trainer's default optimizer (optim="adamw_torch_fused"), as `alphalora train` runs it.
        optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-4, fused=True)

        # `alphalora train --bf16`: the model loaded in bf16, run under bf16 autocast by Trainer.
        autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

        def train_step(model=model, optimizer=optimizer, autocast=autocast):
            optimizer.zero_grad()
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()

        steps[name] = train_step
    return steps


def model_benchmark(args) -> dict:
    steps = training_steps(args)
    seconds = interleaved(steps, args.model_repeats, args.device)
    results = {name: {"step_s": s, "tokens_per_s": args.batch * args.seq / s} for name, s in seconds.items()}
    results["moe_over_lora"] = results["moe_lora"]["tokens_per_s"] / results["lora_r8"]["tokens_per_s"]
    results["moe_over_loop"] = results["moe_lora"]["tokens_per_s"] / results["moe_lora_loop"]["tokens_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--many-experts", type=int, default=64, help="experts for the many-expert layer comparison")
    parser.add_argument("--many-rank", type=int, default=16)
    parser.add_argument("--model-layers", type=int, default=4)
    parser.add_argument("--model-hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model-repeats", type=int, default=10, help="interleaved rounds of the three training steps")
    parser.add_argument("--sections", default="layer,many,model",
                        help="comma-separated parts to run: layer, many (the many-expert layer), model, forms "
                             "(the layer under each product form; not in the default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"layer", "many", "model", "forms"}
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from layer, many, model, forms")
    summary = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
               "device": device_name(args.device),
               "dtype": args.dtype}
    if "layer" in sections:
        summary.update(report_layer(args))
    if "many" in sections:
        summary["many_experts"] = report_many_experts(args)
    if "model" in sections:
        summary.update(report_model(args))
    if "forms" in sections:
        summary["forms"] = report_forms(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"\nwrote {args.json}")


def report_layer(args) -> dict:
    layer = layer_benchmark(args)
    print(f"layer fwd+bwd, hidden {args.hidden}, {args.tokens} tokens, {args.experts} experts top-{args.top_k}, "
          f"rank {args.rank}, {args.dtype}, {args.device}")
    for name in ("base", "loop", "ours"):
        print(f"  {name:5s} {layer[name] * 1e3:8.2f} ms")
    print(f"  adapter_overhead_ratio (ours - base) / (loop - base) = {layer['adapter_overhead_ratio']:.3f}")
    print(f"  adapter part at {layer['adapter_roofline_fraction']:.0%} of the memory roofline "
          f"({layer['adapter_min_bytes'] / 2**20:.0f} MiB least traffic, copy bandwidth "
          f"{layer['copy_bandwidth_gb_s']:.0f} GB/s); {layer['adapter_roofline_fraction_back_to_back']:.0%} with "
          f"10 calls back to back")
    return {"layer": layer, "adapter_overhead_ratio": layer["adapter_overhead_ratio"],
            "adapter_roofline_fraction": layer["adapter_roofline_fraction"]}


def report_many_experts(args) -> dict:
    many = many_experts_benchmark(args)
    print(f"\nlayer fwd+bwd with {args.many_experts} experts x rank {args.many_rank} (E*r = "
          f"{args.many_experts * args.many_rank}), top-{args.top_k}")
    for name in ("base", "loop", "dense", "grouped"):
        print(f"  {name:7s} {many[name] * 1e3:8.2f} ms")
    print(f"  adapter cost dense / grouped = {many['grouped_over_dense']:.2f}x")
    return many


def report_model(args) -> dict:
    model = model_benchmark(args)
    print(f"\ntraining step, Llama {args.model_layers} layers hidden {args.model_hidden}, "
          f"{args.batch}x{args.seq} tokens, {args.dtype}")
    for name in ("lora_r8", "moe_lora", "moe_lora_loop"):
        print(f"  {name:14s} {model[name]['step_s'] * 1e3:8.1f} ms/step  {model[name]['tokens_per_s']:8.0f} tok/s")
    print(f"  MoE-LoRA / LoRA r8 = {model['moe_over_lora']:.2f}x, MoE-LoRA / loop = {model['moe_over_loop']:.2f}x")
    return {"model": model,
            "step_tokens_per_s": {k: model[k]["tokens_per_s"] for k in ("lora_r8", "moe_lora", "moe_lora_loop")}}


def report_forms(args) -> dict:
    forms = forms_benchmark(args)
    print(f"\nlayer fwd+bwd under each product form, hidden {args.hidden}, {args.tokens} tokens, {args.dtype}; "
          f"base {forms['base_s'] * 1e3:.2f} ms")
    print(f"  {'form':34s} {'one call, synchronised':>33s}   {'back to back':>28s}")
    for name, row in forms["forms"].items():
        print(f"  {name:34s} adapter {row['adapter_s'] * 1e3:8.3f} ms  {row['roofline_fraction']:6.1%} of roofline"
              f"   {row['adapter_s_back_to_back'] * 1e3:8.3f} ms  {row['roofline_fraction_back_to_back']:6.1%}")
    print(f"  best: {forms['best']}")
    return forms


if __name__ == "__main__":
    main()
