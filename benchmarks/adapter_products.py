"""Each matrix product of the dense MoE-LoRA layer's adapter part, alone, against the memory roofline: a
diagnostic for the layer's roofline target, not a claim.

The adapter part of `alphalora.adapters.fused._DenseMoELoRA` (forward + backward) is six products: the
experts' down-projections and the router logits from one read of x, the gated up-projection accumulated into
the base output, and in backward the up-projection's weight gradient, the gated hidden's gradient, x's gradient
accumulated into the base's, and the down-projections' and router's weight gradient. Each is skinny (E x r + E
columns against a hidden size of thousands), so its cost is its memory traffic: this script times each one,
divides its least traffic by the copy bandwidth measured in the same run, and times other ways of computing the
same product (the transposed product, split-K over the tokens with float32 partial sums, the router apart), each
checked against the plain product first.

    python benchmarks/adapter_products.py --device cuda --dtype bf16 --json products.json
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_modules import load_benchmark  # beside this script, on the path when it runs

from alphalora.adapters.product_forms import token_reduction

moe_lora_bench = load_benchmark("moe_lora")


def split_k_product(a: torch.Tensor, b: torch.Tensor, splits: int) -> torch.Tensor:
    """a.T @ b for a [T, M], b [T, N] as `splits` products over slices of T summed in float32 (the layer's
    `token_splits` form; half-precision inputs go straight into float32 products on a GPU)."""
    return token_reduction(a, b, splits).to(a.dtype)


def padded_rows(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """weight [N, K] with zero rows appended up to a multiple of `multiple` rows."""
    pad = -weight.shape[0] % multiple
    return torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])


def products(tokens: int, width_in: int, width_out: int, width: int, experts: int, device: str,
             dtype: torch.dtype) -> dict[str, tuple]:
    """name -> (fn, least bytes moved, the plain product's name it must equal or None)."""
    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) / shape[-1] ** 0.5

    x, grad_out = tensor(tokens, width_in), tensor(tokens, width_out)
    stacked, up = tensor(width + experts, width_in), tensor(width_out, width)
    gated, grad_both = tensor(tokens, width), tensor(tokens, width + experts)
    y, grad_x = tensor(tokens, width_out), tensor(tokens, width_in)
    size = dtype.itemsize
    read_x, read_grad_out = tokens * width_in * size, tokens * width_out * size
    small = (tokens * (width + experts) + (width + experts) * max(width_in, width_out)) * size
    stacked_padded = padded_rows(stacked, 64)
    return {
        "down_and_router": (lambda: x @ stacked.T, read_x + small, None),
        # (N = E*r + E = 72 columns spill into a second tile of 64; padded to 128 the product is one tile wide)
        "down_and_router_padded": (lambda: (x @ stacked_padded.T)[:, :width + experts], read_x + small,
                                   "down_and_router"),
        "down_and_router_apart": (lambda: torch.cat([x @ stacked[:width].T, x @ stacked[width:].T], dim=1),
                                  2 * read_x + small, "down_and_router"),
        "up_accumulated": (lambda: y.addmm_(gated, up.T), 2 * tokens * width_out * size + small, None),
        "grad_up": (lambda: grad_out.T @ gated, read_grad_out + small, None),
        "grad_up_transposed": (lambda: (gated.T @ grad_out).T, read_grad_out + small, "grad_up"),
        "grad_up_split_k4": (lambda: split_k_product(grad_out, gated, 4), read_grad_out + small, "grad_up"),
        "grad_up_split_k16": (lambda: split_k_product(grad_out, gated, 16), read_grad_out + small, "grad_up"),
        "grad_gated": (lambda: grad_out @ up, read_grad_out + small, None),
        "grad_x_accumulated": (lambda: grad_x.addmm_(grad_both, stacked), 2 * tokens * width_in * size + small,
                               None),
        "weight_grad": (lambda: grad_both.T @ x, read_x + small, None),
        "weight_grad_transposed": (lambda: (x.T @ grad_both).T, read_x + small, "weight_grad"),
        "weight_grad_split_k4": (lambda: split_k_product(grad_both, x, 4), read_x + small, "weight_grad"),
        "weight_grad_split_k16": (lambda: split_k_product(grad_both, x, 16), read_x + small, "weight_grad"),
    }


def check_alternatives(table: dict[str, tuple], dtype: torch.dtype) -> None:
    """Every alternative equals the plain product it stands for (to the dtype's rounding)."""
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for name, (fn, _, plain) in table.items():
        if plain is not None:
            want = table[plain][0]().float()
            torch.testing.assert_close(fn().float(), want, rtol=tol, atol=tol * float(want.abs().max()),
                                       msg=lambda m, n=name: f"{n}: {m}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(moe_lora_bench.DTYPES), default="fp32")
    parser.add_argument("--hidden", type=int, default=1024, help="the layer's width (4096 on a GPU)")
    parser.add_argument("--tokens", type=int, default=2048, help="the layer's tokens (8192 on a GPU)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    dtype = moe_lora_bench.DTYPES[args.dtype]
    torch.manual_seed(0)
    table = products(args.tokens, args.hidden, args.hidden, args.experts * args.rank, args.experts, args.device,
                     dtype)
    check_alternatives(table, dtype)
    bandwidth = moe_lora_bench.copy_bandwidth(args.device, dtype, args.repeats)
    rows = {}
    print(f"{args.device} {args.dtype}: {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts x rank "
          f"{args.rank}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'product':26s} {'us':>9s} {'least MiB':>10s} {'roofline':>9s}")
    for name, (fn, least, _) in table.items():
        seconds = moe_lora_bench.per_call_seconds(fn, args.repeats, args.device)
        rows[name] = {"us": seconds * 1e6, "least_bytes": least, "roofline_fraction": least / bandwidth / seconds}
        print(f"{name:26s} {seconds * 1e6:9.1f} {least / 2**20:10.1f} {rows[name]['roofline_fraction']:9.0%}")
    plain = [name for name, (_, _, of) in table.items() if of is None]
    total = sum(rows[name]["us"] for name in plain)
    print(f"the plain products together: {total:.1f} us, "
          f"{sum(rows[n]['least_bytes'] for n in plain) / bandwidth * 1e6 / total:.0%} of their roofline")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": moe_lora_bench.device_name(args.device), "dtype": args.dtype,
                       "torch": torch.__version__, "tokens": args.tokens, "hidden": args.hidden,
                       "experts": args.experts, "rank": args.rank, "copy_bandwidth_gb_s": bandwidth / 1e9,
                       "products": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
