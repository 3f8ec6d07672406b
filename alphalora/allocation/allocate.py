"""`allocate`: layer alphas or a preset -> a Plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from alphalora._numbers import takes_numpy_scalars
from alphalora.spectral.report import SpectralReport, why_no_alpha
from alphalora.spectral.roles import expert_index, is_projection, ordered_roles

from .expert_counts import (
    AllocationError,
    alpha_power_counts,
    default_top_k,
    group_counts,
    positive_number,
    real_numbers,
    uniform_counts,
    whole_number,
)
from .plan import DEFAULT_TARGET_MODULES, METHODS, Plan, RouterSettings

DEFAULT_EXPERT_BUDGET = 160  # AlphaLoRA's T: 5 experts a layer on average over 32 layers (MoLA's 2468)
DEFAULT_BETA = 2.5  # AlphaLoRA's exponent: n_l ~ alpha_l ** beta
DEFAULT_ROUNDING = "largest-remainder"
MOE_METHODS = "alphalora, mola and uniform"
# Options hetero allocation does not read: their defaults, and what to pass instead
_NOT_HETERO = {
    "report": (None, f"--report (report) gives {MOE_METHODS} their layer alphas; hetero scores --model "
                     "itself (--proxy alpha reads its weight spectra)"),
    "alphas": (None, f"--alphas (alphas) applies to {MOE_METHODS}; hetero scores --model itself"),
    "preset": (None, "--preset (preset) applies to mola"),
    "beta": (None, "--beta (beta) applies to alphalora"),
    "rounding": (None, "--rounding (rounding) applies to alphalora"),
    "top_k": (2, f"--top-k (top_k) applies to {MOE_METHODS}; hetero plans have one expert per module"),
    "num_layers": (None, "--num-layers (num_layers) applies to mola and uniform; hetero reads the layers of --model"),
    "base_model": (None, f"--base-model (base_model) applies to {MOE_METHODS}; hetero records --model (model_dir)"),
    "rank": (8, f"--rank (rank) applies to {MOE_METHODS}; for hetero pass --ranks (ranks=[...])"),
    "router": (None, f"--router and --aux-loss-coef (router) apply to {MOE_METHODS}; hetero plans have one expert "
                     "per module and no router"),
}


def _layer_alphas(report: SpectralReport | str | Path | None, alphas: Sequence[float] | None, method: str):
    """The layer alphas (None for a block without a fit) and the report they came from, checked.

    A report's layers must be its blocks 0..L-1 in order; AlphaLoRA also needs every one of them fitted.
    """
    if report is not None and alphas is not None:
        raise AllocationError("give either a report or a list of alphas, not both")
    if report is None:
        return (real_numbers(alphas, "layer alphas (--alphas)") if alphas is not None else None), None
    if not isinstance(report, SpectralReport):
        report = SpectralReport.load(report)
    if not report.layers:
        raise AllocationError(f"the report for {report.model} has no layer scores to allocate from")
    _check_block_order(report)
    if method == "alphalora":
        _check_every_layer_fitted(report)
    return report.layer_alphas(), report


def _check_block_order(report: SpectralReport) -> None:
    """Refuses layers other than 0, 1, ..., L-1 in order: any gap would shift every later layer's count."""
    found = [layer.layer for layer in report.layers]
    if found == list(range(len(found))):
        return
    missing = sorted(set(range(max(found) + 1)) - set(found))
    problem = f"layer(s) {', '.join(map(str, missing))} missing" if missing else "out of order or repeated"
    raise AllocationError(
        f"the report for {report.model} lists layers {found}, not 0 to {max(found)} in order ({problem}); "
        "re-create it with `alphalora analyze`, which gives every block a layer entry"
    )


def _check_every_layer_fitted(report: SpectralReport) -> None:
    """Refuses layers without an alpha (AlphaLoRA has nothing to weigh them by), naming each and why."""
    unfitted = [layer.layer for layer in report.layers if layer.alpha is None]
    if unfitted:
        causes = "; ".join(f"layer {n} has no fitted alpha: {why_no_alpha(report.matrices, n)}" for n in unfitted)
        raise AllocationError(f"{causes}. Analyse a model whose weights there can be fitted (NaN/Inf or quantized "
                              "ones cannot: each matrix's status is in the report), or pass the layer alphas "
                              "yourself (--alphas, alphas=[...])")


