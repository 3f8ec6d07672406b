"""AlphaLoRA and MoLA expert counts against the authors' code, published allocations and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from alphalora.allocation import AllocationError, alpha_power_counts, group_counts, largest_remainder
from alphalora.allocation.expert_counts import default_top_k, uniform_counts

# MoLA NAACL appendix H per-layer PL_Alpha_Hill of the 32-layer "Mixtral" (Mistral-7B) run.
MISTRAL_ALPHAS = [2.14, 3.14, 3.73, 3.49, 3.7, 3.83, 3.53, 3.58, 3.08, 3.31, 2.96, 2.75, 2.85, 2.96, 3.17,
                  3.62, 4.83, 3.52, 4.45, 4.34, 4.28, 4.26, 4.32, 4.23, 4.78, 4.45, 4.12, 4.72, 3.99, 4.26,
                  3.38, 2.99]


def authors_exponential_scaling(values, target_sum, exponent):
    """Transcribed from AlphaLoRA's expert_number.py (the independent oracle for `compat`)."""
    values = np.array(values)
    scaled_values = np.power(values, exponent)
    scaled_integers = np.round((scaled_values / scaled_values.sum()) * target_sum).astype(int)
    while scaled_integers.sum() != target_sum:
        difference = target_sum - scaled_integers.sum()
        if difference > 0:
            scaled_integers[np.argmin(scaled_values - scaled_integers)] += 1
        else:
            scaled_integers[np.argmax(scaled_values - scaled_integers)] -= 1
    return scaled_integers.tolist()


def test_compat_reproduces_the_published_mistral_allocation():
    # The authors' mapping at beta 2.5, T 160 on the appendix-H scores (reference notes §1.5);
    # it differs from LayerIF's published AlphaLoRA row by 2 experts.
    expected = [1, 3, 5, 4, 5, 5, 4, 4, 3, 4, 3, 2, 2, 3, 3, 4, 8, 4, 7, 7, 7, 7, 7, 7, 9, 7, 6, 9, 6, 7, 4, 3]
    assert alpha_power_counts(MISTRAL_ALPHAS, 160, 2.5, "compat") == expected
    layerif = [1, 3, 5, 4, 5, 5, 4, 4, 3, 4, 3, 2, 2, 3, 3, 4, 9, 4, 7, 7, 7, 7, 7, 7, 9, 7, 6, 8, 6, 7, 4, 3]
    assert sum(abs(a - b) for a, b in zip(expected, layerif, strict=True)) == 2


@pytest.mark.parametrize("seed", range(30))
def test_compat_equals_the_authors_code_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    alphas = rng.uniform(1.8, 6.0, size=rng.integers(4, 40)).tolist()
    budget = int(rng.integers(len(alphas) * 2, len(alphas) * 8))
    beta = float(rng.choice([1.0, 2.0, 2.5, 3.0]))
    expected = authors_exponential_scaling(alphas, budget, beta)
    if min(expected) < 1:
        with pytest.raises(AllocationError, match="0 experts"):
            alpha_power_counts(alphas, budget, beta, "compat")
    else:
        assert alpha_power_counts(alphas, budget, beta, "compat") == expected


def test_largest_remainder_by_hand():
    # Shares 160 * w / sum(w) for w = 1, 2, 3, 4 -> 16, 32, 48, 64 exactly.
    assert largest_remainder([1, 2, 3, 4], 160) == [16, 32, 48, 64]
    # Shares 10/3 each: floors 3, 3, 3 and one leftover to the first (ties: lower index).
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]
    # Shares 0.1, 0.1, 9.8: two layers pinned at the minimum 1, the rest gets 8.
    assert largest_remainder([0.1, 0.1, 9.8], 10) == [1, 1, 8]
    # A maximum of 4 pins the big layer; the others share the rest.
    assert largest_remainder([1, 1, 10], 10, max_experts=4) == [3, 3, 4]


