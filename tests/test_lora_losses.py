"""Every registered loss trains LoRA adapters: one LoRA preference step whose composition holds every loss of the
registry as its own term (TYPO's with reference samples), with adapter dropout, compiled once.

Each term's batch value is finite; the update touches the adapters alone (the optimizer state holds adapter
moments only and the frozen base comes back bitwise unchanged, undonated); the gradient is finite and reaches the
B factors (at B = 0 the A factors get exactly zero, d(x A B)/dA = x^T g B^T); and at the zero-initialised adapters
the policy log-probs equal the reference's (the base with the adapters off) bitwise, dropout or not (B = 0: the
adapters add exactly 0), so every reference-based reward is exactly 0.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_lora_train import make_batch

from jaxpref import losses
from jaxpref.losses import registry
from jaxpref.models import lora, presets
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.training import step as steplib
from jaxpref.types import ReferenceSampleBatch

HPARAMS = {"typo": {"lam": 0.5}, "typo_regression": {"lam": 0.5}, "bco_pair": {"running_mean": True}}
S = 2  # reference samples per pair


def sample_batch(vocab, b, t=12, seed=1) -> ReferenceSampleBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(7, t + 1, (b, S))
    pos = np.arange(t)
    seg = (pos[None, None] < lengths[..., None]).astype(np.int32)
    ids = rng.integers(3, vocab, (b, S, t)).astype(np.int32) * seg
    mask = (seg.astype(bool) & (pos[None, None] >= 4)).astype(np.int32)
    return ReferenceSampleBatch(ids, mask, seg, (pos[None, None] * seg).astype(np.int32),
                                rng.normal(-20.0, 2.0, (b, S)).astype(np.float32))


@pytest.fixture(scope="module")
def stepped():
    with fast_compile():
        return _step_every_loss()


def _step_every_loss():
    model = random_model(presets.tiny_llama())
    base_graphdef = nnx.graphdef(model)
    lora.attach(model, rank=4, alpha=8.0)
    parts = lora.split(model, base_graphdef)
    names = losses.available()
    comp = losses.compose([{"name": n, "key": n, **HPARAMS.get(n, {})} for n in names])
    optimizer = optax.adam(1e-2)
    step = jax.jit(steplib.make_preference_step(parts["graphdef"], parts["rest"], optimizer, comp, seq_chunk=16,
                                                vocab_chunk=64, base_graphdef=base_graphdef, lora_dropout=0.1),
                   donate_argnums=(0,))
    batch = make_batch(model.config.vocab_size)
    batch = batch.replace(ref_samples=sample_batch(model.config.vocab_size, batch.input_ids.shape[0]))
    state = steplib.init_state(parts["adapters"], optimizer, seed=0)
    before = jax.tree.map(np.array, (parts["adapters"], parts["base"]))
    new, metrics = step(state, parts["base"], batch, None)
    return names, parts, before, new, jax.device_get(metrics)


def test_the_composition_holds_every_registered_loss(stepped):
    names, _, _, _, metrics = stepped
    assert {f"loss/{n}" for n in names} <= set(metrics)
    assert metrics["nonfinite"] == 0 and np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert metrics["grad_norm"] > 0


@pytest.mark.parametrize("name", losses.available())
def test_each_loss_is_finite_and_rewards_vanish_at_zero_adapters(stepped, name):
    _, _, _, _, metrics = stepped
    assert np.isfinite(metrics[f"loss/{name}"]), name
    if set(registry.REFERENCE) & set(losses.get(name).requires):
        # policy == reference bitwise at B = 0: every reward beta * (log pi - log pi_ref) is exactly 0
        for side in ("chosen", "rejected"):
            assert metrics[f"{name}/rewards/{side}"] == 0.0, (name, side)


def test_only_the_adapters_move_and_the_base_is_untouched(stepped):
    _, parts, (adapters0, base0), new, _ = stepped
    for x, want in zip(jax.tree.leaves(parts["base"]), jax.tree.leaves(base0), strict=True):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), want)
    assert jax.tree.structure(new.params) == jax.tree.structure(parts["adapters"])
    flat_new = dict(nnx.to_flat_state(new.params))
    for path, var in nnx.to_flat_state(adapters0):
        moved = np.abs(np.asarray(flat_new[path].get_value()) - np.asarray(var.get_value())).max()
        if str(path[-1]).endswith(lora.B_SUFFIX):
            assert moved > 0, path
        else:  # A: zero gradient at B = 0, and Adam's zero update
            assert moved == 0, path
