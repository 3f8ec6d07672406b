"""What the plots of `analyze --plot` and `allocate --plot` draw: every eigenvalue, the top-k, whole ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import alphalora
from alphalora.allocation import plots as allocation_plots
from tests.tiny_models import build, save_tiny


@pytest.fixture
def drawn(monkeypatch):
    """The figures the allocation plots save, kept open for the test to read."""
    figures = []
    save = allocation_plots._save

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(allocation_plots, "_save", keep)
    return figures


def test_the_esd_histogram_holds_the_smallest_and_the_largest_eigenvalue(tmp_path, monkeypatch):
    """np.logspace's end edges can land just inside the extremes (here both), and a histogram drops what falls
    outside its edges: the largest eigenvalue is the top of the fitted tail."""
    from matplotlib.axes import Axes

    from alphalora.spectral.plots import plot_esd

    report = alphalora.analyze(build("llama"), precision="fp64", device="cpu", progress=False)
    name = report.matrices[0].name
    evals = np.concatenate([[3.6405739713909955e-08], np.logspace(-6, 1, 30), [86.90798329580998]])
    report.eigenvalues[name] = torch.tensor(evals)
    counted = []
    hist = Axes.hist

    def counting_hist(ax, values, bins=None, **options):
        counted.append(int(np.histogram(values, bins=bins)[0].sum()))
        return hist(ax, values, bins=bins, **options)

    monkeypatch.setattr(Axes, "hist", counting_hist)
    plot_esd(report, name, tmp_path / "esd.png")
    assert counted == [len(evals)]


def test_the_allocation_plot_marks_each_layers_top_k(tmp_path, drawn):
    plan = alphalora.allocate(alphas=[2.0, 3.0, 4.0, 6.0], budget=12, top_k=2)
    allocation_plots.plot_allocation(plan, tmp_path / "plan.png")
    experts_axes = drawn[0].axes[0]
    top_k = [line for line in experts_axes.lines if line.get_label().startswith("top-k")]
    assert len(top_k) == 1 and list(top_k[0].get_ydata()) == plan.top_k_per_layer
    assert 1 in plan.top_k_per_layer  # a layer with one expert: its top-k is 1, not the 2 asked for
    legend = [text.get_text() for text in experts_axes.get_legend().get_texts()]
    assert legend == ["top-k (experts per token)", "experts", "layer alpha"]
    assert experts_axes.get_ylim()[1] > max(plan.experts_per_layer)  # room for the legend above the bars


def test_the_hetero_plot_gives_whole_ranks_and_names_its_axis(tmp_path, drawn):
    model = save_tiny("llama", tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat", "completion": " sat on the mat"}) + "\n"
                            for _ in range(8)))
    plan = alphalora.allocate(method="hetero", model_dir=str(model), data=str(data), budget=600, proxy="constant",
                              ranks=[2], proxy_batches=1, proxy_batch_size=2, progress=False)
    allocation_plots.plot_allocation(plan, tmp_path / "hetero.png")
    ranks_axes = drawn[0].axes[1]
    ticks = [tick for tick in ranks_axes.get_yticks() if ranks_axes.get_ylim()[0] <= tick <= ranks_axes.get_ylim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    assert ranks_axes.get_xlabel().startswith("candidate")


def test_esd_bins_of_a_single_distinct_eigenvalue_hold_it():
    """Every eigenvalue equal (a multiple of an orthogonal matrix): the edges were all that value, which a
    histogram refuses; one bin around it now."""
    import numpy as np

    from alphalora.spectral.plots import log_bins

    edges = log_bins(np.full(16, 2.5))
    assert len(edges) == 2 and edges[0] < 2.5 < edges[1]
    edges = log_bins(np.array([1.0, 3.0, 9.0]), count=5)
    assert edges[0] == 1.0 and edges[-1] == 9.0 and np.all(np.diff(edges) > 0)
