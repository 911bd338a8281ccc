"""The exact-oracle testbed (jaxpref.data.synthetic) against NumPy brute force on small sizes."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref import evaluation, losses
from jaxpref.data import load_preferences
from jaxpref.data import synthetic as S
from jaxpref.data.formats import format_config
from jaxpref.data.tokenize import TokenizeConfig
from jaxpref.loading import check_vocab, load_tokenizer
from jaxpref.testing.models import fast_compile
from jaxpref.training.step import split_model


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def tb():
    return S.Testbed(num_prompts=3, prompt_length=2, alphabet_size=3, response_length=2)  # N = 9


@pytest.fixture(scope="module")
def model(tb):
    return tb.init_model(0)


@pytest.fixture(scope="module")
def lp(model, tb):
    return S.response_logps(model, tb)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _brute_logps(model, tb, alphabet):
    """Runs the model on each sequence alone, restricts its full logits to ``alphabet``, sums the targets."""
    alphabet = np.asarray(alphabet)
    p = tb.config.prompt_length
    graphdef, state = nnx.split(model)
    full_logits = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, return_logits=True).logits)
    out = np.zeros((tb.num_prompts, tb.num_responses))
    for k, n in itertools.product(range(tb.num_prompts), range(tb.num_responses)):
        seq = np.concatenate([tb.prompts[k], tb.responses[n]])
        logits = np.asarray(full_logits(state, jnp.asarray(alphabet[seq])[None])[0], np.float64)  # [T, V]
        for t in range(p, len(seq)):
            out[k, n] += _np_log_softmax(logits[t - 1, alphabet])[seq[t]]
    return out


# ------------------------------------------------------------------------------------ testbed


def test_config_validation():
    for bad, match in [(dict(num_prompts=7, prompt_length=2, alphabet_size=3), "only 6 non-constant"),
                       (dict(prompt_length=1), "constant"), (dict(alphabet_size=1), "alphabet_size"),
                       (dict(alphabet_size=27), "alphabet_size"), (dict(response_length=0), ">= 1"),
                       (dict(alphabet_size=4, response_length=9), "at most 65536"), (dict(seed=-1), "seed")]:
        with pytest.raises(ValueError, match=match):
            S.TestbedConfig(**bad)
    with pytest.raises(TypeError, match="num_prompts"):
        S.TestbedConfig(num_prompts=True)
    ok = S.TestbedConfig(num_prompts=3, prompt_length=1, alphabet_size=3, allow_constant_prompts=True)
    assert S.Testbed(ok).prompts.tolist() == [[0], [1], [2]]


def test_enumeration_and_indices(tb):
    c = tb.config
    assert tb.responses.shape == (9, 2) and tb.prompts.shape == (3, 2)
    assert tb.responses.tolist() == sorted(tb.responses.tolist())  # lexicographic
    np.testing.assert_array_equal(tb.response_index(tb.responses), np.arange(9))
    np.testing.assert_array_equal(tb.prompt_index(tb.prompts), np.arange(3))
    assert len({tuple(p) for p in tb.prompts.tolist()}) == 3
    assert all(len(set(p)) > 1 for p in tb.prompts.tolist())  # non-constant prompts
    seqs = tb.sequences()
    assert seqs.shape == (3, 9, 4) and seqs.dtype == np.int32
    np.testing.assert_array_equal(seqs[2, 5], np.concatenate([tb.prompts[2], tb.responses[5]]))
    assert tb.response_index(np.array([[[1, 2]]])).shape == (1, 1) and int(tb.response_index([2, 1])) == 7
    with pytest.raises(ValueError, match="outside the alphabet"):
        tb.response_index([0, 3])
    with pytest.raises(ValueError, match="last axis of length L=2"):
        tb.response_index([0, 1, 2])
    missing = next(p for p in itertools.product(range(3), repeat=2) if list(p) not in tb.prompts.tolist())
    with pytest.raises(ValueError, match="not one of the testbed"):
        tb.prompt_index(missing)
    same = S.Testbed(c)
    np.testing.assert_array_equal(same.prompts, tb.prompts)
    big = S.Testbed(num_prompts=8, seed=1)
    assert big.prompts.shape == (8, 3) and big.num_responses == 256
    assert tb.to_text([2, 0, 1]) == "c a b"


# ------------------------------------------------------------------------------------ LM log-probs


def test_response_logps_matches_brute_force(model, tb, lp):
    assert lp.shape == (3, 9) and lp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lp), _brute_logps(model, tb, range(3)), atol=1e-5)
    np.testing.assert_allclose(jax.nn.logsumexp(lp, axis=-1), 0.0, atol=1e-5)
    assert float(S.entropy(lp).min()) > 0.5  # init_std 0.2: not a point mass


def test_response_logps_alphabet_subset_of_larger_vocab(tb):
    """A tied-embedding model with 11 tokens; the testbed tokens are model ids 7, 2, 9."""
    model = tb.init_model(3, vocab_size=11, tie_word_embeddings=True)
    alphabet = (7, 2, 9)
    got = S.response_logps(model, tb, alphabet=alphabet)
    np.testing.assert_allclose(np.asarray(got), _brute_logps(model, tb, alphabet), atol=1e-5)
    np.testing.assert_allclose(jax.nn.logsumexp(got, axis=-1), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="vocabulary"):
        S.response_logps(model, tb, alphabet=(7, 2, 11))
    with pytest.raises(ValueError, match="distinct"):
        S.response_logps(model, tb, alphabet=(7, 7, 9))


# ------------------------------------------------------------------------------------ preferences


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _brute_cycle(pref_k):
    n = pref_k.shape[0]
    return any(pref_k[a, b] > 0.5 and pref_k[b, c] > 0.5 and pref_k[c, a] > 0.5
               for a, b, c in itertools.permutations(range(n), 3))


def test_preference_functions(tb):
    r = S.random_reward(tb, scale=2.0, seed=3)
    assert r.shape == (3, 9) and np.all(r == S.random_reward(tb, scale=2.0, seed=3))
    bt = np.asarray(S.bt_preference(r))
    np.testing.assert_allclose(bt, _np_sigmoid(r[:, :, None] - r[:, None, :]), atol=1e-6)
    intr = np.asarray(S.intransitive_preference(tb, strength=2.0, seed=1))
    for pref in (bt, intr):
        np.testing.assert_allclose(pref + pref.transpose(0, 2, 1), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.diagonal(pref, axis1=1, axis2=2), 0.5)
    assert S.find_cycle(bt) is None and not any(_brute_cycle(p) for p in bt)  # BT is transitive
    cycle = S.find_cycle(intr)
    assert cycle is not None
    k, a, b, c = cycle
    assert intr[k, a, b] > 0.5 and intr[k, b, c] > 0.5 and intr[k, c, a] > 0.5
    assert [S.find_cycle(p[None]) is not None for p in intr] == [_brute_cycle(p) for p in intr]
    assert S.find_cycle(np.asarray(S.intransitive_preference(tb, seed=0))) is not None  # default strength too
    reward = S.random_reward(tb, seed=1)
    np.testing.assert_allclose(S.intransitive_preference(tb, strength=0.0, seed=1), S.bt_preference(reward), atol=1e-6)
    np.testing.assert_allclose(S.noisy_preference(bt, 0.0), bt, atol=1e-7)
    np.testing.assert_allclose(S.noisy_preference(bt, 0.5), 0.5, atol=1e-7)
    np.testing.assert_allclose(S.noisy_preference(bt, 1.0), bt.transpose(0, 2, 1), atol=1e-6)
    np.testing.assert_allclose(S.noisy_preference(bt, 0.2), 0.8 * bt + 0.2 * (1 - bt), atol=1e-6)
    with pytest.raises(ValueError, match="flip"):
        S.noisy_preference(bt, 1.5)
    pos = S.random_reward(tb, kind="positional", seed=2)
    # additive in the tokens: r(y1 y2) - r(y1' y2) does not depend on y2
    assert np.allclose(pos[:, 0] - pos[:, 3], pos[:, 1] - pos[:, 4], atol=1e-5)


# ------------------------------------------------------------------------------------ exact quantities


def _random_logps(rng, k, n):
    return _np_log_softmax(2.0 * rng.standard_normal((k, n)))


def test_exact_quantities_against_numpy_loops(tb):
    rng = np.random.default_rng(0)
    k, n = 3, 9
    lp_p, lp_q = _random_logps(rng, k, n), _random_logps(rng, k, n)
    pref = np.asarray(S.intransitive_preference(tb, strength=1.5, seed=2), np.float64)
    mu = np.array([0.2, 0.3, 0.5])
    clip = lambda p: np.clip(p, 1e-3, 1 - 1e-3)
    h_fns = {"identity": lambda p: p, "logit": lambda p: np.log(clip(p) / (1 - clip(p))),
             "log": lambda p: np.log(clip(p))}
    for h, fn in h_fns.items():
        per = np.zeros(k)
        for x, i, j in itertools.product(range(k), range(n), range(n)):
            per[x] += np.exp(lp_p[x, i]) * np.exp(lp_q[x, j]) * fn(pref[x, i, j])
        np.testing.assert_allclose(S.win_rate_per_prompt(lp_p, lp_q, pref, h=h), per, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(S.win_rate(lp_p, lp_q, pref, h=h), per.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(S.win_rate(lp_p, lp_q, pref, h=h, prompt_weights=mu), per @ mu, rtol=1e-5,
                                   atol=1e-6)
    assert float(S.win_rate(lp_p, lp_p, pref)) == pytest.approx(0.5, abs=1e-6)  # against itself
    assert float(S.win_rate(lp_p, lp_p, pref, h="logit")) == pytest.approx(0.0, abs=1e-5)  # logit is odd about 1/2
    wr_pq, wr_qp = S.win_rate(lp_p, lp_q, pref), S.win_rate(lp_q, lp_p, pref)
    assert float(wr_pq + wr_qp) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="h must be"):
        S.win_rate(lp_p, lp_q, pref, h="square")

    p = np.exp(lp_p)
    np.testing.assert_allclose(S.kl(lp_p, lp_q), [sum(p[x, y] * (lp_p[x, y] - lp_q[x, y]) for y in range(n))
                                                 for x in range(k)], rtol=1e-5)
    np.testing.assert_allclose(S.mean_kl(lp_p, lp_q, mu), (p * (lp_p - lp_q)).sum(-1) @ mu, rtol=1e-5)
    np.testing.assert_allclose(S.kl(lp_p, lp_p), 0.0, atol=1e-6)
    np.testing.assert_allclose(S.entropy(lp_p), -(p * lp_p).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(S.entropy(S.uniform_logps(tb)), np.log(9), rtol=1e-6)
    point = np.full((1, 3), -np.inf)
    point[0, 1] = 0.0
    assert float(S.entropy(point)[0]) == 0.0 and float(S.kl(point, np.log(np.full((1, 3), 1 / 3)))[0]) == (
        pytest.approx(np.log(3)))
    r, beta = rng.standard_normal((k, n)), 0.3
    opt = np.exp(lp_q) * np.exp(r / beta)
    np.testing.assert_allclose(np.exp(S.dpo_optimum(lp_q, r, beta)), opt / opt.sum(-1, keepdims=True), rtol=1e-5)
    bt = np.exp(2.0 * r)
    np.testing.assert_allclose(np.exp(S.bt_optimal(r, 2.0)), bt / bt.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(S.expected_reward(lp_p, r), (p * r).sum(-1), rtol=1e-5)


def test_tabular_policy(tb):
    tab = S.TabularPolicy.for_testbed(tb)
    np.testing.assert_allclose(tab.logps(tab.init()), S.uniform_logps(tb), atol=1e-6)
    lp = _random_logps(np.random.default_rng(1), 3, 9)
    np.testing.assert_allclose(tab.logps(tab.init(lp)), lp, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        tab.init(lp[:2])


# ------------------------------------------------------------------------------------ datasets


def test_sample_pairs_statistics(tb, lp):
    pref = np.asarray(S.bt_preference(S.random_reward(tb, seed=4)))
    pairs = S.sample_pairs(tb, pref, lp, n_pairs=30_000, n_votes=1, seed=5)
    again = S.sample_pairs(tb, pref, lp, n_pairs=30_000, n_votes=1, seed=5)
    other = S.sample_pairs(tb, pref, lp, n_pairs=30_000, n_votes=1, seed=6)
    for name in ("prompt", "first", "second", "votes_first", "coin"):
        np.testing.assert_array_equal(getattr(pairs, name), getattr(again, name))
    assert not np.array_equal(pairs.first, other.first)
    assert np.all(pairs.first != pairs.second) and len(pairs) == 30_000
    # ordered-pair frequencies match population_pair_weights (the same distribution, exactly)
    w = np.asarray(S.population_pair_weights(lp))
    freq = np.zeros_like(w)
    np.add.at(freq, (pairs.prompt, pairs.first, pairs.second), 1.0 / len(pairs))
    sigma = np.sqrt(w * (1 - w) / len(pairs))
    assert np.all(np.abs(freq - w) < 5 * sigma + 1e-9)
    # one vote: the first wins with probability p(first > second)
    assert abs(pairs.votes_first.mean() - pairs.p_first.mean()) < 5 * np.sqrt(0.25 / len(pairs))
    np.testing.assert_array_equal(pairs.chosen, np.where(pairs.votes_first == 1, pairs.first, pairs.second))
    np.testing.assert_allclose(pairs.true_p, pref[pairs.prompt, pairs.chosen, pairs.rejected], atol=1e-6)
    assert np.all(pairs.alpha == 1.0) and not pairs.tied.any()

    # many votes: the vote share converges to the true preference
    many = S.sample_pairs(tb, pref, None, n_pairs=200, n_votes=4001, seed=7)
    np.testing.assert_allclose(many.votes_first / many.n_votes, many.p_first, atol=5 * np.sqrt(0.25 / 4001))
    assert np.all((many.alpha >= 0.5) & (many.alpha <= 1.0))
    # even vote counts tie; the coin decides, alpha is 0.5
    ties = S.sample_pairs(tb, np.full_like(pref, 0.5), None, n_pairs=400, n_votes=2, seed=8)
    t = ties.tied
    assert 0.3 < t.mean() < 0.7
    np.testing.assert_array_equal(ties.chosen[t], np.where(ties.coin[t], ties.first[t], ties.second[t]))
    np.testing.assert_allclose(ties.alpha[t], 0.5)
    # a uniform sampler without `distinct` pairs a response with itself about 1/N of the time
    same = S.sample_pairs(tb, pref, None, n_pairs=9000, distinct=False, seed=9)
    assert abs(np.mean(same.first == same.second) - 1 / 9) < 0.02
    with pytest.raises(ValueError, match="normalised"):
        S.sample_pairs(tb, pref, np.zeros((3, 9)), n_pairs=5)
    with pytest.raises(ValueError, match="two responses"):
        S.sample_pairs(tb, pref, np.log(np.eye(9)[:3] + 1e-30), n_pairs=5)
    with pytest.raises(ValueError, match="n_votes"):
        S.sample_pairs(tb, pref, n_pairs=5, n_votes=0)
    sub = pairs.subset(np.arange(3))
    assert len(sub) == 3 and sub.response_length == 2


def test_pair_metrics_against_numpy(tb, lp):
    pref = S.bt_preference(S.random_reward(tb, seed=2))
    pairs = S.sample_pairs(tb, pref, None, n_pairs=500, n_votes=3, seed=1)
    got = np.asarray(S.pair_logps(lp, pairs))
    lp_np = np.asarray(lp)
    assert got.shape == (500, 2)
    np.testing.assert_array_equal(got[:, 0], lp_np[pairs.prompt, pairs.chosen])
    np.testing.assert_array_equal(got[:, 1], lp_np[pairs.prompt, pairs.rejected])
    want = np.mean(got[:, 0] >= got[:, 1])
    assert float(S.exact_ranking_accuracy(lp, pairs)) == pytest.approx(want)
    assert float(S.exact_ranking_accuracy(lp, pairs, normalize=True)) == pytest.approx(want)
    alpha = np.clip(pairs.alpha, 1e-3, 1 - 1e-3)
    for beta in (0.1, 1.0, 10.0):
        d = got[:, 0] - got[:, 1] + np.log(alpha / (1 - alpha)) / beta
        assert float(S.exact_idealized_ranking_accuracy(lp, pairs, beta)) == pytest.approx(np.mean(d > 0))
    assert S.exact_idealized_ranking_accuracy(lp, pairs, [0.1, 1.0]).shape == (2,)


def test_population_loss_matches_enumeration_and_samples(tb, lp):
    pref = np.asarray(S.intransitive_preference(tb, seed=3), np.float64)
    policy = _random_logps(np.random.default_rng(2), 3, 9)
    ref, beta = np.asarray(lp, np.float64), 0.5
    w = np.asarray(S.population_pair_weights(ref), np.float64)
    assert w.sum() == pytest.approx(1.0, abs=1e-5) and np.all(np.diagonal(w, axis1=1, axis2=2) == 0)
    softplus = lambda x: np.log1p(np.exp(x))
    total = 0.0
    for x, i, j in itertools.product(range(3), range(9), range(9)):
        d_ij = (policy[x, i] - ref[x, i]) - (policy[x, j] - ref[x, j])
        total += w[x, i, j] * (pref[x, i, j] * softplus(-beta * d_ij) + pref[x, j, i] * softplus(beta * d_ij))
    got = S.population_loss(policy, ref, pref, w, beta=beta)
    assert float(got) == pytest.approx(total, rel=1e-5)
    # the empirical DPO loss over sampled pairs estimates it
    pairs = S.sample_pairs(tb, pref, ref, n_pairs=40_000, seed=11)
    pl, rl = S.pair_logps(policy, pairs), S.pair_logps(ref, pairs)
    out = losses.get("sigmoid")(losses.LossInputs(pl[:, 0], pl[:, 1], rl[:, 0], rl[:, 1]),
                                losses.make_hparams("sigmoid", beta=beta))
    per_pair = np.asarray(out.loss)
    assert abs(per_pair.mean() - total) < 5 * per_pair.std() / np.sqrt(len(per_pair))


# ------------------------------------------------------------------------------------ DPO optimum by descent


def _adam_minimise(loss_fn, params, *, lr: float, steps: int):
    tx = optax.adam(lr)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, state = carry
            value, grads = jax.value_and_grad(loss_fn)(p)
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), value

        (p, _), values = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return p, values

    return run(params)


def test_dpo_closed_form_optimum_reached_by_tabular_descent(tb, lp):
    """Tabular policy, uniform pairs (full coverage), β = 0.5, 600 Adam steps (lr 0.1).

    Tolerance 1e-5 on mean KL(π* || π_θ): the tabular problem is convex in the logits' differences
    with a unique minimiser up to a per-prompt constant, so only float32 round-off remains (~1e-8
    measured); 1e-5 leaves three orders of magnitude yet fails for any wrong optimum (KL(π* || π_ref)
    is ~0.5 here).
    """
    r = S.random_reward(tb, seed=0)
    pref, beta = S.bt_preference(r), 0.5
    w = S.population_pair_weights(S.uniform_logps(tb))
    tab = S.TabularPolicy.for_testbed(tb)
    optimum = S.dpo_optimum(lp, r, beta)
    loss = lambda params: S.population_loss(tab.logps(params), lp, pref, w, beta=beta)
    params, values = _adam_minimise(loss, tab.init(lp), lr=0.1, steps=600)
    learned = tab.logps(params)
    assert float(S.mean_kl(optimum, lp)) > 0.1  # the optimum is far from the start
    assert float(S.mean_kl(optimum, learned)) < 1e-5
    assert float(values[-1]) == pytest.approx(float(S.population_loss(optimum, lp, pref, w, beta=beta)), abs=1e-6)


def test_dpo_closed_form_optimum_reached_by_lm_descent(tb, model):
    """The tiny Llama itself as the policy (π_ref = its initial weights), on-policy pairs from π_ref.

    Full coverage (π_ref > 0 everywhere), so the population minimiser is π_ref·exp(r/β)/Z whatever
    the pair weights. 150 Adam steps (lr 1e-2) over the exact population loss of all 3·9·9 ordered
    pairs; measured mean KL(π* || π_θ) ~1e-8. The tolerance 1e-3 allows for optimiser noise on other
    platforms while failing for a wrong optimum (KL(π* || π_ref) ~0.3) or an unconverged LM (the
    model *can* represent π*: every prefix is non-constant, see ``TestbedConfig``).
    """
    graphdef, params, rest = split_model(model)
    logps_fn = S.make_response_logps_fn(graphdef, rest, tb)
    ref = logps_fn(params)
    np.testing.assert_allclose(ref, S.response_logps(model, tb), atol=1e-6)
    r = S.random_reward(tb, seed=1)
    pref, beta = S.bt_preference(r), 1.0
    w = S.population_pair_weights(ref)
    optimum = S.dpo_optimum(ref, r, beta)
    loss = lambda p: S.population_loss(logps_fn(p), ref, pref, w, beta=beta)
    learned_params, values = _adam_minimise(loss, params, lr=1e-2, steps=150)
    learned = logps_fn(learned_params)
    assert float(S.mean_kl(optimum, ref)) > 0.1
    assert float(S.mean_kl(optimum, learned)) < 1e-3
    assert float(values[0]) == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 0


# ------------------------------------------------------------------------------------ real text pipeline


def test_text_pipeline_gives_the_exact_logps(tb, model, lp, tmp_path):
    pref = S.intransitive_preference(tb, seed=2)
    pairs = S.sample_pairs(tb, pref, lp, n_pairs=60, n_votes=4, seed=3)  # 4 votes: some ties
    assert pairs.tied.any()
    tok_dir = S.save_tokenizer(tb, tmp_path / "tok")
    tok = load_tokenizer(f"hf:{tok_dir}")
    check_vocab(model, tok, str(tok_dir))
    assert len(tok) == 3 and tok("a b c", add_special_tokens=True)["input_ids"] == [0, 1, 2]
    path = S.write_text_dataset(tb, pairs, tmp_path / "pairs.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prompt"] == tb.to_text(tb.prompts[pairs.prompt[0]])
    cfg = TokenizeConfig(add_eos=False, chat_template=False, add_special_tokens=False)
    data = evaluation.load_eval_pairs(path, tok, tokenize=cfg)
    assert len(data.pairs) == len(pairs) and data.has_votes
    seqs = tb.sequences()
    for m in range(len(pairs)):
        k = pairs.prompt[m]
        np.testing.assert_array_equal(np.concatenate([data.pairs.prompt[m], data.pairs.chosen[m]]),
                                      seqs[k, pairs.chosen[m]])
        np.testing.assert_array_equal(data.pairs.rejected[m], tb.responses[pairs.rejected[m]])
    np.testing.assert_allclose(data.pairs.votes, pairs.alpha)
    np.testing.assert_array_equal(data.pairs.tie, pairs.tied)
    scores = evaluation.score_pairs(model, data.pairs, batch_size=16, progress=False)
    np.testing.assert_allclose(scores.sums, np.asarray(S.pair_logps(lp, pairs)), atol=1e-5)
    np.testing.assert_array_equal(scores.counts, 2.0)
    # the explicit style carries the same pairs; its vote share is read through the alpha field mapping
    explicit = S.write_text_dataset(tb, pairs, tmp_path / "explicit.jsonl.gz", style="explicit")
    records = load_preferences(explicit, format_config(fields={"alpha": "alpha"})).records
    np.testing.assert_allclose([r.alpha for r in records], pairs.alpha)
    assert [r.chosen for r in records] == [tb.to_text(tb.responses[i]) for i in pairs.chosen]
    same = S.sample_pairs(tb, pref, n_pairs=50, distinct=False, seed=0)
    with pytest.raises(ValueError, match="with itself"):
        S.write_text_dataset(tb, same, tmp_path / "bad.jsonl")
