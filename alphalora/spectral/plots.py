"""Plots of a SpectralReport: alpha per layer, and ESDs on log-log axes with the fitted tail."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alphalora._io import atomic_path

from .report import SpectralReport


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only (layers: 0, 1 for two of them, not steps of 0.2)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short_model_name(model: str) -> str:
    parts = Path(model).parts
    return "/".join(parts[-2:]) if parts else model


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_layer_alphas(report: SpectralReport, path: str | Path) -> Path:
    """Layer scores with each block's matrix alphas behind them; the 2 and 6 bands of HT-SR."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(report.layers) + 3), 4))
    for m in report.matrices:
        if m.layer is not None and m.ok:  # a degenerate fit's alpha (noise, huge) would hide the rest
            ax.scatter(m.layer, m.alpha, s=12, color="0.6", zorder=1)
    layers = [layer.layer for layer in report.layers]
    ax.plot(layers, report.layer_alphas(), marker="o", color="C0", zorder=2,
            label=f"layer {report.aggregation} alpha")
    ax.axhline(2.0, color="C3", linestyle=":", linewidth=1, label="alpha = 2 (over-trained below)")
    ax.axhline(6.0, color="C2", linestyle=":", linewidth=1, label="alpha = 6 (under-trained above)")
    ax.set_xlabel("layer")
    integer_ticks(ax.xaxis)
    ax.set_ylabel("power-law alpha")
    ax.set_title(f"{_short_model_name(report.model)}: {report.estimator} alpha per layer")
    ax.legend(fontsize=8)
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def plottable_matrices(report: SpectralReport) -> set[str]:
    """The matrices with a spectrum to plot: eigenvalues kept in the report, some of them positive (a failed
    matrix, NaN or integer weights, has none; an all-zero one has no positive eigenvalue)."""
    return {name for name, evals in report.eigenvalues.items() if bool((evals > 0).any())}


def plot_esd(report: SpectralReport, name: str, path: str | Path) -> Path:
    """The ESD of one matrix on log-log axes, with the fitted power-law tail from xmin."""
    matrix = next((m for m in report.matrices if m.name == name), None)
    if matrix is None or name not in plottable_matrices(report):
        raise KeyError(f"no spectrum to plot for matrix {name!r} in this report (a failed or all-zero matrix, or a "
                       "report loaded from JSON, which keeps no eigenvalues)")
    evals = report.eigenvalues[name].numpy()
    evals = evals[evals > 0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(evals, bins=log_bins(evals), density=True, color="C0", alpha=0.6, label="ESD")
    if matrix.alpha is not None and matrix.xmin is not None:
        a, xmin = matrix.alpha, matrix.xmin
        tail_fraction = (evals >= xmin).mean()
        x = np.logspace(np.log10(xmin), np.log10(evals.max()), 100)
        ax.plot(x, tail_fraction * (a - 1) / xmin * (x / xmin) ** (-a), color="C3",
                label=f"power law, alpha = {a:.3f}")
        ax.axvline(xmin, color="C3", linestyle="--", linewidth=1, label=f"xmin = {xmin:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue of W^T W")
    ax.set_ylabel("density")
    ax.set_title(f"{name} ({matrix.shape[0]}x{matrix.shape[1]})", fontsize=9)
    ax.legend(fontsize=8)
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def log_bins(values: np.ndarray, count: int = 80) -> np.ndarray:
    """`count` - 1 log-spaced bins from the smallest value to the largest, both ends exactly: 10**log10(x) can
    land beside x, and a histogram drops what falls outside its edges (lambda_max, the tail's top, among them)."""
    low, high = values.min(), values.max()
    if low == high:  # one distinct value (a multiple of an orthogonal matrix): one bin around it
        return np.array([low / 1.5, high * 1.5])
    edges = np.logspace(np.log10(low), np.log10(high), count)
    edges[0], edges[-1] = low, high
    return edges


def default_esd_matrices(report: SpectralReport, count: int = 2) -> list[str]:
    """The matrices with the smallest and the largest alpha: the two ends worth a look (of those with a spectrum to
    plot: none for a report loaded from JSON, which keeps no eigenvalues)."""
    plottable = plottable_matrices(report)
    fitted = sorted((m for m in report.matrices if m.alpha is not None and m.name in plottable), key=lambda m: m.alpha)
    if not fitted:
        return []
    chosen = fitted[: count // 2] + fitted[len(fitted) - (count - count // 2):]
    return list(dict.fromkeys(m.name for m in chosen))


def write_plots(report: SpectralReport, out_dir: str | Path, matrices: Sequence[str] | None = None) -> list[Path]:
    """Writes layer_alpha.png and esd_<matrix>.png for `matrices` (default: both alpha extremes, where the report
    kept their eigenvalues). ValueError, before any file is written, for a named matrix with no spectrum to plot."""
    if matrices is not None:
        missing = [name for name in matrices if name not in plottable_matrices(report)]
        if missing:
            raise ValueError(f"no spectrum to plot for {missing[:3]}: a failed or all-zero matrix, or a report loaded "
                             "from JSON, which keeps no eigenvalues (analyse the model again to plot its ESDs)")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if report.layers:
        written.append(plot_layer_alphas(report, folder / "layer_alpha.png"))
    for name in matrices if matrices is not None else default_esd_matrices(report):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        written.append(plot_esd(report, name, folder / f"esd_{safe}.png"))
    return written
