"""`analyze`: a model's weight spectra -> power-law fits and metrics -> a SpectralReport."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alphalora._device import resolve_device
from alphalora._numbers import is_number, takes_numpy_scalars
from alphalora.model_source import model_folder

from .eigenvalues import PRECISIONS, eigenvalues
from .estimators import ESTIMATORS, fit_spectra
from .metrics import spectrum_metrics
from .rank_deficient import svd_spectra, unresolved_by_gram
from .refine import refine_in_fp64
from .report import AGGREGATIONS, MatrixReport, SpectralReport, layer_scores
from .roles import block_stack
from .weights import WeightEntry, WeightSourceError, checkpoint_weights, module_weights

# WeightWatcher 0.7.7's layer filters (constants.py): number of eigenvalues and larger side.
WW_MIN_EVALS = 8
WW_MAX_EVALS = 15000
WW_MAX_N = 50000


class AnalysisError(ValueError):
    """The analysis cannot start: bad arguments or a model with nothing to analyse."""


def _skip_reason(entry: WeightEntry, estimator: str) -> str | None:
    if not entry.floating:
        return "skipped: integer (quantized) weight"
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


def _refuse_several_block_stacks(entries: list[WeightEntry], model_name: str) -> None:
    """One stack of numbered blocks only: an encoder-decoder model's encoder block i and decoder block i
    would otherwise be scored as one layer i."""
    stacks = sorted({stack for e in entries if (stack := block_stack(e.name)) is not None})
    if len(stacks) > 1:
        raise AnalysisError(
            f"{model_name} has {len(stacks)} stacks of numbered blocks ({', '.join(f'{s}.N' for s in stacks)}), "
            "as encoder-decoder models (T5, BART) do, and their blocks N would be merged into one layer N; "
            "alphalora scores the layers of one stack: decoder-only LMs (Llama, GPT-2, Qwen2, ...) and "
            "encoder-only models (BERT, RoBERTa). Analyse such a model, or pass one stack of a live model "
            "as an nn.Module (e.g. model.get_encoder())"
        )


@contextlib.contextmanager
def _unreadable_weights_stop_the_analysis() -> Iterator[None]:
    # Checkpoint tensors are read lazily: a damaged one can surface while the eigenvalues are computed.
    try:
        yield
    except WeightSourceError as error:
        raise AnalysisError(str(error)) from error


def _check_options(estimator: str, include_embeddings, log_lower_bound, evals_threshold) -> None:
    """AnalysisError for an option of the wrong type, or one the estimator does not read (it would be recorded in
    the report as though it had been applied)."""
    for name, value in (("include_embeddings", include_embeddings), ("log_lower_bound", log_lower_bound)):
        if not isinstance(value, bool):
            raise AnalysisError(f"{name} must be True or False, got {value!r}")
    if not log_lower_bound and estimator != "xmin_peak":
        raise AnalysisError(f"log_lower_bound=False (--intended-lower-bound) changes the xmin_peak estimator's window "
                            f"only; the {estimator} estimator has none")
    if evals_threshold is not None and (not is_number(evals_threshold) or evals_threshold < 0):
        raise AnalysisError(f"evals_threshold must be a finite number >= 0 (or None: the estimator's own), got "
                            f"{evals_threshold!r}")


def _model_name(model_or_path: nn.Module | str | Path) -> str:
    if isinstance(model_or_path, nn.Module):
        config = getattr(model_or_path, "config", None)
        return getattr(config, "_name_or_path", "") or type(model_or_path).__name__
    return str(model_or_path)


@takes_numpy_scalars
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

    `model_or_path` is a `transformers` model (or any `nn.Module`), a Hugging Face model folder
    or a Hub id (`org/name`, fetched into the Hub cache), read tensor by tensor. The default
    estimator is AlphaLoRA's (`xmin_peak`); `ww` reproduces WeightWatcher 0.7.7's `analyze()`.
    Layer scores are the `aggregation` of the block's matrix alphas (AlphaLoRA: the mean).

    A mixture of experts' block counts every expert's matrices: fused 3-D expert parameters (transformers 5's
    `mlp.experts.gate_up_proj`, `down_proj`) and per-expert checkpoint tensors alike give one matrix per expert
    and projection, named `<experts>.<expert>.gate_proj|up_proj|down_proj` (a fused gate_up split into its gate
    and up halves, as per-expert checkpoints hold them), and its router (role "router") is one more matrix.
    So a layer's alpha is the mean over all of its matrices, each expert's included (AlphaLoRA's rule over
    every matrix of a block), and a model analysed live and from its checkpoint gives the same numbers.

    `precision` is that of the Gram matrices and their eigensolve. An fp32 eigenvalue is off by
    up to M * eps32 * lambda_max (M eigenvalues), so in fp32 the matrices whose fit reads
    eigenvalues under that noise floor (see `refine.reads_fp32_noise`) are recomputed in fp64
    and refitted; their reports say `refined_fp64`. A matrix rank-deficient to working precision (its
    fp64 Gram spectrum's smallest eigenvalues are noise: see `rank_deficient`) gets the squared singular
    values of an fp64 SVD, as WeightWatcher's, so its rank, entropy and fits read no eigensolver noise. In
    fp32, matrix_rank and entropy are read off the fp32 spectrum where no fit needed fp64: a singular value
    under about 3e-4 of the largest is then noise, and the rank may count it either way.
    """
    if estimator not in ESTIMATORS:
        raise AnalysisError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if precision not in PRECISIONS:
        raise AnalysisError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if aggregation not in AGGREGATIONS:
        raise AnalysisError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    _check_options(estimator, include_embeddings, log_lower_bound, evals_threshold)
    device = resolve_device(device, AnalysisError)
    if isinstance(model_or_path, nn.Module):
        entries = module_weights(model_or_path, include_embeddings)
    else:
        with _unreadable_weights_stop_the_analysis():
            entries = checkpoint_weights(model_folder(model_or_path, WeightSourceError), include_embeddings)
    if not entries:
        hint = "" if include_embeddings else " (embeddings and LM head are left out unless include_embeddings)"
        raise AnalysisError(f"no 2-D weight matrices to analyse in {_model_name(model_or_path)}{hint}")
    _refuse_several_block_stacks(entries, _model_name(model_or_path))

    skip = [_skip_reason(e, estimator) for e in entries]
    todo = [i for i, reason in enumerate(skip) if reason is None]
    fit = functools.partial(
        fit_spectra, estimator=estimator, precision=precision, device=device,
        log_lower_bound=log_lower_bound, evals_threshold=evals_threshold,
    )
    refined: dict[int, torch.Tensor] = {}
    with _unreadable_weights_stop_the_analysis():
        with tqdm(total=len(todo), desc="eigenvalues", unit="matrix", disable=not progress) as bar:
            spectra = eigenvalues([entries[i] for i in todo], precision, device, on_matrix_done=bar.update)
        fittable = [i for i, s in zip(todo, spectra, strict=True) if isinstance(s, torch.Tensor)]
        by_entry = dict(zip(todo, spectra, strict=True))
        fits = dict(zip(fittable, fit([by_entry[i] for i in fittable]), strict=True))
        if precision == "fp32":
            refined, refits = refine_in_fp64(
                entries, {i: by_entry[i] for i in fittable}, fits, estimator, device, fit, evals_threshold, progress
            )
            by_entry.update(refined)
            fits.update(refits)
        in_fp64 = fittable if precision == "fp64" else list(refined)
        by_svd = svd_spectra(entries, [i for i in in_fp64 if unresolved_by_gram(by_entry[i])], device)
        if by_svd:
            by_entry.update(by_svd)
            fits.update(zip(by_svd, fit(list(by_svd.values())), strict=True))

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
        outcome = fits[i]
        metrics = spectrum_metrics(spectrum, outcome.alpha, max(entry.shape))
        matrices.append(
            MatrixReport(
                **base, num_fit_evals=outcome.num_fit_evals, alpha=outcome.alpha, D=outcome.D, xmin=outcome.xmin,
                sigma=outcome.sigma, num_pl_spikes=outcome.num_pl_spikes, **metrics,
                status=outcome.status, warning=outcome.warning, refined_fp64=i in refined,
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
