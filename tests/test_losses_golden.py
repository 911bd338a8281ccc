"""Golden values of losses and difficulty metrics, each derived by hand in a comment."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses, metrics

# Golden values are closed forms of at most 8 float32 ops on O(1) inputs, compared with exact (float64 / hand)
# values: each op rounds once, so 2γ_8 = 9.5e-7 (jaxpref.testing.tolerances.relative_tol(8)) relative to the
# magnitudes involved; 1e-6 covers it, and an absolute 1e-6 for results that are exactly 0 or O(1).
F32 = dict(rtol=1e-6, atol=1e-6)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _inputs(**arrays):
    return losses.LossInputs(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def _value(name, inputs, **hp):
    return float(losses.reduce_term(losses.get(name)(inputs, losses.make_hparams(name, hp))))


# Chen et al. Thm 4.1: τ = softplus(−β·c) = ln(1 + e^{−β c}); β = 0.1.
#   c = 10: ln(1 + e^{−1}) = 0.31326;  c = 50: ln(1 + e^{−5}) = 0.0067153;  c = 0: ln 2;  c = −10: ln(1 + e) = 1.3133.
@pytest.mark.parametrize("c,tau", [(10.0, 0.31326), (50.0, 0.0067153), (0.0, 0.693147), (-10.0, 1.3133)])
def test_flip_threshold_golden(c, tau):
    got = float(metrics.flip_threshold(jnp.float32(c), 0.1))
    assert got == pytest.approx(tau, abs=5e-6 if c != -10.0 else 5e-5)


def test_reference_log_ratio_sign():
    # c = log π_ref(y_l) − log π_ref(y_w): rejected minus chosen.
    assert float(metrics.reference_log_ratio(jnp.float32(-20.0), jnp.float32(-10.0))) == 10.0


ZERO_MARGIN_LN2 = [
    ("sigmoid", {}),
    ("cdpo", {"label_smoothing": 0.3}),  # (1 − ε) ln 2 + ε ln 2
    ("robust", {"label_smoothing": 0.2}),  # ((1 − ε) − ε) ln 2 / (1 − 2ε)
    ("sigmoid_norm", {}),
    ("gamma_dpo", {"gamma": 1.0}),
    ("aot", {}),
    ("aot_unpaired", {}),
    ("sigmoid", {"f_divergence": "js_divergence"}),  # scores equal -> Δ = 0
]


@pytest.mark.parametrize("name,hp", ZERO_MARGIN_LN2)
def test_dpo_loss_is_ln2_when_policy_equals_reference(name, hp):
    logps = np.array([-3.0, -40.0, -7.5], np.float32)
    other = np.array([-9.0, -2.0, -7.5], np.float32)
    inputs = _inputs(
        policy_chosen_logps=logps,
        policy_rejected_logps=other,
        reference_chosen_logps=logps,
        reference_rejected_logps=other,
        chosen_tokens=[3, 20, 5],
        rejected_tokens=[4, 1, 5],
    )
    assert _value(name, inputs, **hp) == pytest.approx(math.log(2.0), abs=1e-6)


# Two pairs, β = 0.01, η = 0.005 (Liu et al. "beta series" defaults).
#   pair 1: Δ = (−10 + 11) − (−12 + 11) = 2;   pair 2: Δ = (−20 + 19) − (−18 + 19) = −2.
#   mean DPO = ½[ln(1 + e^{−0.02}) + ln(1 + e^{0.02})] = ½ ln(2 + 2 cosh 0.02) = 0.6931972...
#   summed NLL (eq. 4.8): η·β · mean(10, 20) = 5e-5 · 15 = 7.5e-4      -> 0.69394718
#   token-mean NLL (OpenRLHF): η · mean(10/5, 20/10) = 0.005 · 2 = 0.01 -> 0.70319718
RPO_INPUTS = dict(
    policy_chosen_logps=[-10.0, -20.0],
    policy_rejected_logps=[-12.0, -18.0],
    reference_chosen_logps=[-11.0, -19.0],
    reference_rejected_logps=[-11.0, -19.0],
    chosen_tokens=[5.0, 10.0],
    rejected_tokens=[6.0, 9.0],
)


@pytest.mark.parametrize("nll,expected", [("sum", 0.69394718), ("token_mean", 0.70319718)])
def test_rpo_hand_computed(nll, expected):
    comp = losses.compose(losses.rpo(beta=0.01, eta=0.005, nll=nll))
    total, outputs, _ = comp(_inputs(**RPO_INPUTS))
    assert float(total) == pytest.approx(expected, abs=1e-6)
    assert set(outputs) == {"sigmoid", "nll_sum" if nll == "sum" else "nll_token_mean"}


def test_rpo_preset_by_name_and_defaults():
    by_name = losses.compose([{"name": "rpo"}])
    assert [(t.name, t.weight, getattr(t.hparams, "beta", None)) for t in by_name.terms] == [
        ("sigmoid", 1.0, 0.01),
        ("nll_sum", pytest.approx(5e-5), None),
    ]
    total, _, _ = by_name(_inputs(**RPO_INPUTS))
    assert float(total) == pytest.approx(0.69394718, abs=1e-6)
    # A preset's weight scales all of its terms.
    doubled = losses.compose([{"name": "rpo", "weight": 2.0}])
    assert float(doubled(_inputs(**RPO_INPUTS))[0]) == pytest.approx(2 * 0.69394718, abs=2e-6)


def test_ipo_sum_and_ipo_hand_computed():
    # Δ = (−4 + 5) − (−9 + 8) = 2, τ = β = 0.5 -> ipo_sum = (2 − 1)² = 1.
    # ipo divides each log-ratio by its tokens: 1/2 − (−1)/4 = 0.75 -> (0.75 − 1)² = 0.0625.
    inputs = _inputs(
        policy_chosen_logps=[-4.0],
        policy_rejected_logps=[-9.0],
        reference_chosen_logps=[-5.0],
        reference_rejected_logps=[-8.0],
        chosen_tokens=[2.0],
        rejected_tokens=[4.0],
    )
    assert _value("ipo_sum", inputs, beta=0.5) == pytest.approx(1.0, abs=1e-6)
    assert _value("ipo", inputs, beta=0.5) == pytest.approx(0.0625, abs=1e-6)


def test_gamma_dpo_code_and_literal_forms():
    # Δθ = −4 − (−9) = 5, Δref = −5 − (−8) = 3, β = 0.5, γ = 2.
    #   code form:    softplus(−β(Δθ − γΔref)) = softplus(−0.5 · (5 − 6)) = softplus(0.5)
    #   literal eq 4: softplus(−(βΔθ − γΔref)) = softplus(−(2.5 − 6)) = softplus(3.5)
    inputs = _inputs(
        policy_chosen_logps=[-4.0],
        policy_rejected_logps=[-9.0],
        reference_chosen_logps=[-5.0],
        reference_rejected_logps=[-8.0],
    )
    assert _value("gamma_dpo", inputs, beta=0.5, gamma=2.0) == pytest.approx(_softplus(0.5), abs=1e-6)
    assert _value("gamma_dpo", inputs, beta=0.5, gamma=2.0, literal_eq4=True) == pytest.approx(_softplus(3.5), abs=1e-6)
    # γ = 1 in code form is DPO; γ = 0 drops the reference.
    assert _value("gamma_dpo", inputs, beta=0.5, gamma=1.0) == pytest.approx(_value("sigmoid", inputs, beta=0.5))
    assert _value("gamma_dpo", inputs, beta=0.5, gamma=0.0) == pytest.approx(_softplus(-2.5), abs=1e-6)


def test_simpo_hand_computed():
    # avg log-probs −6/3 = −2 and −12/4 = −3; z = β·(−2 + 3) − γ = 2·1 − 1 = 1 -> softplus(−1).
    inputs = _inputs(
        policy_chosen_logps=[-6.0], policy_rejected_logps=[-12.0], chosen_tokens=[3.0], rejected_tokens=[4.0]
    )
    assert _value("simpo", inputs, beta=2.0, gamma=1.0) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    smoothed = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert _value("simpo", inputs, label_smoothing=0.1) == pytest.approx(smoothed, abs=1e-6)


def test_orpo_hand_computed():
    # Mean log-probs ℓ_w = −2/4, ℓ_l = −6/3; log odds(ℓ) = ℓ − log(1 − e^ℓ) (Hong et al. eq. 4).
    l_w, l_l = -0.5, -2.0
    log_odds = (l_w - math.log1p(-math.exp(l_w))) - (l_l - math.log1p(-math.exp(l_l)))
    odds_ratio = math.log1p(math.exp(-log_odds))
    inputs = _inputs(
        policy_chosen_logps=[-2.0], policy_rejected_logps=[-6.0], chosen_tokens=[4.0], rejected_tokens=[3.0]
    )
    assert _value("orpo_odds_ratio", inputs) == pytest.approx(odds_ratio, abs=1e-6)
    assert _value("orpo", inputs, lam=0.2) == pytest.approx(0.5 + 0.2 * odds_ratio, abs=1e-6)


def test_typo_hand_computed():
    # margin = −3 − (−5) = 2, s = 0.5; sample NLL = 7, λ = 0.1.
    inputs = _inputs(
        policy_chosen_logps=[-3.0],
        policy_rejected_logps=[-5.0],
        reference_sample_logps=[-7.0],
        reference_sample_tokens=[2.0],
        votes=[0.75],
    )
    assert _value("typo", inputs, scale=0.5, lam=0.1) == pytest.approx(math.log1p(math.exp(-1.0)) + 0.7, abs=1e-6)
    sig = 1.0 / (1.0 + math.exp(-1.0))
    assert _value("typo_regression", inputs, scale=0.5, lam=0.1) == pytest.approx((sig - 0.75) ** 2 + 0.7, abs=1e-6)
    assert _value("typo", inputs, scale=0.5, lam=0.1, kl_norm="token_mean") == pytest.approx(
        math.log1p(math.exp(-1.0)) + 0.35, abs=1e-6
    )


def test_bco_pair_running_mean_hand_computed():
    # r_w = 0.1·(−4 + 5) = 0.1, r_l = 0.1·(−9 + 8) = −0.1, δ = 0.05.
    inputs = _inputs(
        policy_chosen_logps=[-4.0],
        policy_rejected_logps=[-9.0],
        reference_chosen_logps=[-5.0],
        reference_rejected_logps=[-8.0],
        bco_delta=0.05,
    )
    assert _value("bco_pair", inputs, running_mean=True) == pytest.approx(_softplus(-0.05) + _softplus(-0.15), abs=1e-6)
    out = losses.get("bco_pair")(inputs, losses.BCOHParams(running_mean=True))
    np.testing.assert_allclose(out.aux["bco/reward_mean"], [0.0], atol=1e-7)


def test_sft_is_batch_token_mean_and_nll_token_mean_is_per_sequence():
    # NLLs 10 and 20 over 5 and 10 tokens.  batch token mean: 30/15 = 2.
    # per-sequence: mean(2, 2) = 2 as well, so make lengths 5 and 15: 30/20 = 1.5 vs mean(2, 4/3) = 5/3.
    inputs = _inputs(policy_chosen_logps=[-10.0, -20.0], policy_rejected_logps=[-1.0, -1.0], chosen_tokens=[5.0, 15.0])
    assert _value("sft", inputs) == pytest.approx(1.5, abs=1e-6)
    assert _value("nll_token_mean", inputs) == pytest.approx(5.0 / 3.0, abs=1e-6)
    assert _value("nll_sum", inputs) == pytest.approx(15.0, abs=1e-6)


def test_alpha_divergence_clamps_like_trl():
    # (α − 1)·u = −0.5·(−400) = 200 is clamped at 80: score = (e^80 − 1)/(α − 1), gradient 0.
    chosen, _ = losses.f_divergence_scores(jnp.float32(-400.0), jnp.float32(0.0), "alpha_divergence", 0.5)
    assert float(chosen) == pytest.approx((math.exp(80.0) - 1.0) / -0.5, rel=1e-6)