def _refuse_unread(method: str, preset: str | None, beta: float | None, rounding: str | None) -> None:
    """Refuses another method's options rather than ignoring them: the preset is MoLA's, beta and rounding
    AlphaLoRA's (None: not given)."""
    unread = [name for name, value, owner in (("preset", preset, "mola"), ("beta", beta, "alphalora"),
                                              ("rounding", rounding, "alphalora"))
              if value is not None and method != owner]
    if unread:
        raise AllocationError(f"{', '.join(unread)}: not read by method {method!r} (preset is MoLA's, beta and "
                              "rounding AlphaLoRA's); leave them out")


def _checked_counts(budget, max_experts, top_k, num_layers) -> tuple[int | None, int | None, int, int | None]:
    """The MoE methods' whole-number options as ints (numpy integers accepted), refused unless positive and whole."""
    return (
        None if budget is None else whole_number(budget, "the expert budget"),
        None if max_experts is None else whole_number(max_experts, "--max-experts (max_experts)"),
        whole_number(top_k, "--top-k (top_k)"),
        None if num_layers is None else whole_number(num_layers, "--num-layers (num_layers)"),
    )


def _report_roles(report: SpectralReport) -> list[str]:
    """The default target modules for a report: the roles of its block matrices that adapter layers can wrap.

    A mixture of experts' router (role "router": transformers' TopKRouter) and its experts' matrices (per-expert
    names `...experts.<e>.<proj>`, slices of fused 3-D parameters) are no nn.Linear to wrap, so a role is kept
    only where some matrix outside the experts has it: q, k, v, o for Mixtral; also gate, up, down for a
    Qwen2-MoE or DeepSeek shared expert, or a dense MLP block beside the mixture ones."""
    found = _wrappable_roles(report)
    if not found:
        raise AllocationError(f"the blocks of {report.model} hold only a mixture of experts' routers and experts, "
                              "which adapters cannot wrap; name the modules to adapt (--target-modules, "
                              "target_modules=[...])")
    return ordered_roles(found)


def _wrappable_roles(report: SpectralReport) -> set[str]:
    return {m.role for m in report.matrices
            if m.layer is not None and m.role != "router" and expert_index(m.name) is None
            and is_projection(m.shape)}


def _check_targets(report: SpectralReport, targets: Sequence[str]) -> None:
    """AllocationError for a target role the report's blocks have only on a mixture of experts' router or fused
    experts, which `train` would find nothing to wrap for."""
    unwrappable = {m.role for m in report.matrices if m.layer is not None} - _wrappable_roles(report)
    named = [target for target in targets if target in unwrappable]
    if named:
        raise AllocationError(f"target modules {named} are, in {report.model}, only a mixture of experts' router or "
                              "fused experts (or a scalar gate), which adapters cannot wrap; leave them out (the "
                              f"default targets are {_report_roles(report)})")


