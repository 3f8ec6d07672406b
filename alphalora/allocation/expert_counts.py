"""Integer expert counts per layer: AlphaLoRA's alpha^beta rule and MoLA's layer-group presets."""

from __future__ import annotations

import math
import numbers
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

ROUNDING_MODES = ("largest-remainder", "compat")
MOLA_PRESETS = ("2468", "8642", "5555", "2882", "8228")


class AllocationError(ValueError):
    """Arguments that cannot produce a valid allocation."""


def whole_number(value: Any, what: str) -> int:
    """`value` as an int: refused unless an integer type (not a bool) >= 1, so counts stay whole."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise AllocationError(f"{what} must be positive and whole, got {value!r}")
    return int(value)


def _is_real(value: Any) -> bool:
    """A finite real number of any numeric type (numpy's included), but not a bool or a string."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def positive_number(value: Any, what: str) -> float:
    """`value` as a float: refused unless a finite real number > 0."""
    if not _is_real(value) or value <= 0:
        raise AllocationError(f"{what} must be positive and finite, got {value!r}")
    return float(value)


def real_numbers(values: Iterable[Any], what: str, *, zero_allowed: bool = False) -> list[float]:
    """`values` as floats: refused unless a list of finite real numbers > 0 (>= 0 with `zero_allowed`)."""
    items = None if isinstance(values, (str, bytes)) else list(values)
    if items is None or not all(_is_real(v) and (v >= 0 if zero_allowed else v > 0) for v in items):
        bound = "non-negative" if zero_allowed else "positive"
        raise AllocationError(f"{what} must be {bound} numbers (finite; not strings or booleans), e.g. "
                              f"[3.1, 2.8, 4.0], got {values!r}")
    return [float(v) for v in items]


# Shares of the budget are floats, exact for whole numbers up to 2**53; beyond that a split would sum to a
# total a few experts off the budget (and no adapter has 9e15 experts: such a budget is a typo).
LARGEST_BUDGET = 2**53


def _check_budget_size(budget: int) -> None:
    whole_number(budget, "the expert budget")
    if budget > LARGEST_BUDGET:
        raise AllocationError(f"the expert budget {budget} is beyond {LARGEST_BUDGET} (2**53), past which experts "
                              "cannot be counted exactly in floating point; use a smaller --budget (budget)")


def _check_budget(budget: int, num_layers: int, min_experts: int, max_experts: int | None) -> None:
    if num_layers < 1:
        raise AllocationError("no layers to allocate experts to")
    _check_budget_size(budget)
    if max_experts is not None:
        whole_number(max_experts, "the per-layer maximum (--max-experts, max_experts)")
    if budget < num_layers * min_experts:
        raise AllocationError(
            f"budget {budget} cannot give {num_layers} layers at least {min_experts} expert(s) each; "
            f"use a budget of at least {num_layers * min_experts}"
        )
    if max_experts is not None and budget > num_layers * max_experts:
        raise AllocationError(
            f"budget {budget} exceeds {num_layers} layers x max {max_experts} experts; raise the maximum "
            f"(--max-experts, max_experts) to at least {-(-budget // num_layers)} or lower the budget (--budget, "
            f"budget) to {num_layers * max_experts} or less"
        )


def _bounded_shares(weights: list[float], budget: int, low: int, high: float) -> list[float]:
    """Shares clamp(scale * w, low, high) summing to `budget` (the sum grows with the scale)."""
    total = sum(weights)
    scale = budget / total if total > 0 else 0.0
    shares = [min(max(scale * w, low), high) for w in weights]
    if total == 0:
        return [budget / len(weights)] * len(weights)
    if abs(sum(shares) - budget) <= 1e-9 * budget:
        return shares
    lo, hi = 0.0, (high if math.isfinite(high) else budget) / min(w for w in weights if w > 0) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(max(mid * w, low), high) for w in weights) < budget:
            lo = mid
        else:
            hi = mid
    return [min(max(hi * w, low), high) for w in weights]


def largest_remainder(
    weights: Sequence[float], budget: int, min_experts: int = 1, max_experts: int | None = None
) -> list[int]:
    """Counts proportional to `weights`, summing to `budget`, each within [min, max].

    The proportional shares are clamped to the bounds with the scale chosen so they still sum
    to the budget; each share is floored and the leftover experts go to the largest fractional
    remainders, lower layer index first on ties.
    """
    weights = real_numbers(weights, "weights", zero_allowed=True)
    _check_budget(budget, len(weights), min_experts, max_experts)
    high = math.inf if max_experts is None else float(max_experts)
    shares = _bounded_shares(weights, budget, min_experts, high)
    counts = [min(max(math.floor(share), min_experts), int(min(high, budget))) for share in shares]
    _settle(counts, shares, budget, min_experts, high)
    return counts


def _settle(counts: list[int], shares: list[float], budget: int, low: int, high: float) -> None:
    """Brings the floored counts to the budget: the leftover experts go one each to the largest fractional
    remainders (lower layer first on ties). Shares of a budget near 2**53 carry float rounding, so the floors
    can also sum past the budget, or short of it by more than one per layer: the surplus is taken from the
    smallest remainders, and either pass repeats until the counts sum to the budget."""
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    leftover = budget - sum(counts)
    step, order = (1, by_remainder) if leftover > 0 else (-1, by_remainder[::-1])
    while leftover:
        movable = [i for i in order if low <= counts[i] + step <= high]
        for i in movable[:abs(leftover)]:
            counts[i] += step
            leftover -= step


