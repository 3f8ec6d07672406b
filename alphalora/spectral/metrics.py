"""WeightWatcher's norm and shape metrics of one spectrum (computed on all its eigenvalues)."""

from __future__ import annotations

import math

import torch

# WeightWatcher's EPSILON on CPU machines (RMT_Util.matrix_entropy).
ENTROPY_EPSILON = 1e-10


def spectrum_metrics(evals: torch.Tensor, alpha: float | None, n_rows: int) -> dict[str, float | int | None]:
    """Norm metrics of an ascending float64 spectrum; `n_rows` is the matrix's larger dimension."""
    lam = evals.clamp(min=0.0)
    norm = float(lam.sum())
    lambda_max = float(lam[-1]) if lam.numel() else 0.0
    if norm <= 0.0 or lambda_max <= 0.0:
        return {"norm": norm, "log_norm": None, "lambda_max": lambda_max, "log_spectral_norm": None,
                "alpha_weighted": None, "log_alpha_norm": None, "stable_rank": None,
                "matrix_rank": 0, "entropy": None}
    log_spectral_norm = math.log10(lambda_max)
    sv = lam.sqrt()
    rank = int((sv > sv[-1] * n_rows * torch.finfo(torch.float64).eps).sum())
    p = lam / lam.sum() + ENTROPY_EPSILON
    entropy = float(-(p * p.log()).sum() / math.log(rank + ENTROPY_EPSILON)) if rank > 0 else None
    metrics: dict[str, float | int | None] = {
        "norm": norm,
        "log_norm": math.log10(norm),
        "lambda_max": lambda_max,
        "log_spectral_norm": log_spectral_norm,
        "alpha_weighted": None,
        "log_alpha_norm": None,
        "stable_rank": norm / lambda_max,
        "matrix_rank": rank,
        "entropy": entropy,
    }
    if alpha is not None:
        metrics["alpha_weighted"] = alpha * log_spectral_norm
        metrics["log_alpha_norm"] = log10_sum_of_powers(lam, alpha)
    return metrics


def log10_sum_of_powers(lam: torch.Tensor, alpha: float) -> float:
    """log10(sum lam^alpha) (WeightWatcher's log_alpha_norm) of a spectrum whose largest value is positive.

    Computed as WeightWatcher does; where lam^alpha overflows to Inf or underflows to 0 (a huge
    alpha, e.g. a flat spectrum's), as alpha log10(lam_max) + log10(sum (lam / lam_max)^alpha),
    the same number without the overflow (the sum there is between 1 and M).
    """
    total = float((lam**alpha).sum())
    if 0.0 < total < math.inf:
        return math.log10(total)
    lambda_max = float(lam[-1])
    return alpha * math.log10(lambda_max) + math.log10(float(((lam / lambda_max) ** alpha).sum()))
