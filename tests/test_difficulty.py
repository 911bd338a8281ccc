"""Difficulty metrics of Chen et al. 2024 (Thm 4.1 flip threshold, flip categories, reward accuracy)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpref import losses, metrics

B = 8


def _logps(seed):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.uniform(-60.0, -1.0, B), jnp.float32) for _ in range(4)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), beta=st.sampled_from([0.01, 0.1, 1.0, 5.0]))
def test_theorem_4_1_loss_below_threshold_iff_ranked_correctly(seed, beta):
    pc, pr, rc, rr = _logps(seed)
    d = metrics.example_difficulty(pc, pr, rc, rr, beta)
    # Away from ties (where rounding could flip ≤) and from τ underflowing float32 (β·c ≳ 87: loss and τ
    # both round to 0); there model_correct, not the loss gap, decides.
    clear = (np.abs(np.asarray(pc - pr)) > 1e-2) & (np.asarray(d.flip_threshold) > 1e-30)
    np.testing.assert_array_equal(np.asarray(d.loss_gap <= 0)[clear], np.asarray(d.model_correct)[clear])
    # The DPO loss in the difficulty record is the registered sigmoid loss.
    inputs = losses.LossInputs(
        policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc, reference_rejected_logps=rr
    )
    np.testing.assert_allclose(
        d.dpo_loss, losses.get("sigmoid")(inputs, losses.DPOHParams(beta=beta)).loss, rtol=1e-5, atol=1e-5
    )


def test_tie_is_correct_under_the_papers_definition():
    # m = 0: the loss equals τ exactly, and π(y_w) ≥ π(y_l) holds; the released code's strict > does not.
    pc = pr = jnp.asarray([-5.0])
    rc, rr = jnp.asarray([-3.0]), jnp.asarray([-9.0])
    d = metrics.example_difficulty(pc, pr, rc, rr, 0.1)
    assert float(d.loss_gap[0]) == 0.0 and bool(d.model_correct[0])
    assert not bool(metrics.example_difficulty(pc, pr, rc, rr, 0.1, ties_correct=False).model_correct[0])
    assert not bool(metrics.ranking_correct(pc, pr, ties_correct=False)[0])


def test_prop_2_6_reference_correct_and_loss_below_point_six_implies_correct():
    # Chen Prop. 2.6: π_ref(y_w) ≥ π_ref(y_l) and L ≤ 0.6 ⇒ R = 1 (τ ≥ ln 2 > 0.6 when c ≤ 0).
    pc, pr, rc, rr = _logps(11)
    d = metrics.example_difficulty(pc, pr, rc, rr, 0.1)
    hit = np.asarray(d.reference_correct & (d.dpo_loss <= 0.6))
    assert np.all(np.asarray(d.model_correct)[hit])


def test_flip_categories_hand_computed():
    ref = jnp.asarray([True, True, False, False, True, False])
    model = jnp.asarray([True, False, True, False, True, False])
    loss = jnp.asarray([0.1, 0.9, 0.3, 2.0, 0.3, 4.0])
    margin = jnp.asarray([1.0, -1.0, 2.0, -3.0, 3.0, -5.0])
    cats = metrics.flip_categories(ref, model, loss, margin)
    np.testing.assert_allclose(cats.counts, [2, 1, 1, 2])
    np.testing.assert_allclose(cats.shares, [2 / 6, 1 / 6, 1 / 6, 2 / 6], rtol=1e-6)
    np.testing.assert_allclose(cats.mean_loss, [0.2, 0.9, 0.3, 3.0], rtol=1e-6)
    np.testing.assert_allclose(cats.mean_margin, [2.0, -1.0, 2.0, -4.0], rtol=1e-6)
    # Masking the only correct->incorrect row empties that category (NaN means) and renormalises shares.
    masked = metrics.flip_categories(ref, model, loss, margin, mask=jnp.asarray([1, 0, 1, 1, 1, 1]))
    np.testing.assert_allclose(masked.counts, [2, 0, 1, 2])
    np.testing.assert_allclose(masked.shares, [0.4, 0.0, 0.2, 0.4], rtol=1e-6)
    assert math.isnan(float(masked.mean_loss[1])) and math.isnan(float(masked.mean_margin[1]))
    assert metrics.FLIP_CATEGORIES[1] == "correct->incorrect"


def test_flip_categories_from_logps_under_jit_and_vmap():
    stacked = [jnp.stack([a, b]) for a, b in zip(_logps(1), _logps(2))]
    fn = jax.jit(jax.vmap(lambda pc, pr, rc, rr: metrics.flip_categories_from_logps(pc, pr, rc, rr, 0.1)))
    cats = fn(*stacked)
    assert cats.counts.shape == (2, 4)
    np.testing.assert_allclose(cats.counts.sum(-1), [B, B])
    np.testing.assert_allclose(cats.shares.sum(-1), [1.0, 1.0], rtol=1e-6)
    eager = metrics.flip_categories_from_logps(*_logps(1), 0.1)
    np.testing.assert_allclose(cats.counts[0], eager.counts)
    np.testing.assert_allclose(cats.mean_loss[0], eager.mean_loss, rtol=1e-5)


def test_reward_accuracy_matches_loss_aux_and_masks():
    pc, pr, rc, rr = _logps(3)
    inputs = losses.LossInputs(
        policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc, reference_rejected_logps=rr
    )
    aux = losses.get("sigmoid")(inputs).aux["rewards/accuracies"]
    assert float(metrics.reward_accuracy(pc, pr, rc, rr)) == pytest.approx(float(jnp.mean(aux)))
    mask = jnp.arange(B) < 3
    assert float(metrics.reward_accuracy(pc, pr, rc, rr, mask)) == pytest.approx(float(jnp.mean(aux[:3])))
    # Hand case: log-ratio chosen 1 > rejected −1 -> correct; equal log-ratios -> not (strict, as TRL).
    one = [jnp.asarray([v]) for v in (-4.0, -9.0, -5.0, -8.0)]
    assert float(metrics.reward_accuracy(*one)) == 1.0
    tie = [jnp.asarray([v]) for v in (-4.0, -9.0, -4.0, -9.0)]
    assert float(metrics.reward_accuracy(*tie)) == 0.0


@pytest.mark.parametrize("c,beta,tau", [(10.0, 0.1, 0.31326), (50.0, 0.1, 0.0067153), (0.0, 0.1, 0.693147)])
def test_threshold_of_reference_log_ratio_from_logps(c, beta, tau):
    # c = log π_ref(y_l) − log π_ref(y_w): a reference preferring y_l by c nats.
    d = metrics.example_difficulty(jnp.zeros(1), jnp.zeros(1), jnp.asarray([-c - 1.0]), jnp.asarray([-1.0]), beta)
    assert float(d.ref_log_ratio[0]) == pytest.approx(c)
    assert float(d.flip_threshold[0]) == pytest.approx(tau, abs=5e-6)
    assert bool(d.reference_correct[0]) == (c <= 0)
