"""`analyze`: a model's weight spectra -> power-law fits and metrics -> a SpectralReport."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alphalora._device import default_device

from .eigenvalues import PRECISIONS, eigenvalues
from .estimators import ESTIMATORS, fit_spectra
from .metrics import spectrum_metrics
from .report import AGGREGATIONS, MatrixReport, SpectralReport, layer_scores
from .weights import WeightEntry, WeightSourceError, checkpoint_weights, module_weights

# WeightWatcher 0.7.7's layer filters (constants.py): number of eigenvalues and larger side.
WW_MIN_EVALS = 8
WW_MAX_EVALS = 15000
WW_MAX_N = 50000


class AnalysisError(ValueError):
    """The analysis cannot start: bad arguments or a model with nothing to analyse."""


def _skip_reason(entry: WeightEntry, estimator: str) -> str | None:
    m, n = entry.num_eigenvalues, max(entry.shape)
    if estimator == "ww":
        if m < WW_MIN_EVALS:
            return f"skipped: {m} eigenvalues < min_evals {WW_MIN_EVALS}"
        if m > WW_MAX_EVALS:
            return f"skipped: {m} eigenvalues > max_evals {WW_MAX_EVALS}"
        if n > WW_MAX_N:
            return f"skipped: larger side {n} > max_N {WW_MAX_N}"
    elif m < 2:
        return f"skipped: {m} eigenvalue(s), a fit needs at least 2"
    return None


def _model_name(model_or_path: nn.Module | str | Path) -> str:
    if isinstance(model_or_path, nn.Module):
        config = getattr(model_or_path, "config", None)
        return getattr(config, "_name_or_path", "") or type(model_or_path).__name__
    return str(model_or_path)


def _resolve_device(device: str | torch.device | None) -> str:
    if device is None:
        return default_device()
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnalysisError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def analyze(
    model_or_path: nn.Module | str | Path,
    estimator: str = "xmin_peak",
    precision: str = "fp32",
    device: str | torch.device | None = None,
    *,
    include_embeddings: bool = False,
    aggregation: str = "mean",
    log_lower_bound: bool = True,
    evals_threshold: float | None = None,
    progress: bool = True,
) -> SpectralReport:
    """Fits a power law to the ESD of every weight matrix of a model and scores each layer.

    `model_or_path` is a `transformers` model (or any `nn.Module`) or a Hugging Face model
    folder, read tensor by tensor. The default estimator is AlphaLoRA's (`xmin_peak`); `ww`
    reproduces WeightWatcher 0.7.7's `analyze()`. Layer scores are the `aggregation` of the
    block's matrix alphas (AlphaLoRA: the mean).
    """
    if estimator not in ESTIMATORS:
        raise AnalysisError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if precision not in PRECISIONS:
        raise AnalysisError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if aggregation not in AGGREGATIONS:
        raise AnalysisError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    device = _resolve_device(device)
    if isinstance(model_or_path, nn.Module):
        entries = module_weights(model_or_path, include_embeddings)
    else:
        try:
            entries = checkpoint_weights(model_or_path, include_embeddings)
        except WeightSourceError as error:
            raise AnalysisError(str(error)) from error
    if not entries:
        hint = "" if include_embeddings else " (embeddings and LM head are left out unless include_embeddings)"
        raise AnalysisError(f"no 2-D weight matrices to analyse in {_model_name(model_or_path)}{hint}")

    skip = [_skip_reason(e, estimator) for e in entries]
    todo = [i for i, reason in enumerate(skip) if reason is None]
    with tqdm(total=len(todo), desc="eigenvalues", unit="matrix", disable=not progress) as bar:
        spectra = eigenvalues([entries[i] for i in todo], precision, device, on_matrix_done=bar.update)
    fittable = [i for i, s in zip(todo, spectra, strict=True) if isinstance(s, torch.Tensor)]
    by_entry = dict(zip(todo, spectra, strict=True))
    outcomes = fit_spectra(
        [by_entry[i] for i in fittable], estimator, precision, device,
        log_lower_bound=log_lower_bound, evals_threshold=evals_threshold,
    )
    fits = dict(zip(fittable, outcomes, strict=True))

    matrices = []
    for i, entry in enumerate(entries):
        base: dict[str, Any] = {
            "name": entry.name, "layer": entry.layer, "role": entry.role, "kind": entry.kind,
            "shape": list(entry.shape), "num_evals": entry.num_eigenvalues,
        }
        empty = dict.fromkeys(
            ["num_fit_evals", "alpha", "D", "xmin", "sigma", "num_pl_spikes", "lambda_max", "norm",
             "log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank",
             "matrix_rank", "entropy"]
        )
        if skip[i] is not None:
            matrices.append(MatrixReport(**base, **empty, status=skip[i]))
            continue
        spectrum = by_entry[i]
        if not isinstance(spectrum, torch.Tensor):
            matrices.append(MatrixReport(**base, **empty, status=f"failed: {spectrum}"))
            continue
        fit = fits[i]
        metrics = spectrum_metrics(spectrum, fit.alpha, max(entry.shape))
        matrices.append(
            MatrixReport(
                **base, num_fit_evals=fit.num_fit_evals, alpha=fit.alpha, D=fit.D, xmin=fit.xmin,
                sigma=fit.sigma, num_pl_spikes=fit.num_pl_spikes, **metrics,
                status=fit.status, warning=fit.warning,
            )
        )
    return SpectralReport(
        model=_model_name(model_or_path),
        estimator=estimator,
        precision=precision,
        device=device,
        aggregation=aggregation,
        options={
            "include_embeddings": include_embeddings,
            "log_lower_bound": log_lower_bound,
            "evals_threshold": evals_threshold,
        },
        matrices=matrices,
        layers=layer_scores(matrices, aggregation),
        eigenvalues={entries[i].name: by_entry[i] for i in fittable},
    )
