"""Properties every registered loss must have: finite at extremes, jit/vmap/grad, exact composition, errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpref import losses
from jaxpref.testing.tolerances import U64, relative_tol

B = 8  # shared with the parity tests so eager-op caches are reused
# Losses whose per-example value depends on the other rows of the batch (sorting).
BATCH_COUPLED = {"aot", "aot_unpaired"}
# Extra hparams that turn on optional inputs, so those code paths are covered too.
OPTIONAL_PATHS = {
    "bco_pair": {"running_mean": True},
    "typo": {"kl_norm": "token_mean"},
    "typo_regression": {"kl_norm": "token_mean"},
}


# Algebra tests (a composition is its weighted parts, micro-batches add up, a mask drops rows, jit == eager)
# run in float64 (inside jax.enable_x64), so float32 round-off cannot decide them: at most 64 rounding ops per
# value on terms of magnitude <= 1000 (|log-probs| <= 66, times β⁻¹, weights <= 2, squared IPO margins):
# 2γ_64(u64)·1000 ≈ 1.4e-11 (jaxpref.testing.tolerances).
X64 = dict(rtol=relative_tol(64, U64) * 1000, atol=relative_tol(64, U64) * 1000)


def full_inputs(seed: int = 0, batch: int = B, dtype=jnp.float32, **override) -> losses.LossInputs:
    """Every LossInputs field filled with plausible random float32 values (held in ``dtype``)."""
    rng = np.random.default_rng(seed)
    n_c, n_r, n_s = (rng.integers(1, 30, batch).astype(np.float32) for _ in range(3))
    pc, pr = -n_c * rng.uniform(0.3, 2.0, batch), -n_r * rng.uniform(0.3, 2.0, batch)
    fields = dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=pc + rng.normal(0, 2, batch),
        reference_rejected_logps=pr + rng.normal(0, 2, batch),
        chosen_tokens=n_c,
        rejected_tokens=n_r,
        votes=rng.uniform(0.5, 1.0, batch),
        reference_sample_logps=-n_s * rng.uniform(0.3, 2.0, batch),
        reference_sample_tokens=n_s,
        bco_delta=np.float32(rng.normal(0, 0.1)),
    )
    fields.update(override)
    return losses.LossInputs(**{k: jnp.asarray(np.asarray(v, np.float32), dtype) for k, v in fields.items()})


def _extreme_batch() -> losses.LossInputs:
    """[8] rows mixing log-probs of −1e4 and 0 (huge positive, negative and zero margins), tokens 1..4096."""
    lo, hi = -1e4, 0.0
    rows = np.asarray(
        [
            (lo, lo, lo, lo),
            (hi, hi, hi, hi),
            (lo, hi, hi, lo),
            (hi, lo, lo, hi),
            (lo, hi, lo, hi),
            (hi, lo, hi, lo),
            (lo, lo, hi, hi),
            (hi, hi, lo, lo),
        ],
        np.float32,
    )
    tokens = np.asarray([1, 4096, 1, 7, 4096, 1, 2, 1], np.float32)
    return losses.LossInputs(
        policy_chosen_logps=rows[:, 0],
        policy_rejected_logps=rows[:, 1],
        reference_chosen_logps=rows[:, 2],
        reference_rejected_logps=rows[:, 3],
        chosen_tokens=tokens,
        rejected_tokens=tokens[::-1].copy(),
        votes=np.ones(8, np.float32),
        reference_sample_logps=rows[:, 0],
        reference_sample_tokens=tokens,
        bco_delta=np.float32(0.0),
    )


def _value_and_grad(name: str, hp: losses.HParams):
    """value_and_grad of the reduced term w.r.t. the policy-dependent inputs (policy and reference sample)."""
    fn = losses.get(name)

    def value(pc, pr, sample, rest):
        inputs = dataclasses.replace(
            rest, policy_chosen_logps=pc, policy_rejected_logps=pr, reference_sample_logps=sample
        )
        return losses.reduce_term(fn(inputs, hp))

    grad_fn = jax.value_and_grad(value, argnums=(0, 1, 2))
    return lambda x: grad_fn(x.policy_chosen_logps, x.policy_rejected_logps, x.reference_sample_logps, x)


# f-divergences at extremes: forward_kl / alpha scores reach ~e^80 (clamped), which the bounded-slope
# losses below survive; the squared IPO losses overflow float32 there (score² > 3e38), as TRL's would.
FINITE_CASES = (
    [(n, OPTIONAL_PATHS.get(n, {})) for n in losses.available()]
    + [(n, {"f_divergence": f}) for n in ("sigmoid", "hinge", "discopop", "exo_pair") for f in losses.F_DIVERGENCES[1:]]
    + [("sigmoid", {"f_divergence": "alpha_divergence", "f_alpha": 1.5})]
)


@pytest.mark.parametrize(
    "name,hp", FINITE_CASES, ids=[f"{n}-{'-'.join(map(str, h.values()))}" for n, h in FINITE_CASES]
)
def test_finite_value_and_grad_at_extremes(name, hp):
    value, grads = _value_and_grad(name, losses.make_hparams(name, hp))(_extreme_batch())
    assert np.isfinite(value), (name, value)
    for g in grads:
        assert g.shape == (B,) and np.all(np.isfinite(g)), (name, g)


@pytest.mark.parametrize("name", losses.available())
def test_jittable_vmappable_differentiable(name):
    hp = losses.make_hparams(name, OPTIONAL_PATHS.get(name, {}))
    inputs = full_inputs(seed=1)
    out = losses.get(name)(inputs, hp)
    assert out.loss.shape == (B,) and out.denom.shape == (B,) and out.loss.dtype == jnp.float32
    for key, value in out.aux.items():
        assert jnp.ndim(value) in (0, 1), key
    if name not in {"nll_sum", "nll_token_mean", "sft"}:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(out.aux)
    # vmap over a leading axis of two batches equals two separate calls; gradients are not all zero.
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), inputs, full_inputs(seed=2))
    batched = jax.vmap(_value_and_grad(name, hp))
    values, grads = batched(stacked)
    np.testing.assert_allclose(values[0], losses.reduce_term(out), rtol=1e-5)
    assert np.any(np.abs(np.asarray(grads[0])) > 0) or np.any(np.abs(np.asarray(grads[1])) > 0)
    # jit: tracing and lowering to StableHLO is where non-jittable code fails (XLA compilation is
    # exercised by test_compiled_composition_matches_eager; compiling all would dominate the runtime).
    assert "@main" in jax.jit(batched).lower(stacked).as_text()


def test_compiled_composition_matches_eager():
    """Real XLA compilation (jit ∘ grad) of a composition spanning the op families used by the losses.

    Compiling every loss would dominate the suite's runtime; each one is traced and lowered above.
    """
    names = ["sigmoid", "ipo", "sft", "orpo", "aot", "discopop", "typo_regression"]
    comp = losses.compose(names)

    def total(pc, x):
        return comp(dataclasses.replace(x, policy_chosen_logps=pc))[0]

    with jax.enable_x64(True):
        inputs = full_inputs(seed=1, dtype=jnp.float64)
        fn = jax.value_and_grad(total)
        jit_values, jit_grads = jax.jit(fn)(inputs.policy_chosen_logps, inputs)
        values, grads = fn(inputs.policy_chosen_logps, inputs)
        assert jit_values.dtype == jnp.float64
    np.testing.assert_allclose(jit_values, values, **X64)
    np.testing.assert_allclose(jit_grads, grads, **X64)


# ----------------------------------------------------------------------------- composition

SPEC_NAMES = ["sigmoid", "ipo", "sft", "simpo", "nll_token_mean", "orpo", "typo", "hinge", "bco_pair"]


@settings(max_examples=15, deadline=None)
@given(
    picks=st.lists(st.sampled_from(SPEC_NAMES), min_size=1, max_size=4),
    weights=st.lists(st.floats(-2.0, 2.0, allow_nan=False), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_composition_equals_weighted_sum_of_parts(picks, weights, seed):
    spec = [{"name": n, "weight": w} for n, w in zip(picks, weights)]
    with jax.enable_x64(True):
        inputs = full_inputs(seed, dtype=jnp.float64)
        mask = jnp.asarray(np.random.default_rng(seed).uniform(size=B) < 0.7).at[0].set(True)
        total, outputs, metrics = losses.compose(spec)(inputs, mask)
        expected = sum(w * losses.reduce_term(losses.get(n)(inputs), mask) for n, w in zip(picks, weights))
    np.testing.assert_allclose(total, expected, **X64)
    assert len(outputs) == len(picks) and metrics["loss"] is total


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), split=st.integers(1, B - 1), drop=st.integers(0, B - 1))
def test_micro_batches_with_global_denominators_equal_full_batch(seed, split, drop):
    """Grad accumulation is exact: micro-batch totals with the global denominators add up to the full batch.

    Micro-batch k is the batch with only its rows unmasked (same shape; dropping masked rows is
    equivalent, see test_mask_equals_dropping_rows).
    """
    comp = losses.compose([{"name": "sigmoid"}, {"name": "sft", "weight": 0.5}, {"name": "ipo", "weight": 0.2}])
    with jax.enable_x64(True):
        _micro_batches_equal_full_batch(comp, full_inputs(seed, dtype=jnp.float64), split, drop)


def _micro_batches_equal_full_batch(comp, full, split, drop):
    mask = jnp.ones(B, bool).at[drop].set(False)
    micro = [mask & (jnp.arange(B) < split), mask & (jnp.arange(B) >= split)]
    dens = {k: d for k, (_, d) in comp.sums(comp.outputs(full), mask).items()}

    def total(pc, m, denominators=None):
        return comp(dataclasses.replace(full, policy_chosen_logps=pc), m, denominators=denominators)[0]

    want, want_grad = jax.value_and_grad(total)(full.policy_chosen_logps, mask)
    got = [jax.value_and_grad(total)(full.policy_chosen_logps, m, dens) for m in micro]
    assert want.dtype == jnp.float64
    np.testing.assert_allclose(got[0][0] + got[1][0], want, **X64)
    np.testing.assert_allclose(got[0][1] + got[1][1], want_grad, **X64)


@pytest.mark.parametrize("name", sorted(set(losses.available()) - BATCH_COUPLED))
def test_mask_equals_dropping_rows(name):
    hp = losses.make_hparams(name, OPTIONAL_PATHS.get(name, {}))
    with jax.enable_x64(True):
        inputs = full_inputs(seed=3, dtype=jnp.float64)
        mask = jnp.asarray([True, False, True, False, True, True, False, True])
        kept = jax.tree.map(lambda a: a[jnp.asarray([0, 2, 4, 5, 7])] if jnp.ndim(a) else a, inputs)
        fn = losses.get(name)
        masked, dropped = losses.reduce_term(fn(inputs, hp), mask), losses.reduce_term(fn(kept, hp))
    np.testing.assert_allclose(masked, dropped, **X64)


def test_duplicate_names_get_distinct_keys_and_explicit_keys():
    comp = losses.compose(["sigmoid", {"name": "sigmoid", "beta": 0.5}, {"name": "hinge", "key": "slic"}])
    assert [t.key for t in comp.terms] == ["sigmoid", "sigmoid_2", "slic"]
    _, outputs, metrics = comp(full_inputs())
    assert set(outputs) == {"sigmoid", "sigmoid_2", "slic"} and "sigmoid_2/rewards/chosen" in metrics
    assert losses.build is losses.compose
    jitted = jax.jit(lambda x: comp(x)[0])  # a Composition is a closure-friendly static value
    with jax.enable_x64(True):
        np.testing.assert_allclose(jitted(full_inputs(dtype=jnp.float64)), comp(full_inputs(dtype=jnp.float64))[0],
                                   **X64)


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="available losses: .*'sigmoid'"):
        losses.get("dpo_typo")
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        losses.compose([{"name": "nope"}])
    with pytest.raises(KeyError, match="composition presets"):
        losses.get("rpo")


@pytest.mark.parametrize("name", losses.available())
def test_missing_required_input_names_loss_and_field(name):
    entry = losses.get(name)
    hp = losses.make_hparams(name, OPTIONAL_PATHS.get(name, {}))
    for field in entry.requires:
        inputs = dataclasses.replace(full_inputs(), **{field: None})
        with pytest.raises(ValueError, match=f"{name}.*{field}"):
            entry(inputs, hp)


@pytest.mark.parametrize(
    "name,hp,field",
    [
        ("bco_pair", {"running_mean": True}, "bco_delta"),
        ("typo", {}, "reference_sample_logps"),
        ("typo_regression", {"kl_norm": "token_mean"}, "reference_sample_tokens"),
        ("ipo", {}, "chosen_tokens"),
        ("sigmoid", {}, "reference_rejected_logps"),
    ],
)
def test_conditionally_required_inputs(name, hp, field):
    inputs = dataclasses.replace(full_inputs(), **{field: None})
    with pytest.raises(ValueError, match=f"{name}.*{field}"):
        losses.get(name)(inputs, losses.make_hparams(name, hp))


def test_reference_free_losses_need_no_reference():
    inputs = dataclasses.replace(full_inputs(), reference_chosen_logps=None, reference_rejected_logps=None)
    for name in ("simpo", "orpo", "orpo_odds_ratio", "typo", "typo_regression", "sft", "nll_sum", "nll_token_mean"):
        assert np.isfinite(losses.reduce_term(losses.get(name)(inputs)))
    # typo with λ = 0 needs no reference sample either.
    bare = dataclasses.replace(inputs, reference_sample_logps=None)
    assert np.isfinite(losses.reduce_term(losses.get("typo")(bare, losses.TYPOHParams(lam=0.0))))


@pytest.mark.parametrize(
    "name,key",
    [
        ("sigmoid", "label_smoothing"),
        ("nca_pair", "f_divergence"),
        ("nll_sum", "beta"),
        ("simpo", "f_divergence"),
        ("orpo", "beta"),
        ("sft", "eta"),
        ("bco_pair", "tau"),
        ("hinge", "gamma"),
    ],
)
def test_non_applicable_hparam_is_an_error(name, key):
    with pytest.raises(TypeError, match=f"{name}.*{key}.*valid keys"):
        losses.make_hparams(name, {key: 0.1})
    with pytest.raises(TypeError, match=f"{name}.*{key}"):
        losses.compose([{"name": name, key: 0.1}])


@pytest.mark.parametrize(
    "name,hp",
    [
        ("sigmoid", {"beta": 0.0}),
        ("robust", {"label_smoothing": 0.5}),
        ("exo_pair", {"label_smoothing": 0.0}),
        ("sigmoid", {"f_divergence": "kl"}),
        ("sigmoid", {"f_alpha": 0.3}),
        ("cdpo", {"label_smoothing": 0.7}),
        ("typo", {"kl_norm": "mean"}),
        ("discopop", {"tau": -1.0}),
        ("gamma_dpo", {"gamma": -0.5}),
    ],
)
def test_out_of_range_hparam_is_a_value_error(name, hp):
    with pytest.raises(ValueError, match=name):
        losses.make_hparams(name, hp)


def test_hparam_type_and_class_checks():
    with pytest.raises(TypeError, match="beta"):
        losses.make_hparams("sigmoid", beta="0.1")
    with pytest.raises(TypeError, match="literal_eq4"):
        losses.make_hparams("gamma_dpo", literal_eq4=1)
    with pytest.raises(TypeError, match="takes DPOHParams"):
        losses.get("sigmoid")(full_inputs(), losses.CDPOHParams())
    with pytest.raises(TypeError, match="weight"):
        losses.compose([{"name": "sigmoid", "weight": "1"}])
    with pytest.raises(ValueError, match="at least one term"):
        losses.compose([])
    with pytest.raises(ValueError, match="nll"):
        losses.rpo(nll="mean")
    with pytest.raises(ValueError, match="already registered"):
        losses.register("sigmoid", losses.DPOHParams)(lambda inputs, hp: None)


def test_hparams_are_hashable_and_usable_as_static_args():
    hp = losses.make_hparams("sigmoid", beta=0.3)
    assert hash(hp) == hash(losses.DPOHParams(beta=0.3))
    fn = jax.jit(functools.partial(losses.get("sigmoid").fn), static_argnums=1)
    with jax.enable_x64(True):
        x = full_inputs(dtype=jnp.float64)
        np.testing.assert_allclose(fn(x, hp).loss, losses.get("sigmoid")(x, hp).loss, **X64)