@takes_numpy_scalars
def allocate(
    report: SpectralReport | str | Path | None = None,
    *,
    alphas: Sequence[float] | None = None,
    method: str = "alphalora",
    preset: str | None = None,
    budget: int | None = None,
    beta: float | None = None,
    rounding: str | None = None,
    max_experts: int | None = None,
    top_k: int = 2,
    num_layers: int | None = None,
    base_model: str | None = None,
    target_modules: Sequence[str] | None = None,
    rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    router: RouterSettings | None = None,
    **hetero,
) -> Plan:
    """Turns an analysis (AlphaLoRA), a MoLA preset or a uniform split into an adapter plan.

    - ``alphalora``: experts per layer proportional to alpha_l ** beta (default 2.5), ``budget`` in total
      (default 160), ``rounding`` "largest-remainder" (default) or "compat".
    - ``mola``: ``preset`` (e.g. "2468") splits the layers into equal groups, each layer getting
      its group's digit as its expert count (as `alphalora allocate` does); with ``budget`` the
      pattern is scaled to that total.
    - ``uniform``: ``budget`` (default 160) spread evenly.
    - ``hetero``: HeteroLoRA; ``budget`` is trainable parameters (required), and the keyword arguments of
      `alphalora.allocation.hetero.allocate_hetero` (``model_dir``, ``data``, ``proxy``, ``ranks``,
      ``shortcuts``, ``dynamic_every``, ...) are passed through; the other methods' options (``report``,
      ``rank``, ``top_k``, ``router``, ...) are refused rather than ignored, as are ``preset``, ``beta`` and
      ``rounding`` given to a method that does not read them.
    ``max_experts`` caps each layer's count for ``alphalora`` with largest-remainder rounding, and
    is refused elsewhere. The layer count comes from the report, the alphas, or ``num_layers``. ``target_modules``
    defaults to every role the report found in the blocks (q, k, v, o, gate, up, down for Llama;
    q, k, v, o, up, down for BERT) but a mixture of experts' router and the roles only its experts have (q, k, v,
    o for Mixtral; see `_report_roles`), or to the Llama set without a report; a string is read as the CLI reads
    it, comma-separated ("q,v", or one role "q_proj"), not as its characters.
    """
    if isinstance(target_modules, str):
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    if method not in METHODS:
        raise AllocationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if max_experts is not None and (method != "alphalora" or rounding not in (None, DEFAULT_ROUNDING)):
        where = f"--method {method}" if method != "alphalora" else f"--rounding {rounding}"
        raise AllocationError(f"--max-experts (max_experts) caps layers only for --method alphalora with --rounding "
                              f"largest-remainder; {where} would ignore it, so leave it out")
    if method == "hetero":
        from .hetero import allocate_hetero

        given = dict(report=report, alphas=alphas, preset=preset, beta=beta, rounding=rounding, top_k=top_k,
                     num_layers=num_layers, base_model=base_model, rank=rank,
                     router=None if router == RouterSettings() else router)
        ignored = [why for name, (default, why) in _NOT_HETERO.items()
                   if (given[name] is not None if default is None else given[name] != default)]
        if ignored:
            raise AllocationError("; ".join(ignored))
        if "model_dir" not in hetero or "data" not in hetero:
            raise AllocationError("hetero allocation scores modules on a model and data: pass model_dir and data")
        return allocate_hetero(hetero.pop("model_dir"), hetero.pop("data"), budget=budget, lora_alpha=lora_alpha,
                               lora_dropout=lora_dropout, target_modules=target_modules, **hetero)
    if hetero:
        raise AllocationError(f"options {sorted(hetero)} apply only to method='hetero'")
    _refuse_unread(method, preset, beta, rounding)
    if budget is None and method in ("alphalora", "uniform"):
        budget = DEFAULT_EXPERT_BUDGET
    budget, max_experts, top_k, num_layers = _checked_counts(budget, max_experts, top_k, num_layers)
    beta = positive_number(DEFAULT_BETA if beta is None else beta, "beta")
    rounding = DEFAULT_ROUNDING if rounding is None else rounding
    layer_alphas, loaded = _layer_alphas(report, alphas, method)
    if layer_alphas is not None:
        if num_layers is not None and num_layers != len(layer_alphas):
            raise AllocationError(f"num_layers {num_layers} does not match the {len(layer_alphas)} layer alphas")
        num_layers = len(layer_alphas)
    source: dict = {"budget": budget}
    if method == "alphalora":
        if layer_alphas is None:
            raise AllocationError("AlphaLoRA needs layer alphas: pass a report (--report) or --alphas")
        counts = alpha_power_counts(layer_alphas, budget, beta, rounding, max_experts=max_experts)
        source.update(beta=beta, rounding=rounding, max_experts=max_experts, layer_alphas=layer_alphas)
    else:
        if num_layers is None:
            raise AllocationError(f"{method} needs the number of layers: pass a report, --alphas or --num-layers")
        if method == "mola":
            if preset is None:
                raise AllocationError("MoLA needs a preset such as 2468, 8642, 5555, 2882 or 8228")
            counts = group_counts(preset, num_layers, budget)
            source.update(preset=preset)
        else:
            counts = uniform_counts(num_layers, budget)
        if layer_alphas is not None:
            source.update(layer_alphas=layer_alphas)
    if loaded is not None:
        source.update(report_model=loaded.model, estimator=loaded.estimator)
    if target_modules is None:
        target_modules = _report_roles(loaded) if loaded is not None else DEFAULT_TARGET_MODULES
    elif loaded is not None:
        _check_targets(loaded, target_modules)
    return Plan(
        method=method,
        base_model=base_model or (loaded.model if loaded is not None else ""),
        experts_per_layer=counts,
        top_k_per_layer=default_top_k(counts, top_k),
        target_modules=list(target_modules),
        rank=rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        router=router or RouterSettings(),
        source=source,
    )
