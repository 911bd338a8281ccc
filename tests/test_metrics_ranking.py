"""Ranking / idealized ranking accuracy (Chen et al. 2024) against hand-checked values and papers.md goldens."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import rankdata

from jaxpref import metrics
from jaxpref.evaluation import PairScores

# Hand-checked dataset: summed log-probs, response token counts and vote shares α (for chosen).
#        lp_w    lp_l    n_w n_l  α
PAIRS = [(-10.0, -12.0, 5, 4, 0.75),   # R ✓ (−10 ≥ −12)  R̃ ✓ (−2 vs −3)
         (-8.0, -6.0, 4, 2, 1.0),      # R ✗              R̃ ✓ (−2 vs −3)
         (-5.0, -5.0, 5, 5, 0.5),      # tie in votes; equal log-probs: ✓ under ≥, ✗ strict
         (-20.0, -4.0, 10, 1, 0.6),    # R ✗              R̃ ✓ (−2 vs −4)
         (-3.0, -9.0, 3, 3, 1.0),      # R ✓              R̃ ✓
         (-7.0, -7.005, 7, 7, 0.5)]    # tie in votes; |Δ| = 0.005 < ε = 0.01
LW, LL, NW, NL, ALPHA = (jnp.asarray([p[i] for p in PAIRS], jnp.float32) for i in range(5))
TIE = np.asarray(ALPHA) == 0.5
NON_TIE = jnp.asarray(~TIE)


def test_golden_logit_alpha_and_clipping():
    # papers.md §1.4: logit(0.75) = ln 3; α = 1 clipped to 1 − 1e-3 gives ln 999 = 6.9068 (not the code's ln 1000).
    lg = np.asarray(metrics.alpha_logit(jnp.asarray([0.75, 1.0, 0.0, 0.5])))
    np.testing.assert_allclose(lg, [math.log(3), math.log(999), -math.log(999), 0.0], rtol=1e-5, atol=1e-6)
    assert lg[0] == pytest.approx(1.0986, abs=1e-4) and lg[1] == pytest.approx(6.9068, abs=1e-4)
    np.testing.assert_allclose(metrics.clip_alpha(jnp.asarray([0.0, 1.0, 0.3])), [1e-3, 1 - 1e-3, 0.3], rtol=1e-6)


def test_golden_flip_thresholds():
    # papers.md §1.6: β = 0.1: c = 10 → 0.3133, c = 50 → 0.00672, c = 0 → ln 2, c = −10 → 1.3133.
    tau = np.asarray(metrics.flip_threshold(jnp.asarray([10.0, 50.0, 0.0, -10.0]), 0.1))
    np.testing.assert_allclose(tau, [0.31326, 0.0067153, math.log(2), 1.31326], rtol=1e-4)


def test_ranking_accuracy_hand_checked():
    t = metrics.ranking_accuracy(LW, LL, NW, NL, NON_TIE)
    assert float(t.ranking.mean) == pytest.approx(0.5)  # pairs 1, 5 of the four non-tie pairs
    assert float(t.normalized.mean) == pytest.approx(1.0)
    assert float(t.ranking.count) == 4.0
    # All six: ≥ counts the exact tie (pair 3) and pair 6 correct; strict order drops pair 3.
    assert float(metrics.ranking_accuracy(LW, LL, NW, NL).ranking.mean) == pytest.approx(4 / 6)
    assert float(metrics.ranking_accuracy(LW, LL, NW, NL, ties_correct=False).ranking.mean) == pytest.approx(3 / 6)


def test_tallies_add_over_batches():
    full = metrics.ranking_accuracy(LW, LL, NW, NL)
    a = metrics.ranking_accuracy(LW[:4], LL[:4], NW[:4], NL[:4])
    b = metrics.ranking_accuracy(LW[4:], LL[4:], NW[4:], NL[4:], jnp.asarray([True, True]))
    s = a + b
    assert float(s.ranking.total) == float(full.ranking.total) and float(s.ranking.count) == 6.0
    assert math.isnan(float(metrics.Tally.zeros().mean))


def test_ties_rule_def_c1():
    ok = np.asarray(metrics.ties_rule_correct(LW, LL, ALPHA))
    np.testing.assert_array_equal(ok, [True, False, True, False, True, True])
    assert float(metrics.ranking_accuracy_with_ties(LW, LL, ALPHA).mean) == pytest.approx(4 / 6)
    # α < 0.5 means the raters prefer response 2: correct iff s_1 < s_2 (strict).
    np.testing.assert_array_equal(metrics.ties_rule_correct(jnp.asarray([-5.0, -5.0]), jnp.asarray([-4.0, -5.0]),
                                                            jnp.asarray([0.25, 0.25])), [True, False])
    # The scale matters for ε: log-probs −7 vs −7.005 tie; their geometric-mean probabilities too.
    gm = metrics.tie_scale_scores(jnp.asarray([-7.0, -7.005]), jnp.asarray([7.0, 7.0]), "geometric_mean_prob")
    np.testing.assert_allclose(gm, np.exp([-1.0, -7.005 / 7]), rtol=1e-6)


def test_idealized_hand_checked():
    betas = jnp.asarray(metrics.DEFAULT_BETAS)
    t = metrics.idealized_ranking_accuracy(LW, LL, ALPHA, betas)  # ties excluded by default
    np.testing.assert_allclose(t.mean, [1.0, 0.75, 0.75, 0.5, 0.5])
    assert float(t.count[0]) == 4.0
    s = metrics.beta_summary(t.mean)
    assert (float(s["min"]), float(s["median"]), float(s["max"])) == (0.5, 0.75, 1.0)
    # Length-normalised: every non-tie reference already ranks correctly on means -> 1 at every β.
    tn = metrics.idealized_ranking_accuracy(LW / NW, LL / NL, ALPHA, betas)
    np.testing.assert_allclose(tn.mean, 1.0)
    # Gap against R = 0.5 (median R* = 0.75): 25 points; R̃ = 1 gives 0.
    assert float(metrics.alignment_gap(s["median"], 0.5)) == pytest.approx(25.0)
    # Ties included: both tie pairs have |Δ_ref| < 0.01 -> correct at every β.
    ti = metrics.idealized_ranking_accuracy(LW, LL, ALPHA, betas, include_ties=True)
    np.testing.assert_allclose(ti.mean, np.array([4, 3, 3, 2, 2]) / 6 + 2 / 6)


def test_idealized_matches_ratio_form():
    # Cor. 3.3 literally: π_ref(y_w)/π_ref(y_l) · (α/(1−α))^(1/β) > 1 (float64, moderate values).
    rng = np.random.default_rng(0)
    d = rng.uniform(-5, 5, 200)
    a = rng.uniform(0.51, 0.99, 200)
    for beta in (0.5, 1.0, 5.0):
        lit = np.exp(d) * (a / (1 - a)) ** (1 / beta) > 1
        ours = np.asarray(metrics.idealized_correct(jnp.asarray(d, jnp.float32), jnp.zeros(200), jnp.asarray(a),
                                                    jnp.asarray([beta])))[0]
        clear = np.abs(d + np.log(a / (1 - a)) / beta) > 1e-4
        np.testing.assert_array_equal(ours[clear], lit[clear])


def test_exact_match_ranking_n_greater_than_2():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3, (50, 4)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(metrics.competition_ranks(jnp.asarray(s)),
                                  np.stack([len(r) + 1 - rankdata(r, method="max") for r in s]))
    model = jnp.asarray([[3.0, 2, 1], [1, 1, 0], [1, 1, 0], [2, 1, 0], [np.nan, 1, 0]])
    human = jnp.asarray([[10.0, 5, 1], [2, 1, 0], [1, 1, 0], [1, 1, 0], [3, 2, 1]])
    t = metrics.exact_match_ranking(model, human)
    assert float(t.count) == 4.0  # the NaN row is dropped (nanmean)
    assert float(t.total) == 2.0  # rows 0 and 2 match exactly; a model or human tie must be reproduced
    assert float(metrics.exact_match_ranking(model, human, jnp.asarray([1, 0, 0, 0, 1], bool)).mean) == 1.0


def _scores(lw, ll, nw, nl):
    sums = np.stack([np.asarray(lw), np.asarray(ll)], 1)
    counts = np.stack([np.asarray(nw), np.asarray(nl)], 1)
    return PairScores(sums=sums, counts=counts, means=sums / counts)


def test_eval_ranking_summary_on_hand_dataset():
    from eval.ranking import compute

    sc = _scores(LW, LL, NW, NL)
    summary, cols = compute(sc, sc, np.asarray(ALPHA), TIE, has_votes=True, betas=None, beta=0.1, ties_correct=True,
                            include_ties=False, fallback_alpha=0.75)
    assert summary["n_pairs"] == 6 and summary["n_evaluated"] == 4 and summary["n_ties"] == 2
    assert summary["ranking_accuracy"] == pytest.approx(0.5)
    assert summary["ranking_accuracy_normalized"] == pytest.approx(1.0)
    assert summary["idealized"]["R_star"] == {"min": 0.5, "median": 0.75, "max": 1.0}
    assert summary["idealized"]["per_beta"]["0.1"]["R_star"] == pytest.approx(0.75)
    assert summary["alignment_gap"] == pytest.approx(25.0) and summary["alignment_gap_normalized"] == pytest.approx(0.0)
    assert summary["idealized"]["alpha_source"] == "votes"
    # Policy == reference: every evaluated pair stays in its category (no flips).
    fc = summary["flip_categories"]
    assert fc["correct->incorrect"]["count"] == 0 and fc["incorrect->correct"]["count"] == 0
    assert fc["correct->correct"]["count"] + fc["incorrect->incorrect"]["count"] == 4
    # Ties included: R uses Def. C.1 (both tie pairs correct) -> 4/6.
    s2, _ = compute(sc, sc, np.asarray(ALPHA), TIE, has_votes=True, betas=None, beta=0.1, ties_correct=True,
                    include_ties=True, fallback_alpha=0.75)
    assert s2["ranking_accuracy"] == pytest.approx(4 / 6) and s2["n_evaluated"] == 6
    # No votes: the released code's fallback α = 0.75 for every pair, stated in the summary.
    s3, c3 = compute(sc, sc, np.ones(6), np.zeros(6, bool), has_votes=False, betas=[1.0], beta=0.1, ties_correct=True,
                     include_ties=False, fallback_alpha=0.75)
    assert "fallback" in s3["idealized"]["alpha_source"] and np.all(c3["alpha"] == 0.75)
    # β = 1, α = 0.75: correct iff Δ_ref + ln 3 > 0: pairs 1, 3 (Δ 0), 5, 6 of six.
    assert s3["idealized"]["per_beta"]["1.0"]["R_star"] == pytest.approx(4 / 6)


def test_eval_ranking_without_reference_reports_r_only():
    # Chen Cor. 3.3: R* is a function of the *reference* log-probs. Without one, R* of the evaluated model
    # itself is not Chen's quantity and its "gap" is meaningless: only R / R̃, plus the reason.
    from eval.ranking import compute

    sc = _scores(LW, LL, NW, NL)
    summary, cols = compute(sc, None, np.asarray(ALPHA), TIE, has_votes=True, betas=None, beta=0.1,
                            ties_correct=True, include_ties=False, fallback_alpha=0.75)
    assert summary["ranking_accuracy"] == pytest.approx(0.5)
    assert summary["ranking_accuracy_normalized"] == pytest.approx(1.0)
    for key in ("idealized", "alignment_gap", "alignment_gap_normalized", "difficulty", "flip_categories"):
        assert key not in summary, key
    assert "--reference" in summary["needs_reference"] and "R*" in summary["needs_reference"]
    assert set(cols) == {"alpha", "correct", "correct_normalized", "evaluated"}


# Ties in the labels (α = 0.5) under Def. C.1, ε = 0.01. Summed log-probs, token counts, α:
#   A: means −5 vs −6: |Δ sum| = 10 (R: not a tie); |e^−5 − e^−6| = 0.00426 < ε (R̃: a tie, correct)
#   B: means −1 vs −1.5: neither scale is within ε
#   C: sums −7 vs −7.005 (7 tokens each): within ε on both scales
#   D: a clear non-tie, α = 1, ranked right on both scales
TIE_PAIRS = [(-50.0, -60.0, 10, 10, 0.5), (-10.0, -15.0, 10, 10, 0.5), (-7.0, -7.005, 7, 7, 0.5),
             (-3.0, -9.0, 3, 3, 1.0)]


def test_tie_rule_is_the_same_for_r_tilde_and_r_tilde_star():
    from eval.ranking import compute

    lw, ll, nw, nl, al = (np.asarray([p[i] for p in TIE_PAIRS], np.float64) for i in range(5))
    # Hand computation (float64) of Def. C.1 on each scale.
    tie_sum = np.abs(lw - ll) < 0.01
    tie_gm = np.abs(np.exp(lw / nw) - np.exp(ll / nl)) < 0.01
    np.testing.assert_array_equal(tie_sum[:3], [False, False, True])
    np.testing.assert_array_equal(tie_gm[:3], [True, False, True])
    sc = _scores(lw.astype(np.float32), ll.astype(np.float32), nw, nl)
    betas = jnp.asarray(metrics.DEFAULT_BETAS)
    # R̃* (the optimum from a reference with these scores) uses the rule and scale of R̃.
    ideal_n = np.asarray(metrics.idealized_correct(jnp.asarray(sc.means[:, 0]), jnp.asarray(sc.means[:, 1]),
                                                   jnp.asarray(al, jnp.float32), betas, normalized=True))
    np.testing.assert_array_equal(ideal_n[:, :3], np.broadcast_to(tie_gm[:3], (5, 3)))
    ideal = np.asarray(metrics.idealized_correct(jnp.asarray(sc.sums[:, 0]), jnp.asarray(sc.sums[:, 1]),
                                                 jnp.asarray(al, jnp.float32), betas))
    np.testing.assert_array_equal(ideal[:, :3], np.broadcast_to(tie_sum[:3], (5, 3)))
    # Through eval.ranking with the model as its own reference: R and R* count the same tie pairs, and so
    # do R̃ and R̃* (old code: R̃ counted A, R̃* did not).
    summary, cols = compute(sc, sc, al, al == 0.5, has_votes=True, betas=None, beta=0.1, ties_correct=True,
                            include_ties=True, fallback_alpha=0.75)
    np.testing.assert_array_equal(cols["correct"], [False, False, True, True])
    np.testing.assert_array_equal(cols["correct_normalized"], [True, False, True, True])
    assert summary["ranking_accuracy"] == pytest.approx(2 / 4)
    assert summary["ranking_accuracy_normalized"] == pytest.approx(3 / 4)
    for b in summary["idealized"]["per_beta"].values():
        assert b == {"R_star": pytest.approx(2 / 4), "R_star_normalized": pytest.approx(3 / 4)}
