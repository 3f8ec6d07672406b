"""fp32 spectra whose fit reads eigenvalues under the fp32 noise floor, recomputed in fp64.

An eigenvalue of a float32 Gram matrix is off by up to about M * eps32 * lambda_max (M = its size),
so the smaller ones are noise; the fp32 mode keeps its speed where a fit reads only the larger ones
and recomputes the rest in fp64 (spectral.md §6.2 item 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .eigenvalues import eigenvalues
from .estimators import WW_SMALL_N_CUTOFF, WW_SMALL_N_MIN_TAIL, FitOutcome, filter_threshold
from .weights import WeightEntry

FP32_EPS = torch.finfo(torch.float32).eps
# Numbers of fitted eigenvalues where a fit changes course: none below 2; and in WeightWatcher's, the
# whole spectrum as the tail below 8 and the small-N branch below 20.
NO_FIT_BELOW = 2
WW_BRANCH_COUNTS = (NO_FIT_BELOW, WW_SMALL_N_MIN_TAIL, WW_SMALL_N_CUTOFF)


def fp32_noise_floor(spectrum: torch.Tensor) -> float:
    """The absolute error bound of an eigenvalue of a float32 Gram matrix: M * eps32 * lambda_max."""
    return spectrum.numel() * FP32_EPS * max(float(spectrum[-1]), 0.0) if spectrum.numel() else 0.0


def reads_fp32_noise(
    spectrum: torch.Tensor, estimator: str, fit: FitOutcome, evals_threshold: float | None = None
) -> bool:
    """Whether the fit of an ascending fp32 spectrum could change if its eigenvalues were exact.

    - ``xmin_peak`` histograms every eigenvalue it reads, from the smallest up: noisy if that one is
      under the noise floor, or if any eigenvalue is within the floor of the filter (the set read moves).
    - ``median``: the median eigenvalue (of every eigenvalue; with a filter, of those read, the smallest it
      could be where eigenvalues near the filter make the number read uncertain) is under the floor.
    - ``ww``: the chosen xmin is under the floor, or eigenvalues within the floor of the 1e-5 filter
      could move the kept count across 2, 8 or 20, where WeightWatcher's fit changes course.
    """
    band = fp32_noise_floor(spectrum)
    threshold = filter_threshold(estimator, evals_threshold)
    read = spectrum[spectrum > threshold]
    surely_read = int((spectrum > threshold + band).sum())
    maybe_read = int((spectrum > threshold - band).sum())
    counts = WW_BRANCH_COUNTS if estimator == "ww" else (NO_FIT_BELOW,)
    if any(surely_read < count <= maybe_read for count in counts):
        return True
    if estimator == "xmin_peak":
        return surely_read != maybe_read or (read.numel() > 0 and float(read[0]) < band)
    if estimator == "median":
        if evals_threshold is None:  # the median of every eigenvalue: its index is fixed
            return float(spectrum[spectrum.numel() // 2]) < band
        # The tail is the largest ceil(N/2) eigenvalues read, N anywhere from surely_read to maybe_read.
        return maybe_read > 0 and float(spectrum[spectrum.numel() - (maybe_read + 1) // 2]) < band
    return fit.xmin is not None and fit.xmin < band


def refine_in_fp64(
    entries: Sequence[WeightEntry],
    spectra: dict[int, torch.Tensor],
    fits: dict[int, FitOutcome],
    estimator: str,
    device: str | torch.device,
    fit: Callable[[list[torch.Tensor]], list[FitOutcome]],
    evals_threshold: float | None = None,
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], dict[int, FitOutcome]]:
    """fp64 spectra (Gram and solve) and their fits, by entry index, for the fp32 fits that read noise."""
    noisy = [i for i, spectrum in spectra.items() if reads_fp32_noise(spectrum, estimator, fits[i], evals_threshold)]
    with tqdm(total=len(noisy), desc="fp64 recompute", unit="matrix", disable=not progress or not noisy) as bar:
        exact = eigenvalues([entries[i] for i in noisy], "fp64", device, on_matrix_done=bar.update)
    refined = {i: s for i, s in zip(noisy, exact, strict=True) if isinstance(s, torch.Tensor)}
    return refined, dict(zip(refined, fit(list(refined.values())), strict=True))
