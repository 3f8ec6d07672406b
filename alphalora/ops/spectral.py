"""Typed wrappers and fake kernels for the spectral ops (torch.ops.alphalora.*)."""

from __future__ import annotations

import torch

from . import _library  # noqa: F401  (registers the ops: compiled, or the references)


@torch.library.register_fake("alphalora::powerlaw_fit")
def _powerlaw_fit_fake(evals, lengths, cand_lo, cand_hi, min_tail, bias_corrected):
    batch = evals.shape[0]
    return evals.new_empty(batch), evals.new_empty(batch), lengths.new_empty(batch)


@torch.library.register_fake("alphalora::xmin_peak_window")
def _xmin_peak_window_fake(evals, lengths, bins, log_lower_bound):
    batch = evals.shape[0]
    return lengths.new_empty(batch), lengths.new_empty(batch)


@torch.library.register_fake("alphalora::eigvalsh_batched")
def _eigvalsh_batched_fake(grams):
    return grams.new_empty(grams.shape[:2])


def eigvalsh_batched(grams: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of each symmetric (batch, n, n) matrix; parallel over the batch on CPU."""
    return torch.ops.alphalora.eigvalsh_batched(grams)


def powerlaw_fit(
    evals: torch.Tensor,
    lengths: torch.Tensor,
    cand_lo: torch.Tensor,
    cand_hi: torch.Tensor,
    min_tail: int = 1,
    bias_corrected: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact continuous power-law fits of many spectra at once.

    Row b of `evals` (float64) holds lengths[b] ascending eigenvalues; every index in
    [cand_lo[b], cand_hi[b]) except the largest value is an xmin candidate. Returns
    (alpha, D, xmin_index) per row: the candidate with the smallest KS distance, the first on
    ties; (NaN, NaN, -1) where no candidate qualified.
    """
    return torch.ops.alphalora.powerlaw_fit(evals, lengths, cand_lo, cand_hi, min_tail, bias_corrected)


def xmin_peak_window(
    evals: torch.Tensor, lengths: torch.Tensor, bins: int = 100, log_lower_bound: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate index window [lo, hi) of the xmin_peak (fix-finger) estimator, per row.

    `log_lower_bound=True` reproduces TempBalance/AlphaPruning/AlphaLoRA, whose lower bound
    is log10(0.95 * peak); False uses the intended 0.95 * peak.
    """
    return torch.ops.alphalora.xmin_peak_window(evals, lengths, bins, log_lower_bound)
