"""Eigenvalues of W^T W (the squared singular values) for many matrices, batched by size."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch

from alphalora import ops

from .weights import WeightEntry

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
# cuSOLVER's float32 eigensolver is off by ~1e-4 of lambda_max (seen on an H200 with CUDA 13, where
# LAPACK's is off by ~4e-7), which moves the small end of the ESD that xmin_peak's histogram reads.
# On a GPU the float32 Gram is therefore solved in float64, which costs less than the fp64 mode's
# extra time (23.6 s against 20.9 s for a LLaMA-7B-shaped model on an H200).
SOLVE_IN_FLOAT64_ON = {"cuda"}
# Gram matrices held at once per batch; bounds memory for 7B-sized models.
DEFAULT_BATCH_BYTES = 512 * 2**20


class NonFiniteWeightError(ValueError):
    """A weight matrix holds NaN or Inf values."""


@contextlib.contextmanager
def _exact_float32_matmul() -> Iterator[None]:
    # TF32 would round the Gram to 10 mantissa bits and destroy the small eigenvalues.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def gram(weight: torch.Tensor) -> torch.Tensor:
    """The smaller-side Gram matrix of `weight`: its eigenvalues are the squared singular values."""
    return weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T


def _non_finite_error(weight: torch.Tensor) -> NonFiniteWeightError:
    if not bool(torch.isfinite(weight).all()):
        return NonFiniteWeightError("weight has NaN or Inf values")
    return NonFiniteWeightError(
        f"W^T W overflows in {weight.dtype}: weights up to {float(weight.abs().max()):.3g}; use --precision fp64"
    )


def _batches(entries: Sequence[WeightEntry], dtype: torch.dtype, batch_bytes: int) -> list[list[int]]:
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        by_size[entry.num_eigenvalues].append(i)
    element = torch.finfo(dtype).bits // 8
    batches = []
    for size, members in by_size.items():
        per_batch = max(1, batch_bytes // (size * size * element))
        batches.extend(members[s : s + per_batch] for s in range(0, len(members), per_batch))
    return batches


def eigenvalues(
    entries: Sequence[WeightEntry],
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    on_matrix_done: Callable[[int], None] | None = None,
) -> list[torch.Tensor | Exception]:
    """Ascending float64 CPU eigenvalues of each entry (or the error that prevented them).

    Each weight is loaded once, turned into its Gram matrix in `precision` on `device` and
    released; Gram matrices of the same size are solved together with one batched `eigvalsh`
    (in `precision` on a CPU, in float64 on a GPU: see SOLVE_IN_FLOAT64_ON). fp32 eigenvalues
    are off by up to M * eps32 * lambda_max; `refine.py` recomputes in fp64 those a fit would read.
    """
    dtype = PRECISIONS[precision]
    solve_dtype = torch.float64 if torch.device(device).type in SOLVE_IN_FLOAT64_ON else dtype
    results: list[torch.Tensor | Exception | None] = [None] * len(entries)
    with _exact_float32_matmul(), torch.no_grad():
        for batch in _batches(entries, solve_dtype, batch_bytes):
            grams, members = [], []
            for i in batch:
                weight = entries[i].load().to(device=device, dtype=dtype)
                product = gram(weight)
                # Checking the (smaller) Gram matrix catches NaN/Inf weights and overflow alike.
                if not bool(torch.isfinite(product).all()):
                    results[i] = _non_finite_error(weight)
                    if on_matrix_done:
                        on_matrix_done(1)
                    continue
                grams.append(product)
                members.append(i)
                del weight, product
            if not grams:
                continue
            values = ops.eigvalsh_batched(torch.stack(grams).to(solve_dtype)).to("cpu", torch.float64)
            del grams
            for row, i in enumerate(members):
                results[i] = values[row]
            if on_matrix_done:
                on_matrix_done(len(members))
    return results  # type: ignore[return-value]