@pytest.mark.parametrize("seed", range(30))
def test_largest_remainder_properties(seed):
    rng = np.random.default_rng(100 + seed)
    alphas = rng.uniform(1.5, 7.0, size=rng.integers(2, 48))
    budget = int(rng.integers(len(alphas), len(alphas) * 10))
    counts = alpha_power_counts(alphas.tolist(), budget, 2.5)
    assert sum(counts) == budget and min(counts) >= 1
    # Monotone in alpha: a layer with a larger alpha never gets fewer experts.
    order = np.argsort(alphas)
    assert all(counts[a] <= counts[b] for a, b in zip(order[:-1], order[1:], strict=True))
    # Within one expert of the exact share wherever the minimum does not bind.
    shares = budget * alphas**2.5 / (alphas**2.5).sum()
    unbound = shares >= 1
    if unbound.all():
        assert np.all(np.abs(np.array(counts) - shares) < 1)


def test_mola_presets():
    assert group_counts("2468", 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert group_counts("8642", 32) == [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8
    assert group_counts("2882", 32) == [2] * 8 + [8] * 16 + [2] * 8
    assert group_counts("8228", 32) == [8] * 8 + [2] * 16 + [8] * 8
    assert group_counts("5555", 32) == [5] * 32
    assert sum(group_counts("2468", 32)) == 160
    # Gemma's 28 layers: four groups of 7.
    assert group_counts("2468", 28) == [2] * 7 + [4] * 7 + [6] * 7 + [8] * 7
    # Counts above 9 with dashes, uneven splits give earlier groups the extra layer.
    assert group_counts("10-2-2-2", 6) == [10, 10, 2, 2, 2, 2]
    # Scaled to another budget, keeping the shape.
    assert group_counts("2468", 8, budget=40) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert group_counts("2468", 8, budget=20) == [1, 1, 2, 2, 3, 3, 4, 4]


def test_uniform_and_top_k():
    assert uniform_counts(4, 10) == [3, 3, 2, 2]
    assert default_top_k([1, 2, 5]) == [1, 2, 2]
    assert default_top_k([1, 2, 5], top_k=3) == [1, 2, 3]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: alpha_power_counts([3.0, 4.0], 0), "must be positive"),
        (lambda: alpha_power_counts([3.0, 4.0], -5), "must be positive"),
        (lambda: alpha_power_counts([3.0, 4.0], 10, beta=0), "beta must be positive"),
        (lambda: alpha_power_counts([3.0, 4.0], 10, beta=-1), "beta must be positive"),
        (lambda: alpha_power_counts([3.0, 4.0, 5.0], 2), "at least 1 expert"),
        (lambda: alpha_power_counts([3.0, float("nan")], 10), "positive numbers"),
        (lambda: alpha_power_counts([], 10), "no layer alphas"),
        (lambda: alpha_power_counts([3.0, 4.0], 10, rounding="banker"), "unknown rounding"),
        (lambda: group_counts("24x8", 32), "digit pattern"),
        (lambda: group_counts("2068", 32), "0 experts"),
        (lambda: group_counts("\u0662\u0664\u0666\u0668", 32), "digit pattern"),  # Arabic-Indic 2468
        (lambda: largest_remainder([1, 1], 2**53 + 1), r"beyond 9007199254740992 \(2\*\*53\)"),
        (lambda: alpha_power_counts([3.0, 4.0], 10**20, rounding="compat"), r"beyond .* use a smaller --budget"),
        (lambda: group_counts("2468", 3), "4 groups"),
        (lambda: largest_remainder([1, 1], 10, max_experts=3),
         r"raise the maximum \(--max-experts, max_experts\) to at least 5 or lower the budget \(--budget, budget\) "
         "to 6 or less"),
        (lambda: alpha_power_counts([3.0, 4.0], 10, rounding="compat", max_experts=6), "no per-layer maximum"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(AllocationError, match=message):
        call()


def test_budgets_near_two_to_the_53_still_sum_exactly():
    """The shares' float rounding made the floors of this split sum 4 experts past the budget, which the
    leftover loop (it only adds) left in place; the surplus now comes off the smallest remainders."""
    budget = 8603841967968662
    counts = largest_remainder([1.548, 6.269, 5.636], budget)
    assert sum(counts) == budget
    shares = [budget * w / (1.548 + 6.269 + 5.636) for w in (1.548, 6.269, 5.636)]
    assert all(abs(count - share) < 8 for count, share in zip(counts, shares, strict=True))  # ulp 1 here
