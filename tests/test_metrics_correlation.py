"""The one Spearman / Pearson implementation (``jaxpref.metrics.correlation``): average ranks for ties, checked
against a hand computation, and ``eval.ches`` summarising with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxpref import metrics

# Normalised edit distances tie often: three pairs at 0.5, one at 1.0.
EDIT = np.array([0.5, 0.5, 0.5, 1.0])
CHES = np.array([1.0, 2.0, 3.0, 4.0])


def test_average_ranks_share_the_mean_rank_of_a_tie():
    np.testing.assert_array_equal(metrics.average_ranks(EDIT), [2.0, 2.0, 2.0, 4.0])  # ranks 1, 2, 3 -> 2
    np.testing.assert_array_equal(metrics.average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_spearman_with_ties_matches_hand_computation():
    # Ranks x = (2, 2, 2, 4), y = (1, 2, 3, 4); deviations from 2.5: dx = (−.5, −.5, −.5, 1.5),
    # dy = (−1.5, −.5, .5, 1.5). Σdx·dy = 3, Σdx² = 3, Σdy² = 5, so ρ = 3 / √15 = 0.774597.
    rho = 3 / math.sqrt(15)
    assert metrics.spearman(EDIT, CHES) == pytest.approx(rho, rel=1e-12)
    # Independent of the order of the tied values (argsort-of-argsort gave 1.0 here: ranks 1, 2, 3, 4).
    perm = np.array([2, 0, 3, 1])
    assert metrics.spearman(EDIT[perm], CHES[perm]) == pytest.approx(rho, rel=1e-12)
    assert metrics.spearman(-EDIT, CHES) == pytest.approx(-rho, rel=1e-12)


def test_pearson_matches_hand_computation_and_degenerate_cases_are_nan():
    # x = (1, 2, 3), y = (1, 3, 2): dx = (−1, 0, 1), dy = (−1, 1, 0); r = 1 / (√2 · √2) = 0.5.
    assert metrics.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, rel=1e-12)
    for f in (metrics.spearman, metrics.pearson):
        assert math.isnan(f([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant side
        assert math.isnan(f([1.0, 2.0], [2.0, 1.0]))  # two points are always ±1
        with pytest.raises(ValueError, match="different lengths"):
            f([1.0, 2.0, 3.0], [1.0, 2.0])


def test_eval_ches_correlations_use_average_ranks():
    from eval.ches import correlations

    rho = 3 / math.sqrt(15)
    got = correlations(CHES, CHES ** 3, -CHES, 1.0 - EDIT)  # −edit = EDIT − 1: the tied values again
    assert got == {"ches_vs_ln_ches": pytest.approx(1.0), "ches_vs_last_hidden_ip": pytest.approx(-1.0),
                   "ches_vs_minus_edit_distance": pytest.approx(rho, rel=1e-12)}
