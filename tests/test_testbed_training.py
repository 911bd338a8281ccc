"""jaxpref.experiments.testbed_training: the exact-testbed trainer shared by the reproductions."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses
from jaxpref.config import OptimConfig
from jaxpref.data import synthetic
from jaxpref.experiments import testbed_training as tt
from jaxpref.testing.models import fast_compile

SGD = OptimConfig(name="sgd", lr=0.5, clip_norm=None)


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def bed():
    """A small testbed (K=3, N=27), a BT truth, a peaked tabular reference and 48 voted pairs."""
    testbed = synthetic.Testbed(num_prompts=3, prompt_length=2, alphabet_size=3, response_length=3)
    pref = synthetic.bt_preference(synthetic.random_reward(testbed, seed=1, scale=2.0))
    ref = np.asarray(jax.nn.log_softmax(synthetic.random_reward(testbed, seed=2, scale=2.0), axis=-1))
    pairs = synthetic.sample_pairs(testbed, pref, None, n_pairs=48, n_votes=3, seed=3)
    policy, params = tt.tabular_policy(testbed, ref)
    return {"testbed": testbed, "pref": pref, "ref": ref, "pairs": pairs, "policy": policy, "params": params}


def test_lm_policy_matches_synthetic_response_logps(bed):
    testbed = bed["testbed"]
    model = tt.init_lm(testbed, 0, head_scale=2.0, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    policy, params = tt.lm_policy(model, testbed)
    table = np.asarray(policy.logps(params))
    np.testing.assert_allclose(table, np.asarray(synthetic.response_logps(model, testbed)), atol=1e-5)
    np.testing.assert_allclose(np.exp(table).sum(-1), 1.0, atol=1e-5)
    prompt, responses = jnp.asarray([2, 0]), jnp.asarray([[5, 26, 0], [1, 1, 13]])
    picked = policy.sequence_logps_fn(params, policy.tables, prompt, responses)
    np.testing.assert_allclose(np.asarray(picked), table[[[2], [0]], np.asarray(responses)], atol=1e-5)
    with pytest.raises(ValueError, match="vocab_size == alphabet_size"):
        tt.lm_policy(synthetic.Testbed(num_prompts=2, alphabet_size=3, response_length=2).init_model(
            0, vocab_size=5, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32), testbed)


def test_lm_training_records_exact_logps(bed):
    """LM run: record 0 is the reference, parameters move, and the recorded table is the final policy's."""
    testbed = bed["testbed"]
    model = tt.init_lm(testbed, 1, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    policy, params = tt.lm_policy(model, testbed)
    ref = policy.logps(params)
    config = tt.TrainConfig(steps=4, batch_size=16, record_every=2, optim=OptimConfig(name="adam", lr=1e-2,
                                                                                      clip_norm=None))
    traj = tt.train(policy, {"name": "sigmoid", "beta": 0.1}, config, params, ref, bed["pairs"], jax.random.key(0))
    assert traj.logps.shape == (3, 3, 27) and traj.param_sq_dist.shape == (3,)
    np.testing.assert_allclose(np.asarray(traj.logps[0]), np.asarray(ref), atol=1e-6)
    assert traj.param_sq_dist[0] == 0 and 0 < traj.param_sq_dist[1] < traj.param_sq_dist[2]
    np.testing.assert_allclose(np.asarray(traj.logps[-1]), np.asarray(policy.logps(traj.params)), atol=1e-5)
    assert math.isnan(float(traj.loss[0])) and np.isfinite(np.asarray(traj.loss[1:])).all()


def test_first_step_dpo_loss_is_ln2_and_training_learns_the_pairs(bed):
    """Policy = reference gives DPO loss ln 2 (design.md §5); full-batch SGD then ranks the pairs better."""
    pol, params, ref, pairs = bed["policy"], bed["params"], bed["ref"], bed["pairs"]
    one = tt.train(pol, {"name": "sigmoid", "beta": 0.5}, tt.TrainConfig(steps=1, batch_size=64, record_every=1,
                                                                          optim=SGD), params, ref, pairs,
                   jax.random.key(0))
    assert float(one.loss[1]) == pytest.approx(math.log(2.0), abs=1e-6)
    config = tt.TrainConfig(steps=200, batch_size=64, record_every=50, optim=dataclasses.replace(SGD, lr=20.0))
    traj = tt.train(pol, {"name": "sigmoid", "beta": 0.5}, config, params, ref, pairs, jax.random.key(0))
    loss = np.asarray(traj.loss[1:])
    assert np.all(np.diff(loss) < 0), loss  # full-batch gradient descent on a convex-in-logits loss
    acc = [float(synthetic.exact_ranking_accuracy(traj.logps[r], pairs)) for r in (0, -1)]
    assert acc[0] < 0.6 and acc[1] > 0.9, acc  # a tabular policy can rank every (transitive) training pair


def test_sweeps_and_seeds_vmap_equal_separate_runs(bed):
    """One vmapped program over γ (traced hparam) and data/key equals the separately compiled runs."""
    pol, params, ref, pairs = bed["policy"], bed["params"], bed["ref"], bed["pairs"]
    # SGD, not Adam: Adam divides near-zero gradients by their own size and so amplifies float round-off
    config = tt.TrainConfig(steps=20, batch_size=16, record_every=10, optim=dataclasses.replace(SGD, lr=5.0))
    other = synthetic.sample_pairs(bed["testbed"], bed["pref"], None, n_pairs=48, n_votes=3, seed=9)
    data = tt.stack_trees([tt.PairData.from_pairs(pairs), tt.PairData.from_pairs(other)])
    keys = jax.vmap(jax.random.key)(jnp.asarray([0, 1]))
    gammas = np.asarray([0.5, 1.0], np.float32)
    swept = tt.train(pol, {"name": "gamma_dpo", "beta": 0.2}, config, params, ref, data, keys,
                     {"gamma_dpo.gamma": gammas}, vmap=[("data", "key"), ("hparams",)])
    assert swept.logps.shape == (2, 2, 3, 3, 27)
    for g, gamma in enumerate(gammas):
        for s, (d, key) in enumerate([(pairs, 0), (other, 1)]):
            alone = tt.train(pol, {"name": "gamma_dpo", "beta": 0.2, "gamma": float(gamma)}, config, params, ref, d,
                             jax.random.key(key))
            np.testing.assert_allclose(np.asarray(swept.logps[g, s]), np.asarray(alone.logps), atol=2e-5)
    dpo = tt.train(pol, {"name": "sigmoid", "beta": 0.2}, config, params, ref, pairs, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(swept.logps[1, 0]), np.asarray(dpo.logps), atol=2e-5)  # γ = 1 is DPO


def test_term_weight_sweep_zero_is_the_bare_loss(bed):
    """A swept composition weight of 0 on the NLL term gives DPO; a positive one raises log π(y_w)."""
    pol, params, ref, pairs = bed["policy"], bed["params"], bed["ref"], bed["pairs"]
    config = tt.TrainConfig(steps=30, batch_size=48, record_every=30, optim=SGD)
    spec = [{"name": "sigmoid", "beta": 0.1}, {"name": "nll_sum", "weight": 0.0}]
    swept = tt.train(pol, spec, config, params, ref, pairs, jax.random.key(0), {"nll_sum.weight": [0.0, 0.5]},
                     vmap=[("hparams",)])
    dpo = tt.train(pol, {"name": "sigmoid", "beta": 0.1}, config, params, ref, pairs, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(swept.logps[0]), np.asarray(dpo.logps), atol=2e-5)
    data = tt.PairData.from_pairs(pairs)
    chosen = tt.trajectory_metrics(swept.logps[:, -1], jnp.asarray(ref), bed["pref"], data)["chosen_logps"]
    assert float(chosen[1]) > float(chosen[0]) + 0.1


def test_bad_arguments_raise(bed):
    pol, params, ref, pairs = bed["policy"], bed["params"], bed["ref"], bed["pairs"]
    config = tt.TrainConfig(steps=2, batch_size=8, record_every=1, optim=SGD)
    with pytest.raises(ValueError, match="gamma"):
        tt.train(pol, "gamma_dpo", config, params, ref, pairs, jax.random.key(0), {"gamma_dpo.gamma": [1.0, -1.0]},
                 vmap=[("hparams",)])
    with pytest.raises(ValueError, match="term key"):
        tt.train(pol, "sigmoid", config, params, ref, pairs, jax.random.key(0), {"dpo.beta": 0.1})
    with pytest.raises(ValueError, match="has fields"):
        tt.train(pol, "sigmoid", config, params, ref, pairs, jax.random.key(0), {"sigmoid.gamma": 0.1})
    with pytest.raises(ValueError, match="vmap level"):
        tt.train(pol, "sigmoid", config, params, ref, pairs, jax.random.key(0), vmap=[("seeds",)])
    with pytest.raises(ValueError, match="multiple of record_every"):
        tt.TrainConfig(steps=10, record_every=3)
    with pytest.raises(TypeError, match="OptimConfig"):
        tt.TrainConfig(optim={"name": "adam"})
    assert isinstance(losses.compose("sigmoid"), losses.Composition)


def test_epoch_batches_cover_every_pair_once_per_epoch():
    idx = np.asarray(tt._epoch_batches(jax.random.key(3), 12, steps=6, batch_size=4))
    assert idx.shape == (6, 4)
    for epoch in idx.reshape(2, 12):
        assert sorted(epoch.tolist()) == list(range(12))
    full = np.asarray(tt._epoch_batches(jax.random.key(3), 5, steps=2, batch_size=8))
    assert full.tolist() == [list(range(5))] * 2


def test_trajectory_metrics_match_synthetic(bed):
    pairs, ref, pref = bed["pairs"], jnp.asarray(bed["ref"]), bed["pref"]
    lp = jax.nn.log_softmax(jnp.asarray(synthetic.random_reward(bed["testbed"], seed=5)), axis=-1)
    m = tt.trajectory_metrics(jnp.stack([ref, lp]), ref, pref, tt.PairData.from_pairs(pairs))
    assert float(m["win_rate"][0]) == pytest.approx(0.5, abs=1e-6) and float(m["kl"][0]) == pytest.approx(0, abs=1e-6)
    assert float(m["win_rate"][1]) == pytest.approx(float(synthetic.win_rate(lp, ref, pref)), abs=1e-6)
    assert float(m["kl"][1]) == pytest.approx(float(synthetic.mean_kl(lp, ref)), abs=1e-6)
    assert float(m["ranking_accuracy"][1]) == pytest.approx(float(synthetic.exact_ranking_accuracy(lp, pairs)))
    chosen = np.asarray(lp)[pairs.prompt, pairs.chosen].mean()
    assert float(m["chosen_logps"][1]) == pytest.approx(float(chosen), abs=1e-5)


def test_auc_and_seed_stats():
    assert tt.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert tt.auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert tt.auc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5
    assert tt.auc([0.3, 0.1, 0.2, 0.4], [1, 0, 0, 1]) == 1.0
    assert math.isnan(tt.auc([1.0, 2.0], [1, 1]))
    mean, sd, se = tt.seed_stats([1.0, 3.0, float("nan")])
    assert (mean, sd, se) == pytest.approx((2.0, math.sqrt(2.0), 1.0))
