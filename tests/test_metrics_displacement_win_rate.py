"""Likelihood-displacement metrics (Razin et al. 2025) and win-rate estimators."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import metrics


def test_displacement_stats():
    init = jnp.asarray([-10.0, -20.0, -5.0, -7.0])
    fin = jnp.asarray([-12.0, -15.0, -5.0, -9.0])
    d = metrics.displacement_stats(init, fin, jnp.asarray([True, True, True, False]))
    np.testing.assert_allclose(d.change, [-2.0, 5.0, 0.0, -2.0])
    np.testing.assert_array_equal(d.displaced, [True, False, False, True])
    assert float(d.change_tally.mean) == pytest.approx(1.0)  # masked row left out
    assert float(d.displaced_tally.mean) == pytest.approx(1 / 3)
    assert bool(metrics.is_displaced(jnp.asarray(-1.0), jnp.asarray(0.69), jnp.asarray(0.5)))
    assert not bool(metrics.is_displaced(jnp.asarray(-1.0), jnp.asarray(0.69), jnp.asarray(0.7)))  # loss rose
    assert not bool(metrics.is_displaced(jnp.asarray(0.5), jnp.asarray(0.69), jnp.asarray(0.5)))


def test_max_drop_matches_brute_force():
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(20, 7))
    got = metrics.max_drop(jnp.asarray(probs))
    for row, drop, s, e in zip(probs, np.asarray(got.drop), np.asarray(got.start), np.asarray(got.end)):
        best = max([row[t] - row[u] for t, u in itertools.combinations(range(len(row)), 2)] + [0.0])
        assert drop == pytest.approx(best, abs=1e-6)
        if best > 0:
            assert s < e and row[s] - row[e] == pytest.approx(best, abs=1e-6)
    # Razin Table 1 style: 0.96 -> ... -> 0.27 with an intermediate dip below the end.
    r = metrics.max_drop(jnp.asarray([0.96, 0.5, 0.2, 0.27]))
    assert float(r.drop) == pytest.approx(0.76) and (int(r.start), int(r.end)) == (0, 2)
    none = metrics.max_drop(jnp.asarray([0.1, 0.2, 0.3]))
    assert float(none.drop) == 0.0 and int(none.start) == int(none.end) == 0


def test_token_risers_and_predictor():
    before = jnp.asarray([0.5, 0.2, 0.2, 0.1])
    after = jnp.asarray([0.1, 0.5, 0.1, 0.3])
    idx, inc = metrics.token_risers(before, after, 2)
    assert list(np.asarray(idx)) == [1, 3]
    np.testing.assert_allclose(inc, [0.3, 0.2], rtol=1e-6)
    w_vd = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    want = w_vd @ (w_vd[2] - w_vd[5])
    np.testing.assert_allclose(metrics.riser_predictor(jnp.asarray(w_vd), 2, 5, layout="vd"), want, rtol=1e-5)
    np.testing.assert_allclose(metrics.riser_predictor(jnp.asarray(w_vd.T), 2, 5, layout="dv"), want, rtol=1e-5)


P = jnp.asarray([1.0, 0.0, 0.5, 0.8, 0.5])


@pytest.mark.parametrize("tie_rule,hard,want,count", [
    ("half", False, (1 + 0 + 0.5 + 0.8 + 0.5) / 5, 5),
    ("exclude", False, (1 + 0 + 0.8) / 3, 3),
    ("loss", False, (1 + 0 + 0.8) / 5, 5),
    ("half", True, (1 + 0 + 0.5 + 1 + 0.5) / 5, 5),
    ("exclude", True, 2 / 3, 3),
])
def test_win_rate_tie_rules(tie_rule, hard, want, count):
    t = metrics.win_rate(P, tie_rule=tie_rule, hard=hard)
    assert float(t.mean) == pytest.approx(want) and float(t.count) == count


def test_h_win_rates():
    p = jnp.asarray([0.75, 0.25, 1.0])
    assert float(metrics.win_rate(p, h="logit").mean) == pytest.approx(np.log(999) / 3, rel=1e-5)  # ±ln 3 cancel
    assert float(metrics.win_rate(p, h="log").mean) == pytest.approx((np.log(0.75) + np.log(0.25) + np.log(0.999)) / 3,
                                                                     rel=1e-5)
    with pytest.raises(ValueError):
        metrics.win_rate(p, tie_rule="coin")


def test_position_swaps_and_bootstrap():
    swaps = metrics.position_swaps(1000, seed=3)
    assert 0.45 < swaps.mean() < 0.55
    np.testing.assert_array_equal(swaps, metrics.position_swaps(1000, seed=3))  # seeded
    first, second = metrics.order_pair(["p1", "p2"], ["c1", "c2"], np.array([False, True]))
    assert first == ["p1", "c2"] and second == ["c1", "p2"]
    # A judge that always prefers the first position gives P(policy) = 1 - swap: win rate ~ 1/2, not 1.
    p = metrics.unswap(np.ones(1000), swaps)
    assert float(metrics.win_rate(jnp.asarray(p)).mean) == pytest.approx(1 - swaps.mean())
    values = np.r_[np.ones(70), np.zeros(30)]
    lo, hi = metrics.bootstrap_ci(values, seed=0)
    assert lo < 0.7 < hi and hi - lo < 0.25
    assert (lo, hi) == metrics.bootstrap_ci(values, seed=0)
    assert all(np.isnan(metrics.bootstrap_ci(values, np.zeros(100, bool))))
