"""TYPO end to end: reference samples (sampling, cache), the step's unsupervised term, ``run_training``.

(a) the sample cache hits on identical settings and misses when the seed, the reference params or the
prompts change; samples are deterministic and independent of the batch size and of the other prompts.
(b) the step's reference-sample log-probs equal a dense, unchunked recomputation; the loss equals
TYPO by hand; two micro-batches equal the full batch; the term's gradient reaches the params.
(c) ``run_training`` with ``typo`` logs the unsupervised term, reuses the cache and resumes exactly.
(d) a TYPO loss without ``reference.samples`` is a ConfigError before anything is built.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import losses
from jaxpref.config import ConfigError, OptimConfig, RunConfig, load_config
from jaxpref.data.batching import pair_batch
from jaxpref.data.tokenize import TokenizedPairs, TokenizeStats
from jaxpref.generation import SamplingConfig
from jaxpref.models import presets
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tolerances import assert_same_sgd_step, relative_tol, transformer_chain_length
from jaxpref.training import loop, optim
from jaxpref.training import reference_samples as RS
from jaxpref.training import step as S

# Many stop ids: random weights emit one of them often, so samples end at EOS *and* at the length cap.
STOP_IDS = tuple(range(2, 22))
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_token_ids=STOP_IDS, pad_token_id=0)
BUCKETS = (16, 32)
CHUNKS = {"seq_chunk": 8, "vocab_chunk": 64}


@pytest.fixture(scope="module", autouse=True)
def _fast():
    with fast_compile():
        yield


def make_pairs(n=7, seed=0, vocab=128) -> TokenizedPairs:
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: [rng.integers(22, vocab, rng.integers(lo, hi + 1)).astype(np.int32) for _ in range(n)]
    return TokenizedPairs(prompt=ids(2, 9), chosen=ids(2, 6), rejected=ids(2, 6), row=np.arange(100, 100 + n),
                          ids=[str(i) for i in range(n)], votes=np.ones(n, np.float32), tie=np.zeros(n, bool),
                          pad_id=0, stats=TokenizeStats())


@pytest.fixture(scope="module")
def model():
    return random_model(presets.tiny_llama(), seed=0, std=0.3)


@pytest.fixture(scope="module")
def pairs():
    return make_pairs()


@pytest.fixture(scope="module")
def cached(model, pairs, tmp_path_factory):
    cache = tmp_path_factory.mktemp("samples")
    kw = dict(n_samples=2, sampling=SAMPLING, seed=0, batch_size=8, cache_dir=cache, buckets=BUCKETS)
    first = RS.reference_samples_for(model, pairs, **kw)
    return first, kw


# --------------------------------------------------------------------------------------------- (a) cache


def test_cache_hit_returns_identical_samples(model, pairs, cached):
    first, kw = cached
    again = RS.reference_samples_for(model, pairs, **kw)
    assert first.computed and not again.computed and again.path == first.path
    for name in ("tokens", "lengths", "ended", "logps"):
        np.testing.assert_array_equal(getattr(again.samples, name), getattr(first.samples, name))


def test_cache_misses_on_seed_params_and_prompts(model, pairs, cached):
    first, kw = cached
    reseeded = RS.reference_samples_for(model, pairs, **{**kw, "seed": 1})
    assert reseeded.computed and reseeded.path != first.path
    assert not np.array_equal(reseeded.samples.tokens, first.samples.tokens)
    other = random_model(presets.tiny_llama(), seed=1, std=0.3)
    assert RS.reference_samples_for(other, pairs, **kw).path not in (first.path, reseeded.path)
    edited = make_pairs()
    edited.prompt[3] = edited.prompt[3].copy()
    edited.prompt[3][0] += 1
    changed = RS.reference_samples_for(model, edited, **kw)
    assert changed.computed and changed.path != first.path
    longer = RS.sample_cache_key("p", "d", SAMPLING.replace(max_new_tokens=7), 2, 0)
    assert longer != RS.sample_cache_key("p", "d", SAMPLING, 2, 0)


def test_unreadable_cache_file_is_resampled(model, pairs, cached, tmp_path):
    _, kw = cached
    path = RS.reference_samples_for(model, pairs, **{**kw, "cache_dir": tmp_path}).path
    path.write_bytes(b"not an npz")
    redo = RS.reference_samples_for(model, pairs, **{**kw, "cache_dir": tmp_path})
    assert redo.computed and redo.path == path


def test_samples_are_well_formed(cached):
    s = cached[0].samples
    assert s.tokens.shape == (7, 2, 6) and s.lengths.min() >= 1
    assert s.ended.any() and (~s.ended).any()  # both stop reasons occur
    for i, j in np.ndindex(*s.lengths.shape):
        k = s.lengths[i, j]
        assert (s.tokens[i, j, k:] == 0).all()
        assert s.ended[i, j] == (s.tokens[i, j, k - 1] in STOP_IDS)
        assert s.ended[i, j] or k == SAMPLING.max_new_tokens
        assert not np.isin(s.tokens[i, j, :k - 1], STOP_IDS).any()  # nothing after the first stop id
    assert np.all(s.logps < 0)


def test_samples_independent_of_batch_size_and_other_prompts(model, pairs, cached):
    ref = cached[0].samples
    small = RS.sample_responses(model, pairs.prompt, pairs.row, n_samples=2, sampling=SAMPLING, seed=0, batch_size=3)
    np.testing.assert_array_equal(small.tokens, ref.tokens)
    np.testing.assert_array_equal(small.lengths, ref.lengths)
    np.testing.assert_allclose(small.logps, ref.logps, atol=1e-5)
    keep = [5, 1, 6]  # other company, other order, same source rows
    subset = RS.sample_responses(model, [pairs.prompt[i] for i in keep], pairs.row[keep], n_samples=2,
                                 sampling=SAMPLING, seed=0, batch_size=8)
    np.testing.assert_array_equal(subset.tokens, ref.tokens[keep])


def test_needs_reference_samples_follows_hparams():
    comp = losses.compose([{"name": "typo", "lam": 0.5}, {"name": "sigmoid"}])
    assert RS.needs_reference_samples(comp) == ("typo",)
    assert RS.needs_reference_samples(losses.compose([{"name": "typo_regression", "kl_norm": "token_mean"}])) == (
        "typo_regression",)
    assert RS.needs_reference_samples(losses.compose([{"name": "typo", "lam": 0.0}, "sft"])) == ()


# ---------------------------------------------------------------------------------------------- (b) step


def _dense_logps(model, seqs):
    """Summed response log-probs of a ``[N, K, T]`` batch record with full logits (no chunking,
    no custom VJP): ``[N, K]``."""
    graphdef, state = nnx.split(model)
    return np.asarray(_dense_jit(graphdef, state, seqs))


@functools.partial(jax.jit, static_argnums=0)
def _dense_jit(graphdef, state, seqs):
    return _dense_logps_jnp(nnx.merge(graphdef, state), seqs)


def _dense_logps_jnp(model, seqs):
    n, k, t = seqs.input_ids.shape
    flat = lambda x: jnp.asarray(x).reshape(n * k, t)
    ids, mask = flat(seqs.input_ids), flat(seqs.loss_mask)
    hidden = model(ids, positions=flat(seqs.positions), segment_ids=flat(seqs.segment_ids)).hidden
    w, layout = model.unembedding()
    logits = hidden @ (w if layout == "dv" else w.T)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), ids[:, 1:, None], -1)[..., 0]
    return (lp * mask[:, 1:]).sum(-1).reshape(n, k)


@pytest.fixture(scope="module")
def step_setup(model, pairs, cached):
    samples = cached[0]
    idx = [4, 0, 2, 6, 1, 3, 5]  # 7 real rows, 1 padding row
    batch = pair_batch(pairs, idx, buckets=BUCKETS, batch_size=8)
    batch = batch.replace(ref_samples=samples.batch(idx, batch_size=8))
    graphdef, params, rest = S.split_model(model)
    opt = optim.make_optimizer(OptimConfig(name="sgd", lr=0.5, clip_norm=None), 10)[0]
    return graphdef, params, rest, opt, batch, idx


def _step(step_setup, hparams, micro=1, batch=None):
    graphdef, params, rest, opt, full_batch, _ = step_setup
    comp = losses.compose([{"name": "typo", **hparams}])
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference="none", micro_batches=micro, **CHUNKS))
    state = S.build_state(params, opt, 0)
    new, metrics = fn(state, None, full_batch if batch is None else batch, None)
    return new, jax.device_get(metrics)


@pytest.fixture(scope="module")
def full_step(step_setup):
    return _step(step_setup, {"lam": 0.5, "scale": 2.0})


def test_reference_sample_logps_match_dense_recomputation(model, step_setup, cached):
    graphdef, params, rest, _, batch, idx = step_setup
    sums, counts = jax.jit(lambda p, s: S.reference_sample_logps(graphdef, p, rest, s, **CHUNKS))(
        params, batch.ref_samples)
    dense = _dense_logps(model, batch.ref_samples)
    np.testing.assert_allclose(np.asarray(sums), dense.mean(1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(counts)[:7], cached[0].samples.lengths[idx].mean(1))
    # the policy is the reference here, so the sampler's own (KV-cache) log-probs agree too
    np.testing.assert_allclose(np.asarray(sums)[:7], cached[0].samples.logps[idx].mean(1), atol=1e-4)
    assert np.asarray(sums)[7] == 0.0 and np.asarray(counts)[7] == 0.0  # padding row


def test_step_loss_equals_typo_by_hand(model, step_setup, full_step):
    _, _, _, _, batch, _ = step_setup
    _, m = full_step
    pair = _dense_logps(model, batch)
    rs = batch.ref_samples
    sample = _dense_logps(model, rs).mean(1)
    per_pair = np.logaddexp(0.0, -2.0 * (pair[:, 0] - pair[:, 1])) + 0.5 * (-sample)
    assert m["loss"] == pytest.approx(per_pair[:7].mean(), abs=1e-5)
    assert m["typo/sample_nll"] == pytest.approx(-sample[:7].mean(), abs=1e-5)
    assert m["logps/reference_sample"] == pytest.approx(sample[:7].mean(), abs=1e-5)
    assert abs(m["reference_sample/kl"]) < 1e-4  # policy == reference at step 0
    assert m["sample_tokens"] == float((rs.segment_ids != 0).sum())


def test_two_micro_batches_equal_full_batch(step_setup, full_step):
    full, m1 = full_step
    acc, m2 = _step(step_setup, {"lam": 0.5, "scale": 2.0}, micro=2)
    # worst-case rounding bounds of two layouts of the same step (as tolerances.dpo_step_bounds): every row's
    # ℓ within ρ·|ℓ|; softplus(−s·(ℓ_c − ℓ_r)) moves by s·δ(ℓ_c − ℓ_r), the sample term by λ·δ(mean ℓ_sample)
    graphdef, params, rest, _, batch, _ = step_setup
    lam, scale, keep = 0.5, 2.0, np.asarray(batch.example_mask, bool)
    n, n_samples = int(keep.sum()), batch.ref_samples.input_ids.shape[1]
    t = max(batch.input_ids.shape[-1], batch.ref_samples.input_ids.shape[-1])
    rho = relative_tol(transformer_chain_length(presets.tiny_llama(), t) + n * n_samples)
    dense = lambda p, seqs: _dense_logps_jnp(nnx.merge(graphdef, p, rest), seqs)
    pair, sample = np.abs(_dense_logps(nnx.merge(graphdef, params, rest), batch))[keep], abs(m1["typo/sample_nll"])
    d_h = rho * pair.sum(-1)  # per pair: δ(ℓ_c − ℓ_r)
    bounds = {"logps/reference_sample": rho * sample, "typo/sample_nll": rho * sample}
    bounds["loss/typo"] = bounds["loss"] = (scale * d_h.mean() + lam * rho * sample
                                            + relative_tol(n + 4) * abs(float(m1["loss"])))
    norms = lambda seqs: np.linalg.norm(np.concatenate(
        [np.asarray(x).reshape(*seqs.input_ids.shape[:2], -1) for x in jax.tree.leaves(
            jax.jit(jax.jacrev(dense), static_argnums=())(params, seqs))], -1), axis=-1)[keep]
    coef_pair = scale / n + scale * scale / 4 * d_h[:, None] / n  # |∂L/∂ℓ_c|, |∂L/∂ℓ_r| and σ's own error
    grad_terms = (coef_pair * norms(batch)).sum() + lam / (n * n_samples) * norms(batch.ref_samples).sum()
    g_chain = transformer_chain_length(presets.tiny_llama(), t, backward=True,
                                       tokens=batch.input_ids.size + batch.ref_samples.input_ids.size)
    bounds["gradient"] = relative_tol(g_chain) * float(grad_terms)
    bounds["grad_norm"] = bounds["gradient"] + relative_tol(presets.tiny_llama().num_params()) * m1["grad_norm"]
    assert_same_sgd_step(full.params, m1, acc.params, m2, bounds, lr=0.5)


def test_step_gradient_equals_typo_by_hand_and_includes_the_term(step_setup, full_step):
    graphdef, params, rest, _, batch, _ = step_setup
    full, _ = full_step
    keep = jnp.asarray(batch.example_mask)

    @jax.jit
    def hand_grad(p, lam):
        def loss(p):
            model = nnx.merge(graphdef, p, rest)
            pair, sample = _dense_logps_jnp(model, batch), _dense_logps_jnp(model, batch.ref_samples).mean(1)
            per_pair = jax.nn.softplus(-2.0 * (pair[:, 0] - pair[:, 1])) - lam * sample
            return jnp.where(keep, per_pair, 0.0).sum() / keep.sum()
        return jax.grad(loss)(p)

    with_term, without = hand_grad(params, 0.5), hand_grad(params, 0.0)
    step_grad = jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / 0.5, params, full.params)  # SGD lr 0.5
    for g_step, g_hand in zip(jax.tree.leaves(step_grad), jax.tree.leaves(with_term)):
        np.testing.assert_allclose(g_step, np.asarray(g_hand), atol=2e-5, rtol=1e-3)
    term = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(with_term), jax.tree.leaves(without)))
    assert term > 1e-3  # the unsupervised term moves the params
    with pytest.raises(ValueError, match="need reference samples"):
        _step(step_setup, {"lam": 0.5}, batch=batch.replace(ref_samples=None))


# ------------------------------------------------------------------------------------- (c) run_training


def _write_pairs(path, n=16):
    topics = ["cats", "rain", "bread", "music", "trains", "stars", "tea", "maps"]
    with path.open("w") as f:
        for i in range(n):
            t = topics[i % len(topics)]
            f.write(json.dumps({"prompt": f"Tell me about {t} {i}.", "chosen": f"{t.title()} are nice.",
                                "rejected": "I don't know."}) + "\n")
    return path


def _overrides(tmp, name, *extra):
    return [
        f"run_dir={tmp / name}", f"data.train={tmp / 'pairs.jsonl'}", "model.source=preset:tiny_llama",
        "model.tokenizer=builtin", "model.overrides={vocab_size: 512}", "data.max_length=32", "data.buckets=[32]",
        "train.batch_size=8", "train.seq_chunk=16", "train.vocab_chunk=256", "logging.progress=false",
        "logging.tensorboard=false", "optim.lr=1e-3", "checkpoint.every=1", "checkpoint.async_save=false",
        "reference.strategy=none", "loss=[{name: typo, hparams: {lam: 0.5}}]",
        f"reference.samples={{n: 2, max_new_tokens: 8, batch_size: 8, cache_dir: '{tmp / 'cache'}'}}",
        *extra]


def _train(tmp, *extra, resume=False):
    return loop.run_training(load_config(RunConfig, None, _overrides(tmp, "run", *extra)), kind="preference",
                             resume=resume)


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(run_dir):
    from jaxpref import loading

    return [np.asarray(x) for x in jax.tree.leaves(nnx.split(loading.load_model(f"run:{run_dir}").model,
                                                             nnx.Param, ...)[1])]


def test_run_training_logs_the_term_reuses_samples_and_resumes(tmp_path):
    _write_pairs(tmp_path / "pairs.jsonl")
    full = _train(tmp_path, "train.steps=3", "checkpoint.keep=3")
    assert full["reference_samples"]["computed"] is True
    assert full["reference_samples"]["prompts"] == 16 and full["reference_samples"]["samples_per_prompt"] == 2
    m = _metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3]
    for key in ("loss/typo", "typo/sample_nll", "typo/supervised", "logps/reference_sample", "reference_sample/kl"):
        assert all(np.isfinite(r[key]) for r in m), key
    assert m[0]["typo/sample_nll"] > 0 and abs(m[0]["reference_sample/kl"]) < 1e-3  # policy == reference
    assert m[0]["loss"] == pytest.approx(m[0]["typo/supervised"] + 0.5 * m[0]["typo/sample_nll"], rel=1e-5)
    final = _params(tmp_path / "run")

    # A crash after step 2 was committed: step 3's checkpoint never happened.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "3")
    resumed = _train(tmp_path, "train.steps=3", "checkpoint.keep=3", resume=True)
    assert resumed["resumed_from"] == 2
    assert resumed["reference_samples"]["computed"] is False  # same reference, prompts, settings: cache hit
    assert resumed["reference_samples"]["cache"] == full["reference_samples"]["cache"]
    m_res = _metrics(tmp_path / "run")
    assert [r["step"] for r in m_res] == [1, 2, 3]
    assert [r["loss"] for r in m_res] == [r["loss"] for r in m]
    for a, b in zip(final, _params(tmp_path / "run")):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------------------------- (d) config


def test_typo_without_reference_samples_is_a_config_error(tmp_path):
    cfg = load_config(RunConfig, None, [f"run_dir={tmp_path / 'x'}", f"data.train={tmp_path / 'none.jsonl'}",
                                        "reference.strategy=none", "loss=[{name: typo, hparams: {lam: 0.5}}]"])
    with pytest.raises(ConfigError, match=r"\['typo'\] need responses sampled from the reference.*reference.samples"):
        loop.run_training(cfg, kind="preference")
    assert not (tmp_path / "x").exists()  # raised before the run directory, model or data
    no_term = load_config(RunConfig, None, ["loss=[{name: typo, hparams: {lam: 0.0}}]"])
    assert loop._check_reference_samples(no_term, loop._composition(no_term)) == ()
    with pytest.raises(ConfigError, match=r"reference.samples.temperature=0.0: expected > 0"):
        load_config(RunConfig, None, ["reference.samples={temperature: 0}"])
