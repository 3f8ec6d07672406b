"""Power-law estimators over many spectra at once: WeightWatcher's, xmin_peak and median."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from alphalora import ops

ESTIMATORS = ("ww", "xmin_peak", "median")

# WeightWatcher 0.7.7 constants (weightwatcher/constants.py, WW_powerlaw.py).
WW_EVALS_THRESH = 1e-5
WW_SMALL_N_CUTOFF = 20
WW_SMALL_N_MIN_TAIL = 8
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0
# A fitted tail whose eigenvalues all lie within this fraction of xmin is flat: storing a weight in
# bf16 (8-bit mantissa) alone moves its eigenvalues by up to ~1% of their size, so such a tail's
# sum(log(lambda / xmin)), the MLE's denominator, is rounding noise and alpha (> 1 + 1/log(1.01),
# about 100) means nothing. all-MiniLM-L6-v2's and the tests' models' tails spread by 22% or more.
FLAT_TAIL_RTOL = 1e-2
DEGENERATE = "degenerate"


@dataclass(frozen=True)
class FitOutcome:
    """The power-law fit of one spectrum; alpha/D/xmin are None when the fit failed.

    A fit of a flat tail (see FLAT_TAIL_RTOL) keeps its numbers but says status "degenerate: ...":
    its alpha is rounding noise, and layer scores leave it out.
    """

    alpha: float | None
    D: float | None
    xmin: float | None
    sigma: float | None
    num_pl_spikes: int | None
    num_fit_evals: int  # eigenvalues that entered the fit
    status: str  # "success", "degenerate: <why>" or "failed: <why>"
    warning: str  # WeightWatcher's "over-trained" / "under-trained", "flat tail", or ""


def _failed(reason: str, num_fit_evals: int) -> FitOutcome:
    return FitOutcome(None, None, None, None, None, num_fit_evals, f"failed: {reason}", "")


def _found_fit(alpha: float, distance: float, xmin: float, sigma: float, spikes: int, num_fit: int,
             largest: float) -> FitOutcome:
    """A found fit: "success", or "degenerate" where the tail from xmin to the `largest` value is flat."""
    if largest <= xmin * (1.0 + FLAT_TAIL_RTOL):
        status = (f"{DEGENERATE}: flat tail, its {spikes} eigenvalues within {FLAT_TAIL_RTOL:.0%} of xmin "
                  f"(spread {largest / xmin - 1:.1e}), so alpha {alpha:.4g} is rounding noise; left out of the "
                  "layer score")
        return FitOutcome(alpha, distance, xmin, sigma, spikes, num_fit, status, "flat tail")
    warning = "over-trained" if alpha < OVER_TRAINED_THRESH else "under-trained" if alpha > UNDER_TRAINED_THRESH else ""
    return FitOutcome(alpha, distance, xmin, sigma, spikes, num_fit, "success", warning)


def filter_threshold(estimator: str, evals_threshold: float | None = None) -> float:
    """The eigenvalue filter of an estimator: the fit reads only eigenvalues above it."""
    if evals_threshold is not None:
        return evals_threshold
    return WW_EVALS_THRESH if estimator == "ww" else 0.0


def _candidates(estimator: str, data: torch.Tensor, n: torch.Tensor, median_at: torch.Tensor, precision: str,
                device, *, log_lower_bound: bool, bins: int):
    """Per-row candidate window [lo, hi), minimum tail and bias correction of each estimator (`median_at`: the
    median's index among the `n` values read)."""
    zeros = torch.zeros_like(n)
    if estimator == "ww":
        standard = n >= WW_SMALL_N_CUTOFF
        small = (n >= WW_SMALL_N_MIN_TAIL) & ~standard
        # Below 8 values no candidate has 8 tail values: WeightWatcher falls back to the whole
        # spectrum as the tail (xmin = the smallest value), bias-corrected.
        hi = torch.where(standard | small, n - 1, torch.ones_like(n))
        min_tail = torch.where(small, WW_SMALL_N_MIN_TAIL, 1)
        return zeros, hi, min_tail, ~standard
    if estimator == "median":
        return median_at, median_at + 1, torch.ones_like(n), zeros.bool()
    dtype = torch.float32 if precision == "fp32" else torch.float64
    if dtype == torch.float32 and bool(((data > 0) & (data.float() == 0)).any()):
        dtype = torch.float64  # a value under float32's range (an fp64 spectrum's noise) would become a zero
    lo, hi = ops.xmin_peak_window(data.to(device=device, dtype=dtype), n.to(device), bins, log_lower_bound)
    return lo.cpu(), hi.cpu(), torch.ones_like(n), zeros.bool()


def fit_spectra(
    spectra: Sequence[torch.Tensor],
    estimator: str = "xmin_peak",
    precision: str = "fp64",
    device: str | torch.device = "cpu",
    *,
    log_lower_bound: bool = True,
    bins: int = 100,
    evals_threshold: float | None = None,
) -> list[FitOutcome]:
    """Fits a power law to the tail of each ascending eigenvalue spectrum.

    - ``ww``: WeightWatcher 0.7.7 ``analyze()``: eigenvalues > 1e-5, every index but the largest
      an xmin candidate, first KS argmin, the bias-corrected small-N branch for 8 <= N < 20.
    - ``xmin_peak``: TempBalance / AlphaPruning / AlphaLoRA's fix-finger estimator: candidates
      limited to the window around the log-ESD histogram peak (``log_lower_bound`` keeps the
      authors' log10 lower bound), no eigenvalue filter.
    - ``median``: TempBalance's PL_Alpha_Hill, xmin at the median eigenvalue.

    ``evals_threshold`` overrides the eigenvalue filter (ww: 1e-5; others: none, only
    non-positive values, which have no logarithm, are dropped). Without one, ``median`` is that of every
    eigenvalue, as TempBalance's (an eigensolver's zero eigenvalues of a rank-deficient matrix, which come
    out of it as +-noise, counted). The fit runs in float64; ``precision`` is the arithmetic of the
    xmin_peak histogram.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not spectra:
        return []
    threshold = filter_threshold(estimator, evals_threshold)
    # One padded batch; +inf padding keeps rows sorted, so the filter is a searchsorted.
    everything = pad_sequence([s.to(torch.float64) for s in spectra], batch_first=True, padding_value=math.inf)
    total = torch.tensor([s.numel() for s in spectra])
    start = torch.searchsorted(everything, torch.full((len(spectra), 1), float(threshold), dtype=torch.float64),
                               right=True).squeeze(1)
    n = total - start
    columns = torch.arange(everything.shape[1])
    data = everything.gather(1, (start[:, None] + columns).clamp(max=everything.shape[1] - 1))
    data = torch.where(columns < n[:, None], data, torch.ones_like(data))
    median_at = (total // 2 - start) if evals_threshold is None else n // 2
    fittable = (n >= 2) & (median_at >= 0 if estimator == "median" else True)
    lo, hi, min_tail, bias_corrected = _candidates(
        estimator, data, n, median_at.clamp(min=0), precision, device, log_lower_bound=log_lower_bound, bins=bins
    )

    alpha = torch.full((len(spectra),), math.nan, dtype=torch.float64)
    distance = alpha.clone()
    index = torch.full((len(spectra),), -1, dtype=torch.int64)
    on_cpu = torch.device(device).type == "cpu"
    groups = set(zip(min_tail[fittable].tolist(), bias_corrected[fittable].tolist(), strict=True))
    for min_tail_value, bias_value in sorted(groups):
        rows = (fittable & (min_tail == min_tail_value) & (bias_corrected == bias_value)).nonzero().squeeze(1)
        width = int(n[rows].max())
        inputs = (data[rows, :width], n[rows], lo[rows], hi[rows])
        if not on_cpu:
            inputs = tuple(t.to(device) for t in inputs)
        fit = ops.powerlaw_fit(*inputs, min_tail_value, bias_value)
        alpha[rows], distance[rows], index[rows] = (t.cpu() for t in fit)

    found = index >= 0
    xmin = data.gather(1, index.clamp(min=0)[:, None]).squeeze(1)
    spikes = total - torch.searchsorted(everything, xmin[:, None], right=False).squeeze(1)
    sigma = (alpha - 1.0) / (n - index).clamp(min=1).double().sqrt()
    if estimator == "ww":
        # WeightWatcher's small-N branch takes its sigmas before it falls back to the whole spectrum (no
        # candidate with 8 tail values): the fallback reports sigma (0 - 1) / sqrt(N)
        sigma = torch.where(n < WW_SMALL_N_MIN_TAIL, -1.0 / n.clamp(min=1).double().sqrt(), sigma)
    largest = data.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
    outcomes = []
    rows = zip(n.tolist(), found.tolist(), alpha.tolist(), distance.tolist(), xmin.tolist(), sigma.tolist(),
               spikes.tolist(), largest.tolist(), median_at.tolist(), strict=True)
    for num_fit, ok, a, d, x, sg, spike, top, at in rows:
        if num_fit < 2:
            outcomes.append(_failed(f"fewer than 2 eigenvalues above {threshold:g}", num_fit))
        elif estimator == "median" and at < 0:
            outcomes.append(_failed("the median eigenvalue is zero: fewer than half the eigenvalues are positive "
                                    "(the matrix is rank-deficient)", num_fit))
        elif not ok:
            outcomes.append(_failed("empty xmin window" if estimator == "xmin_peak" else "no valid xmin candidate",
                                    num_fit))
        else:
            outcomes.append(_found_fit(a, d, x, sg, spike, num_fit, top))
    return outcomes
