"""LoRA adapter dropout (``lora.dropout``, PEFT's ``lora_dropout``): ``h = W0 x + scale * B A dropout(x)``.

One projection under :func:`jaxpref.models.lora.dropout` equals a float64 numpy computation with the same mask
(the frozen path never drops; rate 0 is the plain projection bitwise); a stacked (``lax.scan``) and an unrolled
model draw the same per-layer masks; outside the context (reference, evaluation, generation) nothing drops. The
train step: rate 0 traces no random numbers at all, rate p is a deterministic function of ``(state.rng,
state.step)`` (so a resumed run draws the same masks: the README's LoRA command runs with dropout and
``tests/test_lora_run.py`` kills and resumes it bitwise), another step number draws other masks, every
micro-batch gets its own key, and the reference log-probs the loss sees are the base model's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_lora_train import make_batch

from jaxpref import losses
from jaxpref.models import layer_stack, lora, presets
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.training import step as steplib

P = 0.25
IDS = (np.arange(24).reshape(2, 12) * 37 + 5) % 128


def with_random_b(model, scale=0.2):
    """Gives every adapter a nonzero B (seeded), so the low-rank path shows in the outputs."""
    for i, site in enumerate(lora.adapted_sites(model)):
        b = getattr(site.module, site.name + lora.B_SUFFIX)
        b.set_value(scale * jax.random.normal(jax.random.key(100 + i), b.get_value().shape, b.get_value().dtype))
    return model


@pytest.fixture(scope="module", autouse=True)
def _fast():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def unrolled():
    model = random_model(presets.tiny_llama())
    base_graphdef = nnx.graphdef(model)
    lora.attach(model, rank=4, alpha=8.0)
    return with_random_b(model), base_graphdef


def test_one_projection_drops_the_adapter_input_only(unrolled):
    model, _ = unrolled
    module = model.layers[1].mlp
    x = jax.random.normal(jax.random.key(1), (4, 8, model.config.hidden_size), jnp.float32)
    project = lambda: np.asarray(lora.project(module, "up_df", "...d,df->...f", x, jnp.float32))  # noqa: E731
    plain = project()
    key = jax.random.key(7)
    with lora.dropout(key, 0.0), lora.layer_scope(1):
        np.testing.assert_array_equal(project(), plain)  # rate 0: the dropout-free projection, bitwise
    with lora.dropout(key, P), lora.layer_scope(1):
        got = project()
    mask = np.asarray(lora.dropout_mask(jax.random.fold_in(key, 1), "up_df", x.shape, P))  # layer 1's key
    assert abs(mask.mean() - (1 - P)) < 0.06  # 1024 draws: the keep rate within 4.4 sigma
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    w, a, b = (f64(getattr(module, n)[...]) for n in ("up_df", "up_df_lora_a", "up_df_lora_b"))
    xd = f64(x)
    want = xd @ w + module.up_df_lora_scale * ((np.where(mask, xd / (1 - P), 0.0) @ a) @ b)
    # float32 sums of D = 32 (x W) and D + r terms (the update): relative error well below 1e-5 of the magnitudes
    magnitude = np.abs(xd) @ np.abs(w) + module.up_df_lora_scale * (np.abs(xd / (1 - P)) @ np.abs(a)) @ np.abs(b)
    assert np.all(np.abs(got - want) <= 1e-5 * magnitude + 1e-7)
    assert np.abs(got - plain).max() > 1e-3  # the mask matters
    np.testing.assert_array_equal(project(), plain)  # outside the context nothing drops


def test_stacked_and_unrolled_layers_draw_the_same_masks(unrolled):
    model, _ = unrolled
    stacked = random_model(presets.tiny_llama(scan_layers=True))
    lora.attach(stacked, rank=4, alpha=8.0)
    nnx.update(stacked, layer_stack.stack_layers(nnx.state(model)))  # the same base and adapters, stacked

    @nnx.jit
    def logits(m, key):
        with lora.dropout(key, P):
            return m(IDS, return_logits=True).logits

    key = jax.random.key(3)
    got_unrolled, got_stacked = np.asarray(logits(model, key)), np.asarray(logits(stacked, key))
    np.testing.assert_allclose(got_stacked, got_unrolled, rtol=1e-5, atol=1e-5)
    assert np.abs(got_unrolled - np.asarray(logits(model, jax.random.key(4)))).max() > 1e-3  # other key, masks
    # the base with the adapters off (the reference) is unchanged by the context: the same program
    off = random_model(presets.tiny_llama())
    plain = nnx.jit(lambda m: m(IDS, return_logits=True).logits)
    np.testing.assert_array_equal(np.asarray(logits(off, key)), np.asarray(plain(off)))


def _random_ops(fn, *args) -> set[str]:
    text = str(jax.make_jaxpr(fn)(*args))
    return {op for op in ("random_bits", "threefry2x32", "random_fold_in") if op in text}


@pytest.fixture(scope="module")
def steps(unrolled):
    model, base_graphdef = unrolled
    parts = lora.split(model, base_graphdef)
    optimizer = optax.sgd(1e-2)
    comp = losses.compose([{"name": "sigmoid", "beta": 0.1}])
    make = lambda rate: steplib.make_preference_step(  # noqa: E731
        parts["graphdef"], parts["rest"], optimizer, comp, seq_chunk=16, vocab_chunk=64,
        base_graphdef=base_graphdef, lora_dropout=rate)
    state = steplib.init_state(parts["adapters"], optimizer, seed=0)
    batch = make_batch(model.config.vocab_size)
    return parts, make, state, batch


def test_the_step_draws_masks_from_the_run_key_and_the_step_number_only(steps):
    parts, make, state, batch = steps
    assert _random_ops(make(0.0), state, parts["base"], batch, None) == set()  # rate 0: no random numbers
    assert "random_bits" in _random_ops(make(P), state, parts["base"], batch, None)
    dropped = jax.jit(make(P))
    first, m1 = dropped(state, parts["base"], batch, None)
    again, m2 = dropped(state, parts["base"], batch, None)
    for x, y in zip(jax.tree.leaves((first, m1)), jax.tree.leaves((again, m2)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the same (rng, step): the same masks
    # the same parameters at another step number: other masks, so other policy log-probs
    _, m_later = dropped(state.replace(step=jnp.ones((), jnp.int32)), parts["base"], batch, None)
    for key in ("logps/chosen", "logps/rejected", "loss"):
        assert abs(float(m1[key]) - float(m_later[key])) > 1e-4, key
    # the loss's reference log-probs (policy log-prob minus reward / beta) are the base model's, no dropout
    base_sums, _ = jax.jit(lambda b: steplib.pair_logps(parts["base_graphdef"], b, parts["rest"], batch,
                                                        seq_chunk=16, vocab_chunk=64))(parts["base"])
    for col, side in enumerate(("chosen", "rejected")):
        implied = float(m1[f"logps/{side}"]) - float(m1[f"sigmoid/rewards/{side}"]) / 0.1
        want = float(np.asarray(base_sums)[:, col].mean())
        assert implied == pytest.approx(want, rel=1e-4), side


def test_every_micro_batch_gets_its_own_key():
    """``accumulate_gradients(key=...)``: micro-batch i's loss sees ``fold_in(key, i)``; the per-micro-batch
    uniforms land in their own slot of the summed aux, so they can be told apart."""
    k = 4

    def micro_loss(w, rows, key):
        u = jax.random.uniform(key)
        slot = jax.nn.one_hot(rows[0].astype(jnp.int32) % k, k)  # strided: micro-batch i holds rows i, i + k
        return (w * rows.sum()).astype(jnp.float32), {"u": u * slot}

    rows = jnp.arange(2 * k, dtype=jnp.float32)
    key = jax.random.key(5)
    _, aux, _ = steplib.accumulate_gradients(micro_loss, jnp.float32(1.0), (rows,), k, key=key)
    u = np.asarray(aux["u"])
    assert len(set(u.tolist())) == k and np.all((u > 0) & (u < 1))
    _, aux_again, _ = steplib.accumulate_gradients(micro_loss, jnp.float32(1.0), (rows,), k, key=key)
    np.testing.assert_array_equal(np.asarray(aux_again["u"]), u)
