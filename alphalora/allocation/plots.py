"""The allocation plot: experts per layer as bars, the layer alphas beside them."""

from __future__ import annotations

from pathlib import Path

from alphalora._io import atomic_path

from .plan import Plan


def plot_allocation(plan: Plan, path: str | Path) -> Path:
    """Experts per layer (bars, top-k marked) and, when the plan has them, the layer alphas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(plan.num_layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * plan.num_layers + 3), 4))
    ax.bar(layers, plan.experts_per_layer, color="C0", alpha=0.7, label="experts")
    ax.set_xlabel("layer")
    ax.set_ylabel("LoRA experts")
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
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="upper left")
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
