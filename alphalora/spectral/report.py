"""The analysis report: per-matrix fits and metrics, per-layer scores; JSON and CSV on disk."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from alphalora._io import check_format_version, read_json, write_text_atomic

FORMAT_VERSION = 1
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
    """The score of one transformer block: an aggregate of its matrices' alphas."""

    layer: int
    alpha: float
    n_matrices: int
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

    def layer_alphas(self) -> list[float]:
        """Layer scores in block order (the input of AlphaLoRA's allocation)."""
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
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def to_csv(self, path: str | Path) -> None:
        """One row per matrix, WeightWatcher-style columns; failed fits leave cells empty."""
        columns = [f.name for f in fields(MatrixReport)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for m in self.matrices:
            row = asdict(m)
            row["shape"] = "x".join(str(s) for s in m.shape)
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        write_text_atomic(path, buffer.getvalue())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralReport:
        check_format_version(data, FORMAT_VERSION, "analysis report", "`alphalora analyze`", ReportFormatError)
        try:
            matrices = [MatrixReport(**m) for m in data["matrices"]]
            layers = [LayerReport(**layer) for layer in data["layers"]]
            return cls(
                model=data["model"], estimator=data["estimator"], precision=data["precision"],
                device=data.get("device", "cpu"), aggregation=data.get("aggregation", "mean"),
                options=data.get("options", {}), matrices=matrices, layers=layers,
            )
        except (KeyError, TypeError) as error:
            raise ReportFormatError(f"malformed analysis report: {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> SpectralReport:
        return cls.from_dict(read_json(path, "report", "`alphalora analyze`", ReportFormatError))


def layer_scores(matrices: list[MatrixReport], aggregation: str = "mean") -> list[LayerReport]:
    """Aggregates the successful matrix alphas of each block into one layer score."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    by_layer: dict[int, list[MatrixReport]] = {}
    for m in matrices:
        if m.layer is not None and m.ok and m.alpha is not None:
            by_layer.setdefault(m.layer, []).append(m)
    return [
        LayerReport(
            layer=layer,
            alpha=float(AGGREGATIONS[aggregation]([m.alpha for m in members])),
            n_matrices=len(members),
            alphas_by_role={m.role: m.alpha for m in members},
        )
        for layer, members in sorted(by_layer.items())
    ]
