"""How the fused adapter functions lay out their skinny products: the same math in forms that a GPU may run
faster, chosen by one module-level setting that benchmarks sweep.

An adapted linear's adapter part is a handful of products with E x r (+ E router) columns against thousands of
rows and hidden units: bandwidth-bound, and on a GPU easily short of parallelism. Two forms change how they run:

* `adapter_first`: write the rank-r update (the output's, the input gradient's) first and let the base GEMM
  accumulate into it (cuBLAS's beta = 1), instead of computing the base GEMM and then reading and writing its
  result again to add the update. The base GEMM is compute-bound, so the read of its C operand rides in its
  epilogue nearly free: the adapter's pass over the output costs a write instead of a read and a write.
* `token_splits`: the weight gradients' reductions over the tokens (K = T, thousands, into an output of
  E x r columns) as that many products over slices of the tokens, summed in float32 (split-K). One product
  gives the GPU only (out / tile) output tiles to spread over its SMs; S slices give S times as many.

Both are off by default: on the CPU (hidden 1024, 2048 tokens) two runs of the sweep could not tell the forms
apart, and on an H100 (hidden 4096, 8192 tokens, bf16, two runs; fp32, one) none beat the default in every run,
and adapter-first was the slowest as one synchronised call (benchmarks/RESULTS.md). In the default form the
base GEMM is issued before the adapter's small products (`base_linear`, `base_input_grad`), so that on a GPU the
host's launches of those overlap it rather than delay it. `benchmarks/moe_lora.py --sections forms` times the
layer under every combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPLIT_MIN_TOKENS = 256  # a slice of fewer tokens than this is not worth a product of its own


@dataclass
class ProductForms:
    adapter_first: bool = False
    token_splits: int = 1

    def __post_init__(self):
        if self.token_splits < 1:
            raise ValueError(f"token_splits must be at least 1, got {self.token_splits}")


forms = ProductForms()


def token_reduction(a: torch.Tensor, b: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """a.T @ b for a [T, M] and b [T, N]: one product, or with S = splits (default `forms.token_splits`) > 1
    and at least SPLIT_MIN_TOKENS tokens a slice, S products over slices of the tokens summed in at least float32:
    half-precision inputs come back in float32 (the dtype the adapters' parameters keep over a half-precision
    base), float32 and float64 ones in their own dtype."""
    tokens = a.shape[0]
    splits = min(forms.token_splits if splits is None else splits, tokens // SPLIT_MIN_TOKENS)
    if splits <= 1:
        return a.T @ b
    chunk = tokens // splits
    whole = splits * chunk
    sliced_a = a[:whole].view(splits, chunk, a.shape[1]).transpose(1, 2)
    sliced_b = b[:whole].view(splits, chunk, b.shape[1])
    total = _wide_bmm(sliced_a, sliced_b).sum(0)
    if whole < tokens:
        total += _wide_bmm(a[whole:].T[None], b[whole:][None])[0]
    return total


def _wide_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b batched, accumulated and returned in at least float32: half-precision inputs straight into float32
    output on CUDA (no upcast copies), elsewhere (the CPU has no such kernel) through float32 copies; float32 and
    float64 inputs as they are."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weight.T + bias, the base GEMM, in the default form, where it comes first: called before the adapter's
    own small products, so that on a GPU it is queued first and their launches overlap it. None in the
    `adapter_first` form, where `with_update` runs it last."""
    return None if forms.adapter_first else torch.nn.functional.linear(x, weight, bias)


def with_update(base_out: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                low_rank: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias + low_rank @ up.T (weight [out, in], up [out, r]): the rank-r update added in place
    into `base_linear`'s output, or (the `adapter_first` form, base_out None) the base GEMM accumulated into the
    update."""
    if base_out is not None:
        return base_out.addmm_(low_rank, up.T)
    update = low_rank @ up.T if bias is None else torch.addmm(bias, low_rank, up.T)
    return update.addmm_(x, weight.T)


def base_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """grad_out @ weight, x's gradient through the base GEMM, first (as `base_linear`); None in the
    `adapter_first` form."""
    return None if forms.adapter_first else grad_out @ weight


def with_input_update(base_grad: torch.Tensor | None, grad_out: torch.Tensor, weight: torch.Tensor,
                      grad_low_rank: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """grad_out @ weight + grad_low_rank @ down (down [r, in]): as `with_update`, for x's gradient."""
    if base_grad is not None:
        return base_grad.addmm_(grad_low_rank, down)
    return (grad_low_rank @ down).addmm_(grad_out, weight)