def authors_rounding(weights: Sequence[float], budget: int) -> list[int]:
    """AlphaLoRA's `exponential_scaling` rounding, quirks kept (so published allocations reproduce).

    numpy's half-to-even rounding of the normalised shares, then a fix-up loop that compares the
    *un-normalised* weights with the counts: short totals add an expert to argmin(w - n), long
    totals remove one from argmax(w - n). No minimum: a layer can end with 0 experts.
    """
    values = np.asarray(real_numbers(weights, "weights"), dtype=np.float64)
    if values.size == 0:
        raise AllocationError("no layers to allocate experts to")
    if not np.isfinite(values.sum()):
        raise AllocationError(f"the weights' sum overflows the floating-point range (largest {values.max():g})")
    _check_budget_size(budget)
    counts = np.round((values / values.sum()) * budget).astype(int)
    while counts.sum() != budget:
        if budget - counts.sum() > 0:
            counts[np.argmin(values - counts)] += 1
        else:
            counts[np.argmax(values - counts)] -= 1
    return counts.tolist()


def alpha_power_counts(
    layer_alphas: Sequence[float],
    budget: int = 160,
    beta: float = 2.5,
    rounding: str = "largest-remainder",
    min_experts: int = 1,
    max_experts: int | None = None,
) -> list[int]:
    """AlphaLoRA: experts per layer proportional to alpha_l ** beta, `budget` in total."""
    beta = positive_number(beta, "beta")
    alphas = real_numbers(layer_alphas, "layer alphas")
    if not alphas:
        raise AllocationError("no layer alphas: analyse the model first (`alphalora analyze`)")
    weights = alpha_powers(alphas, beta)
    if rounding == "compat":
        if max_experts is not None:
            raise AllocationError("the authors' rounding (--rounding compat) has no per-layer maximum; leave out "
                                  "--max-experts (max_experts) or use --rounding largest-remainder")
        counts = authors_rounding(weights, budget)
        if min(counts) < 1:
            raise AllocationError(
                f"the authors' rounding gives a layer 0 experts ({counts}); raise the budget or use "
                "--rounding largest-remainder"
            )
        return counts
    if rounding == "largest-remainder":
        return largest_remainder(weights, budget, min_experts, max_experts)
    raise AllocationError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDING_MODES)}")


def alpha_powers(layer_alphas: list[float], beta: float) -> list[float]:
    """alpha_l ** beta per layer (AlphaLoRA's weights); refused where they leave the float range."""
    weights = []
    for a in layer_alphas:
        try:
            weights.append(float(a) ** beta)
        except OverflowError:
            weights.append(math.inf)
    if not all(0.0 < w < math.inf for w in weights) or not math.isfinite(sum(weights)):
        raise AllocationError(
            f"layer alpha ** beta leaves the floating-point range (alphas {min(layer_alphas):g} to "
            f"{max(layer_alphas):g}, beta {beta:g}; floats end at {sys.float_info.max:.3g}): use a smaller --beta "
            "(beta; AlphaLoRA's is 2.5), or check the alphas (power-law fits give about 2 to 10)"
        )
    return weights


def parse_pattern(pattern: str) -> list[int]:
    """'2468' -> [2, 4, 6, 8]; dashes allow counts above 9: '10-2-2-2' -> [10, 2, 2, 2]."""
    text = str(pattern).strip()
    if not re.fullmatch(r"[0-9]+(-[0-9]+)*", text):  # ASCII digits: \d would take "٢٤٦٨" too
        raise AllocationError(f"MoLA preset {pattern!r} is not a digit pattern like 2468 or 10-2-2-2")
    counts = [int(p) for p in text.split("-")] if "-" in text else [int(c) for c in text]
    if min(counts) < 1:
        raise AllocationError(f"MoLA preset {pattern!r} gives a group 0 experts")
    return counts


def group_counts(pattern: str, num_layers: int, budget: int | None = None) -> list[int]:
    """MoLA: the layers split into len(pattern) equal groups (earlier groups take any extra
    layer), each layer of group g getting pattern[g] experts; with `budget`, scaled to that total."""
    groups = parse_pattern(pattern)
    if num_layers < len(groups):
        raise AllocationError(f"preset {pattern} has {len(groups)} groups but the model has {num_layers} layers")
    sizes = [len(chunk) for chunk in np.array_split(np.arange(num_layers), len(groups))]
    counts = [count for count, size in zip(groups, sizes, strict=True) for _ in range(size)]
    if budget is not None and budget != sum(counts):
        counts = largest_remainder(counts, budget)
    return counts


def uniform_counts(num_layers: int, budget: int) -> list[int]:
    """The same number of experts in every layer (the remainder to the lowest layers)."""
    return largest_remainder([1.0] * num_layers, budget)


def default_top_k(experts_per_layer: Sequence[int], top_k: int = 2) -> list[int]:
    """AlphaLoRA/MoLA: top-2 routing wherever a layer has more than one expert, else top-1."""
    if top_k < 1:
        raise AllocationError(f"top_k must be at least 1, got {top_k}")
    return [min(top_k, n) for n in experts_per_layer]
