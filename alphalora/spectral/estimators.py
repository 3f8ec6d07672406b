"""Power-law estimators over many spectra at once: WeightWatcher's, xmin_peak and median."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alphalora import ops

ESTIMATORS = ("ww", "xmin_peak", "median")

# WeightWatcher 0.7.7 constants (weightwatcher/constants.py, WW_powerlaw.py).
WW_EVALS_THRESH = 1e-5
WW_SMALL_N_CUTOFF = 20
WW_SMALL_N_MIN_TAIL = 8
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0


@dataclass(frozen=True)
class FitOutcome:
    """The power-law fit of one spectrum; alpha/D/xmin are None when the fit failed."""

    alpha: float | None
    D: float | None
    xmin: float | None
    sigma: float | None
    num_pl_spikes: int | None
    num_fit_evals: int  # eigenvalues that entered the fit
    status: str  # "success" or "failed: <why>"
    warning: str  # WeightWatcher's "over-trained" / "under-trained", or ""


@dataclass(frozen=True)
class _FitRequest:
    data: torch.Tensor  # ascending float64 values that enter the fit
    lo: int
    hi: int
    min_tail: int
    bias_corrected: bool


def _failed(reason: str, num_fit_evals: int) -> FitOutcome:
    return FitOutcome(None, None, None, None, None, num_fit_evals, f"failed: {reason}", "")


def _ww_request(data: torch.Tensor) -> _FitRequest:
    n = data.numel()
    if n >= WW_SMALL_N_CUTOFF:
        return _FitRequest(data, 0, n - 1, 1, False)
    if n >= WW_SMALL_N_MIN_TAIL:  # WeightWatcher 0.7.7's small-N branch
        return _FitRequest(data, 0, n - 1, WW_SMALL_N_MIN_TAIL, True)
    # No candidate has 8 tail values: WeightWatcher falls back to the whole spectrum as tail.
    return _FitRequest(data, 0, 1, 1, True)


def _pad(rows: Sequence[torch.Tensor], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.numel() for r in rows)
    padded = torch.ones(len(rows), width, dtype=dtype)
    for b, r in enumerate(rows):
        padded[b, : r.numel()] = r
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.int64)
    return padded.to(device), lengths.to(device)


def _peak_windows(rows: Sequence[torch.Tensor], dtype: torch.dtype, device, log_lower_bound: bool, bins: int):
    padded, lengths = _pad(rows, dtype, device)
    lo, hi = ops.xmin_peak_window(padded, lengths, bins, log_lower_bound)
    return lo.tolist(), hi.tolist()


def _run_fits(requests: Sequence[_FitRequest], device) -> list[tuple[float, float, int]]:
    """Fits every request, one op call per (min_tail, bias_corrected) group."""
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[(r.min_tail, r.bias_corrected)].append(i)
    results: list[tuple[float, float, int]] = [(math.nan, math.nan, -1)] * len(requests)
    for (min_tail, bias_corrected), members in groups.items():
        padded, lengths = _pad([requests[i].data for i in members], torch.float64, device)
        lo = torch.tensor([requests[i].lo for i in members], dtype=torch.int64, device=device)
        hi = torch.tensor([requests[i].hi for i in members], dtype=torch.int64, device=device)
        alpha, distance, index = ops.powerlaw_fit(padded, lengths, lo, hi, min_tail, bias_corrected)
        for i, a, d, x in zip(members, alpha.tolist(), distance.tolist(), index.tolist(), strict=True):
            results[i] = (a, d, x)
    return results


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
    non-positive values, which have no logarithm, are dropped). The fit runs in float64;
    ``precision`` is the arithmetic of the xmin_peak histogram.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    threshold = evals_threshold
    if threshold is None:
        threshold = WW_EVALS_THRESH if estimator == "ww" else 0.0
    outcomes: list[FitOutcome | None] = [None] * len(spectra)
    requests: dict[int, _FitRequest] = {}
    kept: dict[int, torch.Tensor] = {}
    for i, evals in enumerate(spectra):
        data = evals[evals > threshold].to(torch.float64)
        if data.numel() < 2:
            outcomes[i] = _failed(f"fewer than 2 eigenvalues above {threshold:g}", data.numel())
            continue
        kept[i] = data
    if estimator == "ww":
        requests = {i: _ww_request(d) for i, d in kept.items()}
    elif estimator == "median":
        requests = {i: _FitRequest(d, d.numel() // 2, d.numel() // 2 + 1, 1, False) for i, d in kept.items()}
    elif kept:
        order = list(kept)
        dtype = torch.float32 if precision == "fp32" else torch.float64
        los, his = _peak_windows([kept[i] for i in order], dtype, device, log_lower_bound, bins)
        requests = {i: _FitRequest(kept[i], lo, hi, 1, False) for i, lo, hi in zip(order, los, his, strict=True)}

    order = list(requests)
    fits = _run_fits([requests[i] for i in order], device) if order else []
    for i, (alpha, distance, index) in zip(order, fits, strict=True):
        data = requests[i].data
        if index < 0 or not math.isfinite(alpha):
            reason = "empty xmin window" if estimator == "xmin_peak" else "no valid xmin candidate"
            outcomes[i] = _failed(reason, data.numel())
            continue
        xmin = float(data[index])
        warning = ""
        if alpha < OVER_TRAINED_THRESH:
            warning = "over-trained"
        elif alpha > UNDER_TRAINED_THRESH:
            warning = "under-trained"
        outcomes[i] = FitOutcome(
            alpha=alpha,
            D=distance,
            xmin=xmin,
            sigma=(alpha - 1.0) / math.sqrt(data.numel() - index),
            num_pl_spikes=int((spectra[i] >= xmin).sum()),
            num_fit_evals=data.numel(),
            status="success",
            warning=warning,
        )
    return outcomes  # type: ignore[return-value]
