"""Transcriptions of the reference authors' estimators, kept independent of alphalora's code.

`fix_finger` follows AlphaLoRA's `expert_number.py` (a copy of TempBalance's
`net_esd_estimator`, fix_fingers='xmin_peak'); `hill_median` follows its 'median' branch.
The alphas/Ds arrays are float64 here (the originals default to float32 storage) so the
algorithm, not the storage rounding, is what the tests compare.
"""

from __future__ import annotations

import torch


def fix_finger(eigs: torch.Tensor, bins: int = 100, intended_lower_bound: bool = False):
    nz_eigs = torch.sort(eigs).values
    N = len(nz_eigs)
    log_nz_eigs = torch.log(nz_eigs)
    alphas = torch.zeros(N - 1, dtype=torch.float64)
    Ds = torch.ones(N - 1, dtype=torch.float64)
    hist_nz_eigs = torch.log10(nz_eigs)
    min_e, max_e = hist_nz_eigs.min(), hist_nz_eigs.max()
    counts = torch.histc(hist_nz_eigs, bins, min=min_e, max=max_e)
    boundaries = torch.linspace(min_e, max_e, bins + 1)
    ih = torch.argmax(counts)
    xmin2 = 10 ** boundaries[ih]
    xmin_min = 0.95 * xmin2 if intended_lower_bound else torch.log10(0.95 * xmin2)
    xmin_max = 1.5 * xmin2
    for i, xmin in enumerate(nz_eigs[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(N - i)
        seq = torch.arange(n, dtype=nz_eigs.dtype)
        alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            Ds[i] = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    min_D_index = torch.argmin(Ds)
    return float(alphas[min_D_index]), float(Ds[min_D_index]), float(nz_eigs[min_D_index])


def hill_median(eigs: torch.Tensor):
    nz_eigs = torch.sort(eigs).values
    N = len(nz_eigs)
    log_nz_eigs = torch.log(nz_eigs)
    i = int(N / 2)
    xmin = nz_eigs[i]
    n = float(N - i)
    seq = torch.arange(n, dtype=nz_eigs.dtype)
    alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
    D = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alpha), float(D), float(xmin)
