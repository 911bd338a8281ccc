"""Win-rate optimisation: the estimator math (exact enumeration on a two-token tabular policy) and the
trainer (``python -m train.wro``): finite metrics, checkpoints, bitwise resume, and learning.

The tabular policy: responses are pairs of tokens over an alphabet of A symbols (N = A² responses),
``π(a, b | x) = softmax(θ₁[x])[a] · softmax(θ₂[x, a])[b]``, so per-token log-probs and the KL chain rule
are exercised. The expectation of the surrogate's gradient is computed exactly, by summing over every
sample set (K policy samples and C competitor samples) weighted by its probability, and compared with
``jax.grad`` of the closed form ``−(WR_h(π; π_c) − β KL(π ‖ π_ref))``.
"""

from __future__ import annotations

import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.config import ConfigError, RunConfig, load_config
from jaxpref.losses import wro
from jaxpref.metrics.win_rate import h_transform
from jaxpref.training import wro as wro_training
from jaxpref.training.loop import RunError

X, A = 2, 3  # prompts, alphabet
N = A * A  # responses


def _theta(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {"first": jnp.asarray(scale * rng.standard_normal((X, A)), jnp.float32),
            "second": jnp.asarray(scale * rng.standard_normal((X, A, A)), jnp.float32)}


def _token_logps(theta, x, y):
    """[2] per-token log-probs of response index y at prompt x."""
    a, b = y // A, y % A
    return jnp.stack([jax.nn.log_softmax(theta["first"][x])[a], jax.nn.log_softmax(theta["second"][x, a])[b]])


def _dist(theta):
    """[X, N] response probabilities."""
    lp = jax.nn.log_softmax(theta["first"])[:, :, None] + jax.nn.log_softmax(theta["second"], axis=-1)
    return jnp.exp(lp.reshape(X, N))


def _kl(theta, theta_ref):
    """[X] exact KL(π(·|x) ‖ π_ref(·|x))."""
    p, q = _dist(theta), _dist(theta_ref)
    return jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1)


PREF = np.asarray(jax.nn.sigmoid(jnp.asarray(np.random.default_rng(7).standard_normal((X, N, N)) * 2.0)))
PREF = jnp.asarray(np.triu(PREF, 1) + np.tril(1.0 - PREF.transpose(0, 2, 1), -1) + 0.5 * np.eye(N), jnp.float32)
THETA, THETA_REF = _theta(0), _theta(1, scale=0.5)
DATASET_Q = jnp.asarray(np.random.default_rng(3).dirichlet(np.ones(N), size=X), jnp.float32)


def _competitor(mode: str, theta) -> jax.Array:
    if mode == "reference":
        return _dist(THETA_REF)
    if mode == "self_play":
        return jax.lax.stop_gradient(_dist(theta))
    return DATASET_Q


def _objective(theta, mode: str, h: str, beta: float):
    """Closed form −(WR_h(π; π_c) − β KL) averaged over prompts."""
    pi, pc = _dist(theta), _competitor(mode, theta)
    wr = jnp.einsum("xi,xj,xij->x", pi, pc, h_transform(PREF, h))
    return -jnp.mean(wr - beta * _kl(theta, THETA_REF))


KINDS = ("k1", "k2", "k3", "exact", "k1_pathwise")


def _surrogates(theta, x, ys, cs, h, beta):
    """[len(KINDS)] surrogate losses of one sample set (K policy samples ``ys``, C competitors ``cs``)."""
    tok = jax.vmap(lambda y: _token_logps(theta, x, y))(ys)[None]  # [1, K, 2]
    ref = jax.vmap(lambda y: _token_logps(THETA_REF, x, y))(ys)[None]
    seq, ones = tok.sum(-1), jnp.ones_like(tok)
    p = PREF[x][ys[:, None], cs[None, :]][None]
    values = jnp.stack([wro.judge_values(p, name) for name in wro.H_FUNCTIONS])[h]  # h: a traced index
    adv = wro.rloo_advantages(values)
    out = [wro.wro_loss(seq, adv, wro.kl_estimate(tok, ref, ones, k), beta=beta, kl_estimator=k)[0]
           for k in wro.KL_ESTIMATORS]
    out.append(wro.wro_loss(seq, adv, beta=beta, exact_kl=_kl(theta, THETA_REF)[x])[0])
    # the naive (wrong) use of k1: differentiating the estimate directly (the k2 rule applied to k1 values)
    out.append(wro.wro_loss(seq, adv, wro.kl_estimate(tok, ref, ones, "k1"), beta=beta, kl_estimator="k2")[0])
    return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("k",))
