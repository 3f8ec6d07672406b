"""The allocation plot: experts per layer as bars, the layer alphas beside them."""

from __future__ import annotations

from pathlib import Path

from alphalora._io import atomic_path
from alphalora.spectral.plots import integer_ticks

from .plan import Plan

LEGEND_ROOM = 1.3  # the axes reach 1.3 x the data's top, so that the legend covers no bar or point


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return out


def plot_allocation(plan: Plan, path: str | Path) -> Path:
    """Experts per layer (bars, top-k marked) and, when the plan has them, the layer alphas.
    HeteroLoRA plans get the proxy score of every candidate and the rank it was given."""
    if plan.method == "hetero":
        return plot_hetero(plan, path)
    plt = _pyplot()

    layers = list(range(plan.num_layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * plan.num_layers + 3), 4))
    ax.bar(layers, plan.experts_per_layer, color="C0", alpha=0.7, label="experts")
    ax.plot(layers, plan.top_k_per_layer, linestyle="none", marker="_", markersize=14, markeredgewidth=2,
            color="black", label="top-k (experts per token)")
    ax.set_xlabel("layer")
    integer_ticks(ax.xaxis)
    integer_ticks(ax.yaxis)
    ax.set_ylabel("LoRA experts")
    ax.set_ylim(0, LEGEND_ROOM * max(plan.experts_per_layer))
    title = f"{plan.method} allocation: {plan.total_experts} experts"
    if plan.method == "mola":
        title += f" (preset {plan.source.get('preset')})"
    elif plan.method == "alphalora":
        title += f" (beta {plan.source.get('beta')}, {plan.source.get('rounding')})"
    ax.set_title(title)
    alphas = plan.source.get("layer_alphas")
    handles, labels = ax.get_legend_handles_labels()
    if alphas:
        twin = ax.twinx()
        twin.plot(layers, alphas, color="C3", marker="o", label="layer alpha")
        twin.set_ylabel("layer alpha")
        low, high = min(alphas), max(alphas)
        twin.set_ylim(low - 0.05 * (high - low or 1), low + LEGEND_ROOM * (high - low or 1))
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="upper left", ncol=len(labels))
    return _save(fig, path)


def hetero_ranks(plan: Plan) -> dict[str, int]:
    """The rank each candidate runs at now (0: off) in a HeteroLoRA plan."""
    off = set(plan.disabled_modules)
    ranks = {name: plan.rank_pattern.get(name, plan.rank) for name in plan.target_modules}
    ranks.update(plan.shortcuts)
    return {name: 0 if name in off else rank for name, rank in ranks.items()}


def plot_hetero(plan: Plan, path: str | Path) -> Path:
    """Top: every candidate's proxy score, chosen ones coloured; bottom: the rank each was given."""
    plt = _pyplot()
    scores: dict[str, float] = plan.source.get("scores", {})
    ranks = hetero_ranks(plan)
    names = list(scores) or list(ranks)
    chosen = [ranks.get(n, 0) > 0 for n in names]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(8.0, 0.12 * len(names) + 3), 6))
    colours = ["C2" if c else "0.75" for c in chosen]
    top.bar(range(len(names)), [scores.get(n, 0.0) for n in names], color=colours)
    top.set_ylabel(f"{plan.source.get('proxy', 'proxy')} score")
    top.set_title(f"HeteroLoRA: {sum(chosen)} of {len(names)} candidates, "
                  f"{plan.source.get('parameters', '?')} / {plan.source.get('budget', '?')} parameters")
    bottom.bar(range(len(names)), [ranks.get(n, 0) for n in names], color=colours)
    bottom.set_ylabel("rank (0 = off)")
    integer_ticks(bottom.yaxis)
    bottom.set_xlabel("candidate (block.module, or layer shortcut)")
    short = [n.split("layers.")[-1].split("layer.")[-1].split(".h.")[-1] for n in names]
    bottom.set_xticks(range(len(names)), short, rotation=90, fontsize=6)
    return _save(fig, path)
