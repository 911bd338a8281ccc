"""CHES / LN-CHES (Razin et al. 2025): formula, subset selection, baselines, and parity with a naive NumPy
computation from ``transformers``' ``hidden_states[-1]`` on the same tiny random Llama."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import metrics
from jaxpref.data.tokenize import TokenizedPairs, TokenizeStats
from jaxpref.testing.models import fast_compile


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


def _naive(hp: np.ndarray, hn: np.ndarray) -> tuple[float, float]:
    """Razin's per-example script on [|y|+1, D] predictor states (float64)."""
    sp, sn = hp.sum(0), hn.sum(0)
    ches = sp @ sn - sp @ sp
    ln = sp @ sn / (len(hp) * len(hn)) - sp @ sp / len(hp) ** 2
    return ches, ln


def test_formula_matches_naive():
    rng = np.random.default_rng(0)
    hp, hn = rng.normal(size=(5, 7, 4)), rng.normal(size=(5, 3, 4))
    got = metrics.ches_scores(jnp.asarray(hp.sum(1)), jnp.asarray(hn.sum(1)), jnp.full(5, 7.0), jnp.full(5, 3.0))
    want = np.array([_naive(a, b) for a, b in zip(hp, hn)])
    np.testing.assert_allclose(got.ches, want[:, 0], rtol=1e-5)
    np.testing.assert_allclose(got.ln_ches, want[:, 1], rtol=1e-5, atol=1e-6)


def test_identical_responses_score_zero():
    s = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8)))
    got = metrics.ches_scores(s, s, jnp.full(3, 4.0), jnp.full(3, 4.0))
    np.testing.assert_allclose(got.ches, 0.0, atol=1e-5)
    np.testing.assert_allclose(got.ln_ches, 0.0, atol=1e-6)


def test_quantile_window_and_lowest():
    scores = jnp.asarray([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0, 6.0, 4.0])  # argsort: 5 1 7 3 9 0 8 4 6 2
    order = [5, 1, 7, 3, 9, 0, 8, 4, 6, 2]
    assert list(np.asarray(metrics.quantile_window(scores, 0.0, 3))) == order[:3]  # clamped at the start
    assert list(np.asarray(metrics.quantile_window(scores, 1.0, 3))) == order[-3:]  # clamped at the end
    # q = 0.5: centre round(4.5) = 4 (banker's rounding of .5 -> 4), start 4 - 1 = 3.
    assert list(np.asarray(metrics.quantile_window(scores, 0.5, 3))) == order[3:6]
    assert list(np.asarray(metrics.quantile_window(scores, 0.25, 4))) == order[0:4]  # centre 2, start 0
    assert list(np.asarray(metrics.lowest_k(scores, 2))) == [5, 1]
    assert list(metrics.lowest_fraction(scores, 0.05)) == [5]  # ceil(0.5) = 1
    assert len(metrics.lowest_fraction(scores, 0.25)) == 3  # ceil(2.5)
    with pytest.raises(ValueError):
        metrics.lowest_fraction(scores, 0.0)


def test_edit_distance():
    assert metrics.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.normalized_edit_distance([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(0.25)
    assert metrics.normalized_edit_distance([], []) == 0.0
    np.testing.assert_allclose(metrics.normalized_edit_distances([[1], [2, 2]], [[3], [2]]), [1.0, 0.5])


def test_last_hidden_inner_product():
    a, b = jnp.asarray([[1.0, 2.0], [0.0, 1.0]]), jnp.asarray([[3.0, 4.0], [5.0, -2.0]])
    np.testing.assert_allclose(metrics.last_hidden_inner_product(a, b), [11.0, -2.0])


@pytest.mark.torch
def test_ches_matches_transformers_hidden_states(tmp_path):
    import torch

    from jaxpref import evaluation
    from jaxpref.models import load_hf, presets
    from jaxpref.testing.hf_factory import save_hf_model

    cfg = presets.tiny_llama()
    hf_model, path = save_hf_model(cfg, tmp_path / "hf", seed=3)
    model = load_hf(path)
    eos = cfg.eos_token_id
    rng = np.random.default_rng(0)
    prompts, chosen, rejected = [], [], []
    for n_p, n_c, n_r in ((5, 4, 7), (3, 9, 2), (8, 1, 5)):
        prompts.append(rng.integers(3, cfg.vocab_size, n_p).astype(np.int32))
        # responses end with EOS (a target), as the data pipeline builds them
        chosen.append(np.append(rng.integers(3, cfg.vocab_size, n_c), eos).astype(np.int32))
        rejected.append(np.append(rng.integers(3, cfg.vocab_size, n_r), eos).astype(np.int32))
    pairs = TokenizedPairs(prompt=prompts, chosen=chosen, rejected=rejected, row=np.arange(3), ids=["a", "b", "c"],
                           votes=np.ones(3, np.float32), tie=np.zeros(3, bool), pad_id=0, stats=TokenizeStats())
    scores = evaluation.score_pairs(model, pairs, batch_size=2, with_hidden=True, progress=False)
    hs, cnt = jnp.asarray(scores.hidden_sums), jnp.asarray(scores.counts)
    got = metrics.ches_scores(hs[:, 0], hs[:, 1], cnt[:, 0], cnt[:, 1])
    got_ip = metrics.last_hidden_inner_product(scores.last_hidden[:, 0], scores.last_hidden[:, 1])

    want = []
    for p, c, r in zip(prompts, chosen, rejected):
        states = []
        for y in (c, r):
            # Razin's per-example script: prompt + y without EOS, hidden_states[-1][query_len - 1:].
            ids = torch.tensor(np.concatenate([p, y[:-1]])[None].astype(np.int64))
            with torch.no_grad():
                h = hf_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double().numpy()
            states.append(h[len(p) - 1:])
        want.append((*_naive(*states), states[0][-1] @ states[1][-1], len(states[0]), len(states[1])))
    want = np.array(want)
    np.testing.assert_array_equal(scores.counts, want[:, 3:5])  # |y| + 1 predictors (EOS prediction included)
    np.testing.assert_allclose(got.ches, want[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.ln_ches, want[:, 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_ip, want[:, 2], rtol=1e-4, atol=1e-4)
