"""The Chen et al. and Liu et al. reproductions on the exact testbed, run with their YAML ``ci`` settings.

Every margin below comes from running the ``ci`` settings with six seeds (0-5) and is written next to
the assertion as ``measured: mean ± sd over seeds``; the tests run three seeds (0-2), so the asserted
bounds sit at least three standard errors of a three-seed mean from the measured means.

Chen: on the testbed the alignment-gap and few-flips claims do NOT reproduce (DPO flips about a third of
the reference-misranked pairs by the lowest-validation-loss checkpoint, and with correctly computed
likelihood ratios the median-β R* is low because the reference log-ratios are large); the flip threshold
τ does predict which pairs flip. The tests assert these honest outcomes and that ``reproduced`` is False.
Liu: RPO keeps log π(y_w) higher and its true win rate is within a point of DPO's (not higher).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from jaxpref.experiments import runner

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs" / "experiments"
pytestmark = pytest.mark.slow  # each experiment takes ~45-70 s on two busy CPU cores


def _run(name: str, tmp_path_factory) -> tuple[dict, dict, pathlib.Path]:
    out = tmp_path_factory.mktemp(name)
    summary = runner.run_experiment(runner.load_experiment(CONFIGS / f"{name}.yaml", ci=True), out, progress=False)
    return summary, json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="module")
def chen(tmp_path_factory):
    return _run("chen_alignment_gap", tmp_path_factory)


@pytest.fixture(scope="module")
def liu(tmp_path_factory):
    return _run("liu_rpo", tmp_path_factory)


def test_chen_outputs(chen):
    summary, results, out = chen
    assert set(runner.SUMMARY_KEYS) <= set(summary) and (out / "summary.json").is_file()
    assert summary["numbers"]["gap_points"] == results["numbers"]["gap_points"]  # headline = results.json
    assert summary["numbers"]["e_gammas"] == [1.0]
    for png in ("chen_trajectories.png", "chen_tau.png", "chen_rank_vs_winrate.png", "chen_gamma_sweep.png"):
        assert (out / png).stat().st_size > 1000, png
    assert results["seeds"] == [0, 1, 2] and len(results["runs"]) == 3
    assert all(len(r["trajectory"]["ranking_accuracy"]) == 11 for r in results["runs"])  # 160 / 16 + 1 records


def test_chen_reference_and_idealized_accuracy(chen):
    n = chen[1]["numbers"]
    assert abs(n["R_reference"] - 0.5) < 0.1  # measured 0.47 ± 0.04: a random reference ranks at chance
    # Correct likelihood ratios: |c| ~ 11 nats exceeds logit(alpha) <= 6.9, so R* at beta >= 1 stays near the
    # reference's accuracy; measured median-beta R* 0.53 ± 0.04, released-code formula 0.84 ± 0.02.
    assert n["R_star_median"] < 0.65
    assert n["R_star_released_code_median"] > n["R_star_median"] + 0.2
    assert n["R_star_beta_train"] > n["R_star_median"] + 0.1  # measured 0.76 ± 0.04 vs 0.53 ± 0.04


def test_chen_claim_a_gap_not_reproduced(chen):
    n = chen[1]["numbers"]
    # measured gap vs median R*: -10.2 ± 2.7 points (every seed <= -6): R at the best checkpoint EXCEEDS it.
    assert n["gap_points"] < 0
    # against R*(beta = 0.1), the beta actually trained: +12.6 ± 2.3 points, a real but modest gap.
    assert n["gap_points_beta_train"] > 5
    assert not n["check_a_gap_large"]


def test_chen_claim_b_flips_not_few(chen):
    n = chen[1]["numbers"]
    # measured share of misranked pairs flipped at the best checkpoint: 0.35 ± 0.05 (paper: < 0.10).
    assert n["flip_share_best"] > 0.2
    assert n["flip_share_final"] > n["flip_share_best"]  # measured 0.59 ± 0.08 at the last step
    assert not n["check_b_few_flips"]


def test_chen_claim_c_flip_threshold_predicts_flips(chen):
    n = chen[1]["numbers"]
    assert n["tau_auc_final"] > 0.62  # measured 0.77 ± 0.06
    assert n["check_c_tau_predicts_flips"]


def test_chen_claim_d_ranking_and_win_rate_near_reference(chen):
    n = chen[1]["numbers"]
    # near the reference both rise together: dR 0.18 ± 0.04, dWR 0.13 ± 0.04, correlation 0.96 ± 0.02.
    assert n["d_dR_near"] > 0.05 and n["d_dWR_near"] > 0.03
    assert n["d_corr_near"] > 0.8
    # far from it the correlation is weaker and noisy (0.54 ± 0.36 over six seeds; never clearly negative),
    # so the paper's late anti-correlation is not asserted: it did not reproduce here.


def test_chen_verdict_is_honest(chen):
    summary, results, _ = chen
    assert summary["reproduced"] is False
    assert summary["reproduced"] == all(results["checks"].values())


def test_liu_outputs(liu):
    summary, results, out = liu
    assert set(runner.SUMMARY_KEYS) <= set(summary)
    assert summary["numbers"]["variants"] == ["dpo", "rpo_eta0.005", "rpo_eta0.3"]
    assert (out / "liu_trajectories.png").stat().st_size > 1000
    assert {r["variant"] for r in results["runs"]} == {"dpo", "rpo_eta0.005", "rpo_eta0.3"}
    assert len(results["runs"]) == 9


def test_liu_rpo_keeps_chosen_likelihood_higher(liu):
    n = liu[1]["numbers"]
    # DPO lowers log pi(y_w) (likelihood displacement): by 4.7 ± 0.2 nats (-3.24 -> -7.96).
    assert n["dpo_chosen_logps"] < n["dpo_chosen_logps_initial"] - 2.0
    # paper eta = 0.005: +0.31 ± 0.07 nats over DPO; eta = 0.3: +4.5 ± 0.2.
    assert n["rpo_minus_dpo_chosen_logps"] > 0.1
    assert n["rpo_eta0.3_minus_dpo_chosen_logps"] > 2.0
    assert n["check_chosen_likelihood_higher"]


def test_liu_rpo_win_rate_not_lower_but_not_higher(liu):
    n = liu[1]["numbers"]
    # paper eta: true win rate -0.0018 ± 0.0021 vs DPO: equal within the 0.01 tolerance, not higher.
    assert abs(n["rpo_minus_dpo_win_rate"]) < 0.01
    assert not n["win_rate_strictly_higher"]
    # a larger eta keeps the policy near the reference and LOWERS the true win rate: -0.052 ± 0.019.
    assert n["rpo_eta0.3_minus_dpo_win_rate"] < -0.02
    assert n["check_win_rate_not_lower"]
    assert liu[0]["reproduced"] is True
