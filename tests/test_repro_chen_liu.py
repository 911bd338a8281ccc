"""The Chen et al. and Liu et al. reproductions on the exact testbed, run with their YAML ``ci`` settings.

Every margin below comes from running the ``ci`` settings with six seeds (0-5) and is written next to
the assertion as ``measured: mean ± sd over seeds``; the tests run three seeds (0-2), so the asserted
bounds sit at least three standard errors of a three-seed mean from the measured means.

The tests assert measured quantities (and their spread), never a verdict: a fix that made a claim reproduce
changes the numbers these bounds are about, not a pinned ``reproduced`` flag. Aggregates and verdicts are
checked against independent computations: R* by enumeration of the testbed pairs in NumPy (the paper's
closed form, Cor. 3.3, from a reference scored by ``synthetic.response_logps``), and every check of the
criterion recomputed from the per-seed trajectories with NumPy / SciPy.

Chen: on the testbed the alignment-gap and few-flips claims do not reproduce (DPO flips about a third of
the reference-misranked pairs by the lowest-validation-loss checkpoint, and with correctly computed
likelihood ratios the median-β R* is low because the reference log-ratios are large); the flip threshold
τ does predict which pairs flip. Liu: RPO keeps log π(y_w) higher; its true win rate is within a point of
DPO's, not higher as the paper claims.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import scipy.stats

from jaxpref.data import synthetic
from jaxpref.experiments import chen as chen_module
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


def _se_bound(values, sign: float) -> float:
    """mean + sign · 2 SE of per-seed ``values`` (SciPy's standard error, ddof = 1)."""
    return float(np.mean(values) + sign * 2.0 * scipy.stats.sem(values))


def _dpo_runs(results: dict) -> list[dict]:
    p = results["params"]
    return [r for r in results["runs"] if r["gamma"] == 1.0 and r["head_scale"] == p["reference_head_scale"]]


def _best_record(run: dict) -> int:
    """The lowest-validation-loss trained record, from the stored validation-loss trajectory."""
    return 1 + int(np.argmin(run["trajectory"]["val_loss"][1:]))


def test_chen_outputs(chen):
    summary, results, out = chen
    assert set(runner.SUMMARY_KEYS) <= set(summary) and (out / "summary.json").is_file()
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


def test_chen_idealized_accuracy_by_enumeration(chen):
    """Seed 0's R* (every β), reference accuracy and |c| from an independent route: the reference scored by
    ``synthetic.response_logps`` (not the trainer's policy tables) and Chen's Cor. 3.3 in float64 NumPy."""
    results = chen[1]
    p = chen_module.ChenParams.from_dict(results["params"])
    testbed = p.make_testbed()
    model = testbed.init_model(0, **p.model_kw())
    model.lm_head_dv.set_value(model.lm_head_dv[...] * p.reference_head_scale)
    ref = np.asarray(synthetic.response_logps(model, testbed), np.float64)  # [K, N]
    pref = synthetic.bt_preference(synthetic.random_reward(testbed, scale=p.reward_scale, seed=0, kind=p.reward_kind))
    pairs = synthetic.sample_pairs(testbed, pref, None, n_pairs=p.n_train, n_votes=p.n_votes, seed=0)
    votes_first = np.asarray(pairs.votes_first)
    first_wins = 2 * votes_first > np.asarray(pairs.n_votes)  # odd vote counts: no ties
    chosen = np.where(first_wins, pairs.first, pairs.second)
    rejected = np.where(first_wins, pairs.second, pairs.first)
    alpha = np.where(first_wins, votes_first, pairs.n_votes - votes_first) / np.asarray(pairs.n_votes, np.float64)
    delta = ref[pairs.prompt, chosen] - ref[pairs.prompt, rejected]
    alpha = np.clip(alpha, 1e-3, 1 - 1e-3)
    r_star = [float(np.mean(delta + np.log(alpha / (1 - alpha)) / beta > 0)) for beta in p.idealized_betas]
    run0 = next(r for r in _dpo_runs(results) if r["seed"] == 0)
    one_pair = 1.0 / len(delta) + 1e-9  # a float32 log-ratio within rounding of 0 may flip one pair
    np.testing.assert_allclose(run0["idealized"]["r_star"], r_star, atol=one_pair)
    assert run0["R_reference"] == pytest.approx(np.mean(delta >= 0), abs=one_pair)
    assert run0["reference_misranked_share"] == pytest.approx(np.mean(delta < 0), abs=one_pair)
    assert run0["abs_c_median"] == pytest.approx(np.median(np.abs(delta)), rel=1e-4)  # float32 sums of 3 tokens


def test_chen_verdict_follows_from_the_per_seed_trajectories(chen):
    """(a)–(c) recomputed from the stored trajectories (best record, R, R*, flip share) with SciPy's SE."""
    summary, results, _ = chen
    p, runs = results["params"], _dpo_runs(results)
    gaps = [100 * (np.median(r["idealized"]["r_star"]) - r["trajectory"]["ranking_accuracy"][_best_record(r)])
            for r in runs]
    flips = [r["trajectory"]["flip_share"][_best_record(r)] for r in runs]
    aucs = [r["flips_final"]["tau_auc"] for r in runs]
    n = summary["numbers"]
    assert n["gap_points"] == pytest.approx(np.mean(gaps), abs=1e-9)
    assert n["flip_share_best"] == pytest.approx(np.mean(flips), abs=1e-12)
    checks = {"check_a_gap_large": _se_bound(gaps, -1) > p["gap_points"],
              "check_b_few_flips": _se_bound(flips, +1) < p["flip_share"],
              "check_c_tau_predicts_flips": _se_bound(aucs, -1) > 0.5}
    assert {k: n[k] for k in checks} == checks
    assert summary["reproduced"] == all(checks.values())


def test_chen_claim_a_gap_measured(chen):
    n = chen[1]["numbers"]
    # measured gap vs median R*: -10.2 ± 2.7 points (every seed <= -6): R at the best checkpoint EXCEEDS it.
    assert n["gap_points"] < 0 and n["gap_points_sd"] < 8
    # against R*(beta = 0.1), the beta actually trained: +12.6 ± 2.3 points, a real but modest gap.
    assert n["gap_points_beta_train"] > 5


def test_chen_claim_b_flip_share_measured(chen):
    n = chen[1]["numbers"]
    # measured share of misranked pairs flipped at the best checkpoint: 0.35 ± 0.05 (paper: < 0.10).
    assert n["flip_share_best"] > 0.2 and n["flip_share_best_sd"] < 0.15
    assert n["flip_share_final"] > n["flip_share_best"]  # measured 0.59 ± 0.08 at the last step


def test_chen_claim_c_flip_threshold_predicts_flips(chen):
    n = chen[1]["numbers"]
    assert n["tau_auc_final"] > 0.62 and n["tau_auc_final_sd"] < 0.15  # measured 0.77 ± 0.06


def test_chen_claim_d_ranking_and_win_rate_near_reference(chen):
    n = chen[1]["numbers"]
    # near the reference both rise together: dR 0.18 ± 0.04, dWR 0.13 ± 0.04, correlation 0.96 ± 0.02.
    assert n["d_dR_near"] > 0.05 and n["d_dWR_near"] > 0.03
    assert n["d_corr_near"] > 0.8
    # far from it the correlation is weaker and noisy (0.54 ± 0.36 over six seeds; never clearly negative),
    # so the paper's late anti-correlation is not asserted: it did not reproduce here.


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


def _liu_final(results: dict, variant: str, key: str) -> np.ndarray:
    by_seed = {r["seed"]: r["trajectory"][key][-1] for r in results["runs"] if r["variant"] == variant}
    return np.asarray([by_seed[s] for s in results["seeds"]])


def test_liu_rpo_win_rate_measured(liu):
    n = liu[1]["numbers"]
    # paper eta: true win rate -0.0018 ± 0.0021 vs DPO: equal within a point (the paper claims higher).
    assert abs(n["rpo_minus_dpo_win_rate"]) < 0.01 and n["rpo_minus_dpo_win_rate_sd"] < 0.01
    # a larger eta keeps the policy near the reference and LOWERS the true win rate: -0.052 ± 0.019.
    assert n["rpo_eta0.3_minus_dpo_win_rate"] < -0.02


def test_liu_verdict_follows_from_the_per_seed_finals(liu):
    """The paired RPO − DPO differences and both checks recomputed from the stored trajectories (NumPy/SciPy)."""
    summary, results, _ = liu
    primary = f"rpo_eta{results['params']['eta']:g}"
    d_chosen = _liu_final(results, primary, "chosen_logps") - _liu_final(results, "dpo", "chosen_logps")
    d_wr = _liu_final(results, primary, "win_rate") - _liu_final(results, "dpo", "win_rate")
    n = summary["numbers"]
    assert n["rpo_minus_dpo_chosen_logps"] == pytest.approx(d_chosen.mean(), abs=1e-9)
    assert n["rpo_minus_dpo_win_rate"] == pytest.approx(d_wr.mean(), abs=1e-12)
    checks = {"check_chosen_likelihood_higher": _se_bound(d_chosen, -1) > 0,
              "check_win_rate_higher": _se_bound(d_wr, -1) > 0}
    assert {k: n[k] for k in checks} == checks
    assert n["win_rate_not_lower"] == (_se_bound(d_wr, +1) >= -results["params"]["win_rate_tolerance"])
    assert summary["reproduced"] == all(checks.values())
