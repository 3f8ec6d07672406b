"""Choosing modules and ranks under an exact trainable-parameter budget from proxy scores."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from alphalora._numbers import is_positive_int, python_scalar

from ..expert_counts import AllocationError


@dataclass(frozen=True)
class Candidate:
    """One switchable adapter: a LoRA module on a linear, or a shortcut connection."""

    name: str
    kind: str  # "lora" or "shortcut"
    layer: int
    in_features: int
    out_features: int

    def cost(self, rank: int) -> int:
        """Trainable parameters at `rank`: A is r x in, B is out x r."""
        return rank * (self.in_features + self.out_features)


def check_ranks(candidates: Sequence[Candidate], ranks: Sequence[int]) -> list[int]:
    """The sorted distinct candidate ranks; each must fit every candidate's dimensions."""
    levels = sorted({python_scalar(rank) for rank in ranks})  # (np.int64 ranks, an array's, read as ints)
    if not levels or not all(is_positive_int(r) for r in levels):
        raise AllocationError(f"candidate ranks (--ranks) must be positive integers, e.g. 8 or 2,4,8, "
                              f"got {list(ranks)}")
    for candidate in candidates:
        limit = min(candidate.in_features, candidate.out_features)
        if levels[-1] > limit:
            raise AllocationError(
                f"candidate rank {levels[-1]} is larger than module {candidate.name} allows "
                f"({candidate.out_features} x {candidate.in_features}, rank at most {limit}); pass smaller --ranks"
            )
    return levels


def check_budget(candidates: Sequence[Candidate], budget: int, ranks: Sequence[int]) -> None:
    """A budget must buy at least the cheapest candidate at the smallest rank."""
    if not isinstance(budget, int) or budget < 1:
        raise AllocationError(f"the budget is a number of trainable parameters (a positive integer), got {budget!r}")
    cheapest = min(candidates, key=lambda c: c.cost(min(ranks)))
    if budget < cheapest.cost(min(ranks)):
        raise AllocationError(
            f"budget {budget} is smaller than one module: the cheapest, {cheapest.name} at rank {min(ranks)}, "
            f"costs {cheapest.cost(min(ranks))} parameters; raise --budget to at least that"
        )


def _order(candidates: Sequence[Candidate], scores: dict[str, float], seed: int) -> list[Candidate]:
    """Best score first; ties (e.g. the constant proxy) broken by a seeded random draw."""
    draw = random.Random(seed)
    tie_break = {c.name: draw.random() for c in candidates}
    return sorted(candidates, key=lambda c: (-_finite(scores[c.name]), tie_break[c.name]))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _on_off(candidates: Sequence[Candidate], scores, budget: int, rank: int, seed: int) -> dict[str, int]:
    """The paper's selection: enable the best-scored candidates at `rank` while they fit the budget."""
    chosen, spent = {}, 0
    for candidate in _order(candidates, scores, seed):
        if spent + candidate.cost(rank) <= budget:
            chosen[candidate.name] = rank
            spent += candidate.cost(rank)
    return chosen


def _rank_levels(candidates: Sequence[Candidate], scores, budget: int, levels: list[int],
                 seed: int) -> dict[str, int]:
    """Ranks in proportion to the scores, rounded down to a level, then the rest of the budget filled.

    Candidate m's target is a share score_m / sum(scores) of the budget, i.e. a target rank
    t_m = share * budget / (in + out). Each takes the largest level <= t_m (0: off); leftover
    parameters then go, one level at a time, to the candidate furthest below its target in
    parameters (ties: the better score) whose next level still fits.
    """
    weights = {c.name: max(_finite(scores[c.name]), 0.0) for c in candidates}
    total = sum(weights.values())
    if total <= 0:
        weights, total = {c.name: 1.0 for c in candidates}, float(len(candidates))
    target = {c.name: weights[c.name] / total * budget / (c.in_features + c.out_features) for c in candidates}
    rank = {c.name: max([0] + [r for r in levels if r <= target[c.name]]) for c in candidates}
    spent = sum(c.cost(rank[c.name]) for c in candidates)
    position = {c.name: i for i, c in enumerate(_order(candidates, scores, seed))}
    while True:
        best, best_key = None, None
        for c in candidates:
            higher = [r for r in levels if r > rank[c.name]]
            if not higher or spent + c.cost(higher[0]) - c.cost(rank[c.name]) > budget:
                continue
            key = ((target[c.name] - rank[c.name]) * (c.in_features + c.out_features), -position[c.name])
            if best_key is None or key > best_key:
                best, best_key = c, key
        if best is None:
            break
        step = min(r for r in levels if r > rank[best.name])
        spent += best.cost(step) - best.cost(rank[best.name])
        rank[best.name] = step
    return {name: r for name, r in rank.items() if r > 0}


def select(candidates: Sequence[Candidate], scores: dict[str, float], budget: int, ranks: Sequence[int], *,
           pools: str = "joint", shortcut_share: float | None = None, seed: int = 0) -> dict[str, int]:
    """Candidate name -> rank for the enabled ones; their total cost never exceeds `budget`.

    One rank: the paper's on/off selection of the top-scored candidates. Several ranks: rank
    levels from the scores (`_rank_levels`). ``pools="separate"`` splits the budget between LoRA
    modules and shortcuts (``shortcut_share``, default: the shortcuts' share of all candidates'
    parameters at the largest rank), as the paper's "separated" variant; "joint" ranks them together.
    """
    levels = check_ranks(candidates, ranks)
    check_budget(candidates, budget, levels)

    def pick(pool: Sequence[Candidate], pool_budget: int) -> dict[str, int]:
        if not pool or pool_budget <= 0:
            return {}
        if len(levels) == 1:
            return _on_off(pool, scores, pool_budget, levels[0], seed)
        return _rank_levels(pool, scores, pool_budget, levels, seed)

    if pools == "joint":
        return pick(candidates, budget)
    if pools != "separate":
        raise AllocationError(f"pools must be joint or separate, got {pools!r}")
    shortcuts = [c for c in candidates if c.kind == "shortcut"]
    modules = [c for c in candidates if c.kind != "shortcut"]
    if shortcut_share is None:
        full = {c.name: c.cost(levels[-1]) for c in candidates}
        shortcut_share = sum(full[c.name] for c in shortcuts) / sum(full.values())
    if not 0 <= shortcut_share <= 1:
        raise AllocationError(f"shortcut_share must be between 0 and 1, got {shortcut_share}")
    shortcut_budget = int(budget * shortcut_share)
    chosen = pick(shortcuts, shortcut_budget)
    spent = sum(c.cost(chosen[c.name]) for c in shortcuts if c.name in chosen)
    chosen.update(pick(modules, budget - spent))
    if not chosen:  # then nothing was spent on shortcuts, and the modules had the whole budget
        def cheapest(pool: Sequence[Candidate]) -> int:
            return min(c.cost(levels[0]) for c in pool)

        modules_part = f"{budget} is less than the cheapest LoRA module ({cheapest(modules)})" if modules \
            else "there are no LoRA modules"
        raise AllocationError(
            f"budget {budget} buys no module in either pool after the --pools separate split: the shortcuts' share, "
            f"{shortcut_budget}, is less than the cheapest shortcut ({cheapest(shortcuts)}), and {modules_part}; "
            "raise --budget or --shortcut-share, or use --pools joint"
        )
    return chosen


def parameters_used(candidates: Sequence[Candidate], chosen: dict[str, int]) -> int:
    return sum(c.cost(chosen[c.name]) for c in candidates if c.name in chosen)