def _weighted_grads(theta, pi, pc, combos, beta, h, *, k):
    """Σ over sample sets of P(set)·∇ surrogate, averaged over prompts, for every entry of KINDS."""

    def per_prompt(x):
        w = jnp.prod(pi[x][combos[:, :k]], axis=1) * jnp.prod(pc[x][combos[:, k:]], axis=1)  # [M]
        g = jax.vmap(jax.jacrev(_surrogates), in_axes=(None, None, 0, 0, None, None))(
            theta, x, combos[:, :k], combos[:, k:], h, beta)  # leaves [M, len(KINDS), ...]
        return jax.tree.map(lambda gi: jnp.tensordot(w, gi, axes=1), g)

    return jax.tree.map(lambda g: g.mean(0), jax.lax.map(per_prompt, jnp.arange(X)))


@functools.cache
def _all_expected_grads(mode, h, beta, k=2, c=2):
    combos = jnp.asarray(list(itertools.product(range(N), repeat=k + c)), jnp.int32)
    return _weighted_grads(THETA, _dist(THETA), _competitor(mode, THETA), combos, beta, wro.H_FUNCTIONS.index(h), k=k)


def _expected_surrogate_grad(mode, h, beta, kind, k=2, c=2):
    """E[∇ surrogate] by exact enumeration of all N^(K+C) sample sets per prompt."""
    i = KINDS.index(kind)
    return jax.tree.map(lambda g: g[i], _all_expected_grads(mode, h, beta, k, c))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(tree)])


# -------------------------------------------------------------------------------------- estimator math


