"""The analysis report: per-matrix fits and metrics, per-layer scores; JSON and CSV on disk."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import types
import typing
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from alphalora._io import check_format_version, read_json, write_text_atomic

FORMAT_VERSION = 1
REMAKE = "re-create the report with `alphalora analyze`"
ENTRIES = ("matrices", "layers")  # the report's lists of per-matrix and per-layer objects
AGGREGATIONS = {
    "mean": statistics.fmean,  # AlphaLoRA's layer score
    "median": statistics.median,
    "min": min,
    "max": max,
}


class ReportFormatError(ValueError):
    """A report file that is not a valid alphalora analysis report."""


@dataclass
class MatrixReport:
    """Fit and metrics of one weight matrix."""

    name: str
    layer: int | None
    role: str
    kind: str
    shape: list[int]  # [out_features, in_features]
    num_evals: int
    num_fit_evals: int | None
    alpha: float | None
    D: float | None
    xmin: float | None
    sigma: float | None
    num_pl_spikes: int | None
    lambda_max: float | None
    norm: float | None
    log_norm: float | None
    log_spectral_norm: float | None
    alpha_weighted: float | None
    log_alpha_norm: float | None
    stable_rank: float | None
    matrix_rank: int | None
    entropy: float | None
    status: str
    warning: str = ""
    # fp32 only: its fit read eigenvalues under the fp32 noise floor, so its eigenvalues were recomputed in fp64.
    refined_fp64: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass
class LayerReport:
    """The score of one transformer block: an aggregate of its matrices' alphas.

    Every block the model walk found has one; `alpha` is None (and `n_matrices` 0) where none of
    its matrices has a usable fit (see their `status`).
    """

    layer: int
    alpha: float | None
    n_matrices: int
    # Each role's mean alpha over the block's fitted matrices of that role (those its `alpha` aggregates: failed
    # and skipped fits left out), whatever the aggregation: one matrix per role in a dense block, every expert's
    # in a mixture of experts (its `gate` is the mean over the experts' gate matrices). A role none of whose
    # matrices was fitted is absent.
    alphas_by_role: dict[str, float] = field(default_factory=dict)


@dataclass
class SpectralReport:
    """Everything `analyze` found; `eigenvalues` (by matrix name) stays in memory for plots."""

    model: str
    estimator: str
    precision: str
    device: str
    aggregation: str
    options: dict[str, Any]
    matrices: list[MatrixReport]
    layers: list[LayerReport]
    eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def layer_alphas(self) -> list[float | None]:
        """Layer scores in block order (the input of AlphaLoRA's allocation); None where a block has no fit."""
        return [layer.alpha for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "estimator": self.estimator,
            "precision": self.precision,
            "device": self.device,
            "aggregation": self.aggregation,
            "options": self.options,
            "matrices": [asdict(m) for m in self.matrices],
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_json(self, path: str | Path) -> None:
        """Standard JSON: NaN and Inf, which JSON has no words for, are written as null."""
        write_text_atomic(path, json.dumps(finite_or_null(self.to_dict()), indent=2, allow_nan=False) + "\n")

    def to_csv(self, path: str | Path) -> None:
        """One row per matrix, WeightWatcher-style columns; failed fits leave cells empty."""
        columns = [f.name for f in fields(MatrixReport)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for m in self.matrices:
            row = asdict(m)
            row["shape"] = "x".join(str(s) for s in m.shape)
            writer.writerow({k: ("" if v is None else v) for k, v in finite_or_null(row).items()})
        write_text_atomic(path, buffer.getvalue())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralReport:
        """A report from its JSON form, every field type-checked; NaN/Inf (older reports) read as null."""
        from alphalora.allocation.plan import PLAN_MARK  # (plan.py imports this module)

        check_format_version(data, FORMAT_VERSION, "analysis report", "`alphalora analyze`", ReportFormatError)
        if PLAN_MARK in data:
            raise ReportFormatError("this is an adapter plan (from `alphalora allocate`), not an analysis report; "
                                    "pass the report `alphalora analyze` wrote")
        data = finite_or_null(data)
        values = {"device": "cpu", "aggregation": "mean", "options": {}, **data}
        _check_fields(values, SpectralReport, "the report", skip=("format_version", "eigenvalues", *ENTRIES))
        for key in ENTRIES:
            if not isinstance(values.get(key), list) or not all(isinstance(item, dict) for item in values[key]):
                raise _malformed(f"`{key}` must be a list of objects, got {values.get(key)!r:.80}")
        matrices = [_build(MatrixReport, m, f"matrices[{i}]") for i, m in enumerate(values["matrices"])]
        layers = [_build(LayerReport, layer, f"layers[{i}]") for i, layer in enumerate(values["layers"])]
        for i, layer in enumerate(layers):
            _check_alpha_matches_count(layer, f"layers[{i}] (layer {layer.layer})")
        return cls(
            model=values["model"], estimator=values["estimator"], precision=values["precision"],
            device=values["device"], aggregation=values["aggregation"], options=values["options"],
            matrices=matrices, layers=layers,
        )

    @classmethod
    def load(cls, path: str | Path) -> SpectralReport:
        return cls.from_dict(read_json(path, "report", "`alphalora analyze`", ReportFormatError))


def layer_scores(matrices: list[MatrixReport], aggregation: str = "mean") -> list[LayerReport]:
    """Aggregates the successful matrix alphas of each block into one layer score, and per role into their mean.

    Every block a matrix belongs to gets an entry, so the layers keep their indices; one where no
    matrix succeeded has alpha None and n_matrices 0.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    by_layer: dict[int, list[MatrixReport]] = {}
    for m in matrices:
        if m.layer is not None:
            fitted = by_layer.setdefault(m.layer, [])
            if m.ok and m.alpha is not None:
                fitted.append(m)
    return [
        LayerReport(
            layer=layer,
            alpha=float(AGGREGATIONS[aggregation]([m.alpha for m in members])) if members else None,
            n_matrices=len(members),
            alphas_by_role=_mean_by_role(members),
        )
        for layer, members in sorted(by_layer.items())
    ]


def _mean_by_role(fitted: list[MatrixReport]) -> dict[str, float]:
    """The mean alpha of each role among `fitted` (matrices with a usable fit), roles in the order first met."""
    by_role: dict[str, list[float]] = {}
    for m in fitted:
        by_role.setdefault(m.role, []).append(m.alpha)
    return {role: statistics.fmean(alphas) for role, alphas in by_role.items()}


def why_no_alpha(matrices: list[MatrixReport], layer: int) -> str:
    """Why block `layer` has no score: the statuses of its matrices, counted."""
    members = [m for m in matrices if m.layer == layer]
    if not members:
        return "the report has no matrices in it"
    if any(m.ok for m in members):
        return "the report gives it none although some of its matrices were fitted (was it edited?)"
    statuses = Counter(m.status for m in members)
    listed = "; ".join(f"{count} x {status}" if count > 1 else status for status, count in statuses.items())
    return f"none of its {len(members)} matrices has a usable fit ({listed})"


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or Inf float, however deeply nested, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


def _malformed(problem: str) -> ReportFormatError:
    return ReportFormatError(f"malformed analysis report: {problem}; {REMAKE}")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (a bool is not a number, an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """A field's type hint in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object" if args[1] is Any else f"an object of {_describe(args[1]).removeprefix('a ')}s"
    words = {float: "a number", int: "an integer", str: "a string", bool: "true or false", type(None): "null"}
    return words.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _check_fields(values: dict[str, Any], kind: type, where: str, skip: tuple[str, ...] = ()) -> None:
    """Raises ReportFormatError naming the first missing, unknown or mistyped field of `kind` in `values`."""
    hints = typing.get_type_hints(kind)
    known = {f.name: f for f in fields(kind) if f.name not in skip}
    unknown = sorted(set(values) - set(known) - set(skip))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise _malformed(f"{where} has unknown field(s) {unknown[:5]}{more}")
    for name, spec in known.items():
        if name not in values:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise _malformed(f"{where} has no `{name}`")
            continue
        if not _matches(values[name], hints[name]):
            raise _malformed(f"{where}: `{name}` must be {_describe(hints[name])}, got {values[name]!r}")


def _check_alpha_matches_count(layer: LayerReport, where: str) -> None:
    """A layer has an alpha exactly when some of its matrices were fitted (n_matrices > 0)."""
    if layer.n_matrices < 0:
        raise _malformed(f"{where}: `n_matrices` must be at least 0, got {layer.n_matrices}")
    if layer.alpha is None and layer.n_matrices > 0:
        raise _malformed(f"{where} has no alpha (null, NaN or Inf) although {layer.n_matrices} matrices were fitted")
    if layer.alpha is not None and layer.n_matrices == 0:
        raise _malformed(f"{where} has alpha {layer.alpha:g} although no matrix was fitted (n_matrices 0)")


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    """A MatrixReport or LayerReport from its checked JSON object; `where` names it in errors."""
    name = values.get("name")
    _check_fields(values, kind, f"{where} ({name})" if isinstance(name, str) else where)
    return kind(**values)
