"""Spectra of matrices that are rank-deficient to working precision, taken from an fp64 SVD.

An eigenvalue of a float64 Gram matrix is off by up to about M * eps64 * lambda_max, so a singular value
under sqrt(M * eps64) (about 1e-7) of the largest is noise there: a rank-deficient matrix's zero singular
values come out as +-1e-14 lambda_max, and its rank (WeightWatcher's, numpy's: the singular values above
sigma_max * N * eps64) and entropy with them. WeightWatcher reads every spectrum off an fp64 SVD, accurate
to eps64 * sigma_max. Where a Gram spectrum's smallest eigenvalue lies within a margin of that noise floor,
the matrix's eigenvalues are therefore its squared singular values from an fp64 SVD; only there, as an SVD
costs several Gram eigensolves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .weights import WeightEntry

FP64_EPS = torch.finfo(torch.float64).eps
NOISE_MARGIN = 10.0  # how far above the fp64 Gram noise floor a smallest eigenvalue must be to be trusted


def unresolved_by_gram(spectrum: torch.Tensor) -> bool:
    """Whether an ascending fp64 Gram spectrum's smallest eigenvalues are within its own noise floor."""
    if spectrum.numel() == 0 or float(spectrum[-1]) <= 0.0:
        return False
    return float(spectrum[0]) < NOISE_MARGIN * spectrum.numel() * FP64_EPS * float(spectrum[-1])


def svd_spectra(entries: Sequence[WeightEntry], indices: Sequence[int],
                device: str | torch.device) -> dict[int, torch.Tensor]:
    """Ascending squared singular values (float64, on the CPU) of the entries at `indices`, by index."""
    spectra = {}
    with torch.no_grad():
        for i in indices:
            weight = entries[i].load().to(device=device, dtype=torch.float64)
            spectra[i] = torch.linalg.svdvals(weight).square().flip(0).to("cpu")
            del weight
    return spectra