def test_rloo_advantages_leave_one_out_and_need_two_samples():
    v = jnp.asarray([[1.0, 2.0, 6.0], [0.5, 0.5, 0.5]])
    adv = np.asarray(wro.rloo_advantages(v))
    np.testing.assert_allclose(adv[0], [1 - 4, 2 - 3.5, 6 - 1.5], rtol=1e-6)
    np.testing.assert_allclose(adv[1], 0.0, atol=1e-7)
    np.testing.assert_allclose(adv.sum(-1), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        wro.rloo_advantages(jnp.ones((3, 1)))


@pytest.mark.parametrize("h", ["identity", "logit", "log"])
def test_judge_values_average_h_over_competitors(h):
    p = np.random.default_rng(0).uniform(0.0, 1.0, (2, 3, 4)).astype(np.float32)
    p[0, 0, 0], p[0, 0, 1] = 0.0, 1.0  # clipped for logit / log
    c = np.clip(p, 1e-3, 1 - 1e-3)
    expected = {"identity": p, "logit": np.log(c / (1 - c)), "log": np.log(c)}[h].mean(-1)
    np.testing.assert_allclose(np.asarray(wro.judge_values(jnp.asarray(p), h)), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, K, C\]"):
        wro.judge_values(jnp.ones((2, 3)), h)


def test_kl_estimators_against_exact_kl_by_enumeration():
    """E[k1] = E[k3] = KL exactly (per-token sums, chain rule); k2 is nonnegative and biased."""
    ys = jnp.arange(N)
    for x in range(X):
        tok = jax.vmap(_token_logps, in_axes=(None, None, 0))(THETA, x, ys)
        ref = jax.vmap(_token_logps, in_axes=(None, None, 0))(THETA_REF, x, ys)
        pi = _dist(THETA)[x]
        exact = float(_kl(THETA, THETA_REF)[x])
        est = {k: float(jnp.dot(pi, wro.kl_estimate(tok, ref, jnp.ones_like(tok), k))) for k in wro.KL_ESTIMATORS}
        assert est["k1"] == pytest.approx(exact, rel=1e-5)
        assert est["k3"] == pytest.approx(exact, rel=1e-5)
        assert est["k2"] > 0 and abs(est["k2"] - exact) > 1e-3
    # the mask drops prompt / padding tokens
    tok, ref = jnp.asarray([[-1.0, -2.0, -9.0]]), jnp.asarray([[-1.5, -1.0, 0.0]])
    got = wro.kl_estimate(tok, ref, jnp.asarray([[1, 1, 0]]), "k1")
    np.testing.assert_allclose(np.asarray(got), [0.5 - 1.0], rtol=1e-6)


@pytest.mark.parametrize("mode", ["reference", "self_play", "dataset"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "exact"])
def test_surrogate_gradient_is_unbiased(mode, kind):
    """E[∇ surrogate] equals ∇ of the closed-form −(WR_logit − β KL) for every competitor and KL form."""
    beta = 0.3
    exact = _flat(jax.grad(_objective)(THETA, mode, "logit", beta))
    expected = _flat(_expected_surrogate_grad(mode, "logit", beta, kind))
    np.testing.assert_allclose(expected, exact, rtol=2e-4, atol=2e-5)
    assert np.abs(exact).max() > 0.05  # a non-trivial gradient


@pytest.mark.parametrize("h", ["identity", "log"])
def test_surrogate_gradient_is_unbiased_for_other_h(h):
    exact = _flat(jax.grad(_objective)(THETA, "reference", h, 0.1))
    np.testing.assert_allclose(_flat(_expected_surrogate_grad("reference", h, 0.1, "k3")), exact,
                               rtol=2e-4, atol=2e-5)


def test_differentiating_k1_directly_is_biased():
    """The check above can fail: k1 used as a pathwise loss has an expected KL gradient of zero."""
    exact = _flat(jax.grad(_objective)(THETA, "reference", "logit", 0.3))
    naive = _flat(_expected_surrogate_grad("reference", "logit", 0.3, "k1_pathwise"))
    assert np.abs(naive - exact).max() > 1e-2
    no_kl = _flat(jax.grad(_objective)(THETA, "reference", "logit", 0.0))
    np.testing.assert_allclose(naive, no_kl, rtol=2e-4, atol=2e-5)


def test_wro_loss_masks_padding_prompts_and_checks_shapes():
    logps = jnp.asarray([[-1.0, -2.0], [-3.0, -4.0]])
    adv = jnp.asarray([[1.0, -1.0], [5.0, -5.0]])
    full, _ = wro.wro_loss(logps[:1], adv[:1])
    masked, aux = wro.wro_loss(logps, adv, mask=jnp.asarray([[True, True], [False, False]]))
    assert float(masked) == pytest.approx(float(full))
    assert float(aux["advantage_std"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        wro.wro_loss(logps, adv[:, :1])


# -------------------------------------------------------------------------------------- the trainer
# All runs share one optimizer config and WRO settings, so they share the compiled step and sampler
# (jaxpref.training.wro.compiled_step; generation is cached per shape).

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "wro_tiny.yaml"


def _cfg(tmp, name, hh, *extra):
    return load_config(RunConfig, TINY, [f"run_dir={tmp / name}", f"wro.prompts={hh}", "logging.progress=false",
                                         "optim.lr=1e-2", *extra])


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(run_dir):
    from flax import nnx

    from jaxpref import loading

    loaded = loading.load_model(f"run:{run_dir}")
    return [np.asarray(x) for x in jax.tree.leaves(nnx.split(loaded.model, nnx.Param, ...)[1])]


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, hh):
    """configs/wro_tiny.yaml for 4 steps from the preset's random init (also the uninterrupted run)."""
    tmp = tmp_path_factory.mktemp("wro")
    summary = wro_training.run_wro(_cfg(tmp, "base", hh, "train.steps=4", "checkpoint.every=2"))
    return tmp, summary


class EvenTokenJudge:
    """A token judge preferring responses with more even token ids: σ(8·(share_a − share_b)).

    It also checks the :class:`TokenJudge` input contract on every call.
    """

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt_ids, a_ids, a_mask, b_ids, b_mask):
        self.calls += 1
        assert prompt_ids.ndim == 2 and (prompt_ids >= 0).any(0).all()  # no all-padding column
        assert np.all(np.diff((prompt_ids >= 0).astype(int), axis=1) >= 0)  # left padding with -1
        assert a_ids.shape == a_mask.shape == b_ids.shape == b_mask.shape
        share = lambda ids, m: ((ids % 2 == 0) * m).sum(1) / np.maximum(m.sum(1), 1)
        return 1.0 / (1.0 + np.exp(-8.0 * (share(a_ids, a_mask) - share(b_ids, b_mask))))


def test_tiny_config_runs_with_finite_metrics_and_checkpoints(base_run):
    tmp, summary = base_run
    rows = _metrics(tmp / "base")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    keys = ("loss", "judge/win_rate", "judge/value", "kl", "advantage_std", "grad_norm", "response_length")
    for r in rows:
        assert all(np.isfinite(r[k]) for k in keys), r
        assert 0.0 <= r["judge/win_rate"] <= 1.0 and 1 <= r["response_length"] <= 16
        assert r["logps/sampler_gap"] < 1e-3  # the trainer scores exactly what the sampler drew
    assert rows[0]["kl"] == 0.0  # policy == reference before the first update
    assert any(r["kl"] != 0.0 for r in rows[1:])
    steps = sorted(int(p.name) for p in (tmp / "base" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    assert summary["final_metrics"]["step"] == 4 and summary["prompts"]["kept"] == 32
    assert (tmp / "base" / "config.yaml").is_file() and (tmp / "base" / "summary.json").is_file()


def test_resume_reproduces_the_uninterrupted_run(base_run, hh):
    tmp, _ = base_run
    wro_training.run_wro(_cfg(tmp, "split", hh, "train.steps=2", "checkpoint.every=2"))
    resumed = wro_training.run_wro(_cfg(tmp, "split", hh, "train.steps=4", "checkpoint.every=2"), resume=True)
    assert resumed["resumed_from"] == 2
    for a, b in zip(_params(tmp / "base"), _params(tmp / "split"), strict=True):
        np.testing.assert_array_equal(a, b)
    full, split = _metrics(tmp / "base"), _metrics(tmp / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    assert [r["judge/win_rate"] for r in split] == [r["judge/win_rate"] for r in full]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_raises_the_judges_win_rate_against_the_reference(base_run, hh, seed):
    tmp, _ = base_run
    judge = EvenTokenJudge()
    wro_training.run_wro(_cfg(tmp, f"learn{seed}", hh, f"model.source=run:{tmp / 'base'}", "train.steps=24",
                              f"train.seed={seed}", "checkpoint.every=0"), judge=judge)
    wr = [r["judge/win_rate"] for r in _metrics(tmp / f"learn{seed}")]
    assert judge.calls == 24
    # step 1 judges the reference against itself (0.5 in expectation); the last steps win clearly
    assert np.mean(wr[-6:]) > 0.62 and np.mean(wr[-6:]) > np.mean(wr[:6]) + 0.08, wr


@pytest.mark.slow
def test_dataset_competitor_runs(base_run, hh):
    tmp, _ = base_run
    wro_training.run_wro(_cfg(tmp, "dataset", hh, f"model.source=run:{tmp / 'base'}", "train.steps=2",
                              "checkpoint.every=0", "wro.competitor=dataset", "wro.dataset_responses=both"))
    rows = _metrics(tmp / "dataset")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["judge/win_rate"]) for r in rows)
    assert all(r["competitor_length"] > 1 for r in rows)


def test_dataset_prompt_table_holds_both_responses(hh):
    from jaxpref.loading import load_tokenizer

    tok = load_tokenizer("builtin")
    cfg = lambda *x: load_config(RunConfig, TINY, [f"wro.prompts={hh}", "wro.prompts_limit=8", *x])
    plain = wro_training.load_prompt_table(cfg(), tok)
    both = wro_training.load_prompt_table(cfg("wro.competitor=dataset", "wro.dataset_responses=both"), tok)
    assert plain.responses is None and len(both) == len(plain) == 8
    assert all(len(r) == 2 and all(1 <= len(x) <= 16 for x in r) for r in both.responses)
    for a, b in zip(plain.prompt_ids, both.prompt_ids, strict=True):
        np.testing.assert_array_equal(a, b)
        assert len(a) <= 32
    assert both.prompts[0].startswith("\n\nHuman:") and both.prompts[0] in both.texts_by_ids().values()


def test_text_judge_adapter_and_position_swaps(hh):
    from jaxpref.loading import load_tokenizer
    from jaxpref.testing import judges

    tok = load_tokenizer("builtin")
    cfg = load_config(RunConfig, TINY, [f"wro.prompts={hh}"])
    ids = lambda text: np.asarray(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], np.int32)
    a, a_mask = wro_training._pad_right([ids("a long answer here")] * 8, 12, 0)
    b, b_mask = wro_training._pad_right([ids("no")] * 8, 12, 0)
    prompt = np.asarray(tok("hi")["input_ids"], np.int32)
    prompts = np.tile(prompt, (8, 1))
    texts = {tuple(prompt.tolist()): "hi"}

    seen = []
    def spy(ps, ra, rb):
        seen.append((ps, ra, rb))
        return judges.length_judge(ps, ra, rb)

    judge = wro_training.TextJudge(spy, tok, texts)
    p = judge(prompts, a, a_mask, b, b_mask)
    assert seen[0][0] == ["hi"] * 8 and seen[0][1][0] == "a long answer here" and seen[0][2][0] == "no"
    np.testing.assert_allclose(p, judges.length_judge(None, ["a long answer here"] * 8, ["no"] * 8))

    first = wro_training.RolloutCollector(cfg, None, tok, wro_training.TextJudge(judges.first_judge, tok), "first")
    swap = np.arange(8) % 2 == 0
    np.testing.assert_array_equal(first._judge(prompts, a, a_mask, b, b_mask, swap), np.where(swap, 0.0, 1.0))
    bad = wro_training.RolloutCollector(cfg, None, tok, lambda *args: np.full(8, 2.0), "bad")
    with pytest.raises(RunError, match="outside"):
        bad._judge(prompts, a, a_mask, b, b_mask, swap)


@pytest.mark.parametrize("override, match", [
    ("wro.samples_per_prompt=1", "at least 2 samples"),
    ("wro.temperature=0", "must be > 0"),
    ("wro.judge=''", "wro.judge is empty"),
    ("reference.strategy=precomputed", "use live"),
    ("train.batch_size=3", "not divisible by the mesh"),
])
def test_config_errors_are_clear(tmp_path, hh, override, match):
    with pytest.raises(RunError, match=match):
        wro_training.run_wro(_cfg(tmp_path, "bad", hh, override))
    assert not (tmp_path / "bad").exists()  # nothing built or written


def test_bad_enum_values_name_the_key(hh):
    with pytest.raises(ConfigError, match="wro.competitor"):
        load_config(RunConfig, TINY, ["wro.competitor=nobody"])
    with pytest.raises(ConfigError, match="wro.kl_estimator"):
        load_config(RunConfig, TINY, ["wro.kl_estimator=k4"])


def _accumulation_bounds(rows, full, halves, rollout, k, beta):
    """Bounds on |micro-batched − full-batch| of each step metric (see jaxpref.testing.tolerances).

    The two programs compute the same function in different orders. Two sources of difference:

    * the per-token log-probs of a row, computed in a batch of all rows or of one micro-batch's rows:
      measured (``full`` vs ``halves``, the policy's and the reference's forward in both layouts), since a
      worst-case bound through the whole network is vacuous; propagated to first order below;
    * everything after them (the k3 arithmetic, the RLOO baseline, the products and the batch means that
      micro-batching splits): worst-case bounds, op by op, relative to the terms before they cancel.

    ``rows``: the micro-batch index of each row; ``full``/``halves``: ``(policy, reference)`` forward
    outputs of all rows and, per micro-batch, of its rows. Returns ``(bounds per metric, per-row δA)``.
    """
    from jaxpref.testing.tolerances import U32, gamma, mean_tol

    m = np.asarray(rollout.loss_mask, np.float64)
    f64 = lambda x: np.asarray(x, np.float64)
    tok, rtok = f64(full[0].token_logps) * m, f64(full[1].token_logps) * m
    d_tok, d_rtok, d_seq = np.zeros_like(tok), np.zeros_like(tok), np.zeros(len(tok))
    for h, (pol, ref) in enumerate(halves):
        sel = rows == h
        d_tok[sel] = np.abs(f64(pol.token_logps) * m[sel] - tok[sel])
        d_rtok[sel] = np.abs(f64(ref.token_logps) * m[sel] - rtok[sel])
        d_seq[sel] = np.abs(f64(pol.sums) - f64(full[0].sums)[sel])
    keep, n_tok = np.asarray(rollout.example_mask, bool), m.shape[1]
    seq = tok.sum(-1)
    d_seq = d_seq + 2 * gamma(n_tok) * np.abs(tok).sum(-1)  # the token sum may be blocked differently
    lr = tok - rtok
    e = np.exp(-lr)
    f = (m * (e - 1.0 + lr)).sum(-1)
    # k3 per token: l = lp − ref (1 rounding), exp (counted as 1 more), −1, +l: 2γ_4 of the terms' magnitudes,
    # then a sum of T non-negative terms (2γ_T·f); plus the measured input differences times |∂k3/∂l|
    d_f = ((m * (2 * gamma(4) * (e + 1.0 + np.abs(lr)) + 2 * U32 * (np.abs(tok) + np.abs(rtok)) * np.abs(1 - e)))
           .sum(-1) + 2 * gamma(n_tok) * f + (m * np.abs(1.0 - e) * (d_tok + d_rtok)).sum(-1))
    g = lambda x: x.reshape(-1, k)
    loo = lambda x: (g(x).sum(1, keepdims=True) - g(x)) / (k - 1)
    a_kl = (g(f) - loo(f)).ravel()  # RLOO of f: K terms (f_i and the others' mean) that cancel
    d_a = (g(d_f) + loo(d_f)).ravel() + 2 * gamma(k + 1) * (g(f) + loo(f)).ravel()
    adv = f64(rollout.advantages)
    avg = lambda x: float(np.sum(x[keep]) / keep.sum())
    bounds = {
        "pg_loss": avg(np.abs(adv) * d_seq) + mean_tol((adv * seq)[keep], keep.sum() + 2),  # +2: the product, sign
        "kl": avg(d_f) + mean_tol(f[keep]),
        # k3 surrogate: mean(A_i·ℓ_i) + mean(f_i); the A_i·ℓ_i (|ℓ_i| ≈ 35) cancel to ≈ 0.2
        "kl_surrogate": avg(np.abs(a_kl) * d_seq + np.abs(seq) * d_a + d_f)
        + mean_tol(np.concatenate([(a_kl * seq)[keep], f[keep]]), keep.sum() + 2),
        "logps/policy": avg(d_seq) + mean_tol(seq[keep]),
    }
    bounds["loss"] = bounds["pg_loss"] + beta * bounds["kl_surrogate"] + 2 * gamma(2) * avg(
        np.abs(adv * seq) + beta * np.abs(a_kl * seq) + beta * f)
    return bounds, d_a, d_seq / np.maximum(np.abs(seq), 1e-30)


def test_gradient_accumulation_equals_the_full_batch():
    """micro_batches=2 (whole prompts per micro-batch) gives the full batch's loss, metrics and update, to
    the rounding bounds of :func:`_accumulation_bounds`. One prompt is masked, so the micro-batches hold
    different numbers of valid samples (4 and 2) and must be weighted by them."""
    import optax
    from flax import nnx

    from jaxpref.models import get_preset
    from jaxpref.testing.models import fast_compile, random_model
    from jaxpref.testing.tolerances import gamma
    from jaxpref.training import step as steplib

    model = random_model(get_preset("tiny_llama"), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    rng = np.random.default_rng(0)
    b, k, t, p = 4, 2, 12, 5
    seg = np.ones((b * k, t), np.int32)
    seg[::3, :2] = 0  # some left padding
    loss_mask = np.zeros((b * k, t), np.int32)
    loss_mask[:, p:] = 1
    loss_mask[1, -2:] = 0  # a response that stopped early
    example_mask = np.ones(b * k, bool)
    example_mask[-k:] = False  # prompt 3 (in micro-batch 1 of 0..1) is padding
    rollout = wro_training.Rollout(
        input_ids=rng.integers(3, 128, (b * k, t)).astype(np.int32), segment_ids=seg,
        positions=np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32), loss_mask=loss_mask * seg,
        advantages=rng.standard_normal(b * k).astype(np.float32), sample_logps=np.zeros(b * k, np.float32),
        example_mask=example_mask)
    lr, beta, chunks = 0.1, 0.1, {"seq_chunk": 4, "vocab_chunk": 64}
    opt = optax.sgd(lr)
    state = steplib.init_state(params, opt, 0)
    rows = np.arange(b * k) // k % 2  # the micro-batch of each row (strided prompts)
    out, steps = {}, {}
    with fast_compile():  # tiny programs: compile time dominates
        for micro in (1, 2):
            steps[micro] = jax.jit(wro_training.make_wro_step(graphdef, opt, samples_per_prompt=k, beta=beta,
                                                              kl_estimator="k3", micro_batches=micro, **chunks))
            out[micro] = jax.device_get(steps[micro](state, ref_params, rest, rollout))
        args = (rollout.input_ids, rollout.segment_ids, rollout.positions, rollout.loss_mask)
        logps = jax.jit(functools.partial(steplib.forward_logps, graphdef, **chunks))
        both = lambda sel: tuple(jax.device_get(logps(w, rest, *(a[sel] for a in args))) for w in (params, ref_params))
        full, halves = both(np.ones(b * k, bool)), [both(rows == h) for h in range(2)]
        # per-row gradients: the step on one valid row is that row's surrogate gradient g_i (the RLOO baseline
        # ignores the mask); and ∇ℓ_i, the row's log-prob gradient, which the coefficient β·A_i multiplies
        valid = np.flatnonzero(example_mask)
        per_row = []
        for i in valid:
            one_row = rollout.replace(example_mask=np.arange(b * k) == i)
            s_i, _ = jax.device_get(steps[1](state, ref_params, rest, one_row))
            per_row.append(np.linalg.norm(_flat(jax.tree.map(lambda new, old: (old - new) / lr, s_i.params, params))))
        jac = jax.jit(jax.jacrev(lambda w: steplib.forward_logps(graphdef, w, rest, *args, **chunks).sums))(params)
        jac = np.concatenate([np.asarray(x).reshape(b * k, -1) for x in jax.tree.leaves(jac)], 1)
        dlogp = np.linalg.norm(jac, axis=1)
    (s1, m1), (s2, m2) = out[1], out[2]
    bounds, d_a, rel_rows = _accumulation_bounds(rows, full, halves, rollout, k, beta)
    for key, bound in bounds.items():
        assert abs(float(m2[key]) - float(m1[key])) <= bound, (key, float(m1[key]), float(m2[key]), bound)
    assert float(m1["kl"]) > 0 and float(m1["grad_norm"]) > 0
    # the batch gradient (1/n)·Σ_i g_i: its sum over rows and tokens is what micro-batching splits (2γ_{N·T}
    # of the terms' norms), each g_i carries its row's measured forward difference (relative, first order)
    # and the coefficient β·A_i its bound δA_i (times ‖∇ℓ_i‖)
    n = len(valid)
    g_bound = sum((2 * gamma(b * k * t) + rel_rows[i]) * g_i + beta * d_a[i] * dlogp[i]
                  for i, g_i in zip(valid, per_row, strict=True)) / n
    g1, p1, p2 = float(m1["grad_norm"]), _flat(s1.params), _flat(s2.params)
    assert abs(float(m2["grad_norm"]) - g1) <= g_bound + 2 * gamma(p1.size) * g1  # ‖·‖: a sum of P squares
    assert np.linalg.norm(p2 - p1) <= lr * g_bound + 2 * gamma(1) * np.linalg.norm(p1)  # p − lr·g: one rounding
