"""HeteroLoRA selection under an exact parameter budget, checked by hand and by exhaustive search."""

from __future__ import annotations

import itertools
import random

import pytest

from alphalora.allocation.expert_counts import AllocationError
from alphalora.allocation.hetero import Candidate, parameters_used, select
from alphalora.allocation.hetero.budget import check_ranks


def _square(name, width=10, kind="lora", layer=0):
    return Candidate(name, kind, layer, width, width)  # rank r costs 20 r at width 10


def test_on_off_enables_the_best_scored_modules_that_fit_as_the_paper_does():
    candidates = [_square("a"), _square("b"), _square("c"), _square("d")]
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    assert select(candidates, scores, budget=3 * 160, ranks=[8]) == {"b": 8, "d": 8, "c": 8}
    assert select(candidates, scores, budget=3 * 160 - 1, ranks=[8]) == {"b": 8, "d": 8}


def test_on_off_skips_a_module_too_large_for_what_is_left_and_takes_the_next():
    candidates = [_square("big", width=40), _square("small1"), _square("small2")]  # 640 vs 160 at rank 8
    scores = {"big": 0.8, "small1": 0.5, "small2": 0.4}
    chosen = select(candidates, scores, budget=900, ranks=[8])
    assert chosen == {"big": 8, "small1": 8}  # 800; small2 would make 960
    assert parameters_used(candidates, chosen) == 800


def test_constant_scores_pick_a_seeded_random_subset():
    candidates = [_square(str(i)) for i in range(12)]
    scores = dict.fromkeys((c.name for c in candidates), 1.0)
    first = select(candidates, scores, budget=4 * 160, ranks=[8], seed=0)
    assert len(first) == 4 and first == select(candidates, scores, budget=4 * 160, ranks=[8], seed=0)
    assert any(select(candidates, scores, budget=4 * 160, ranks=[8], seed=s) != first for s in range(1, 5))


def test_rank_levels_follow_the_scores_by_hand():
    # Width 20: rank r costs 40 r. Targets share * 800 / 40 -> a: 12, b: 6, c: 2; floored to levels 8, 4, 2
    # (560 spent). Leftover 240 goes to the largest deficit whose next level fits: a (160 below) needs +320,
    # no; b (80 below) 4 -> 8 for +160 (720); a still does not fit, c 2 -> 4 for +40 * 2 = 80 (800).
    candidates = [_square("a", width=20), _square("b", width=20), _square("c", width=20)]
    scores = {"a": 0.6, "b": 0.3, "c": 0.1}
    chosen = select(candidates, scores, budget=800, ranks=[2, 4, 8, 16])
    assert chosen == {"a": 8, "b": 8, "c": 4}
    assert parameters_used(candidates, chosen) == 800


@pytest.mark.parametrize("seed", range(20))
def test_no_selection_ever_exceeds_the_budget(seed):
    draw = random.Random(seed)
    candidates = [Candidate(f"m{i}", draw.choice(["lora", "shortcut"]), i % 3, draw.choice([8, 16, 32]),
                            draw.choice([8, 16, 64])) for i in range(draw.randint(3, 9))]
    scores = {c.name: draw.random() for c in candidates}
    budget = draw.randint(200, 3000)
    for ranks, pools in itertools.product([[4], [2, 4, 8]], ["joint", "separate"]):
        chosen = select(candidates, scores, budget, ranks, pools=pools, seed=seed)
        assert parameters_used(candidates, chosen) <= budget
        assert all(r in ranks for r in chosen.values())


def test_on_off_greedy_reaches_the_exhaustive_optimum_when_costs_are_equal():
    draw = random.Random(1)
    candidates = [_square(f"m{i}") for i in range(8)]
    scores = {c.name: draw.random() for c in candidates}
    budget = 5 * 160
    best = max((subset for k in range(6) for subset in itertools.combinations(candidates, k)),
               key=lambda subset: sum(scores[c.name] for c in subset))
    assert set(select(candidates, scores, budget, [8])) == {c.name for c in best}


def test_separate_pools_split_the_budget_between_modules_and_shortcuts():
    candidates = [_square("q0"), _square("q1"), _square("s0", kind="shortcut"), _square("s1", kind="shortcut")]
    scores = {"q0": 0.1, "q1": 0.2, "s0": 0.9, "s1": 0.8}
    assert select(candidates, scores, budget=320, ranks=[8], pools="joint") == {"s0": 8, "s1": 8}
    assert select(candidates, scores, budget=320, ranks=[8], pools="separate") == {"s0": 8, "q1": 8}
    assert select(candidates, scores, budget=320, ranks=[8], pools="separate", shortcut_share=0.0) == \
        {"q1": 8, "q0": 8}


def test_bad_budgets_and_ranks_are_refused_with_the_fix():
    candidates = [_square("a"), Candidate("narrow", "lora", 0, 10, 4)]
    with pytest.raises(AllocationError, match="smaller than one module.*narrow at rank 2, costs 28 parameters"):
        select(candidates, {"a": 1.0, "narrow": 1.0}, budget=20, ranks=[2])
    with pytest.raises(AllocationError, match="rank 8 is larger than module narrow allows.*at most 4"):
        select(candidates, {"a": 1.0, "narrow": 1.0}, budget=10_000, ranks=[2, 8])


def test_separate_pools_that_buy_nothing_are_refused_with_the_fix():
    module, shortcut = Candidate("m", "lora", 0, 32, 48), Candidate("layer0.residual1", "shortcut", 0, 32, 32)
    # rank 4: the module costs 320, the shortcut 256. Joint, 300 buys the shortcut; separate, the shortcuts' share
    # (256 / 576 of 300) buys no shortcut, and the whole 300 left for the modules buys no module
    assert select([module, shortcut], {"m": 1.0, "layer0.residual1": 1.0}, budget=300, ranks=[4]) == \
        {"layer0.residual1": 4}
    with pytest.raises(AllocationError, match=r"budget 300 buys no module in either pool after the --pools separate "
                       r"split: the shortcuts' share, 133, is less than the cheapest shortcut \(256\), and 300 is less "
                       r"than the cheapest LoRA module \(320\); raise --budget or --shortcut-share, or use --pools "
                       r"joint"):
        select([module, shortcut], {"m": 1.0, "layer0.residual1": 1.0}, budget=300, ranks=[4], pools="separate")


@pytest.mark.parametrize("ranks", [[], [0], [True], [2, -1]])
def test_candidate_ranks_must_be_positive_integers_named_as_the_option(ranks):
    with pytest.raises(AllocationError, match=r"candidate ranks \(--ranks\) must be positive integers"):
        check_ranks([], ranks)
