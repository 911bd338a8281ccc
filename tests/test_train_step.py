"""Train-step invariants (design.md §5): ln 2 at step 0, frozen reference, exact accumulation,
equality across mesh shapes, precomputed == live reference, SFT step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import losses, models, parallel
from jaxpref.config import OptimConfig
from jaxpref.testing.tolerances import assert_same_sgd_step, dpo_step_bounds
from jaxpref.training import optim
from jaxpref.training import step as S
from jaxpref.types import PairBatch, SFTBatch

BETA, LR = 0.1, 1.0  # the sigmoid term's default β; sgd()'s learning rate


def make_batch(cfg, b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, (b, 2, t)).astype(np.int32)
    lengths = rng.integers(7, t + 1, (b, 2))
    prompt = rng.integers(2, 5, (b,))
    pos = np.arange(t)
    seg = (pos[None, None] < lengths[..., None]).astype(np.int32)
    lm = (seg.astype(bool) & (pos[None, None] >= prompt[:, None, None])).astype(np.int32)
    ids[:, 1, : prompt.max()] = ids[:, 0, : prompt.max()]  # shared prompt tokens
    positions = (pos[None, None] * seg).astype(np.int32)
    return PairBatch(ids * seg, lm, seg, positions, np.ones(b, bool), np.ones(b, np.float32),
                     np.arange(b, dtype=np.int32))


@pytest.fixture(scope="module")
def setup():
    cfg = models.presets.tiny_llama()
    model = models.build_model(cfg, rngs=0)
    graphdef, params, rest = S.split_model(model)
    return cfg, graphdef, params, rest


def sgd():
    return optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, clip_norm=None), 10)[0]


_RUNS: dict = {}


def _run(setup, *, micro=1, mesh=None, loss=("sigmoid",), reference="live", batch=None):
    """One step; a step the module already ran (same settings, mesh devices and batch) is returned again:
    the live run of the step-0 test is the precomputed test's baseline, the one-device run every mesh test's."""
    batch = batch or make_batch(setup[0])
    key = (micro, tuple(loss), reference, None if mesh is None else (tuple(mesh.shape.items()),
                                                                     tuple(d.id for d in mesh.devices.flat)),
           *(np.asarray(x).tobytes() for x in jax.tree.leaves(batch)))
    if key not in _RUNS:
        _RUNS[key] = _step(setup, micro=micro, mesh=mesh, loss=loss, reference=reference, batch=batch)
    return _RUNS[key]


def _step(setup, *, micro, mesh, loss, reference, batch):
    cfg, graphdef, params, rest = setup
    opt = sgd()
    comp = losses.compose([{"name": n} for n in loss])
    state = S.build_state(params, opt, 0, mesh)
    ref_params = state.params if reference == "live" else None
    ref_logps = None
    if reference == "precomputed":
        ref_logps = jax.jit(lambda p, b: S.pair_logps(graphdef, p, rest, b, seq_chunk=8, vocab_chunk=64)[0])(
            params, batch)
    if mesh is not None:
        batch = parallel.shard_batch(batch, mesh)
        ref_logps = None if ref_logps is None else parallel.shard_batch(ref_logps, mesh)
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference=reference, micro_batches=micro,
                                        seq_chunk=8, vocab_chunk=64))
    ref_copy = jax.tree.map(np.asarray, ref_params) if ref_params is not None else None
    new, metrics = fn(state, ref_params, batch, ref_logps)
    return new, jax.device_get(metrics), ref_params, ref_copy, state


_ROW_GRADS: dict = {}


def _row_grad_norms(setup, batch) -> np.ndarray:
    """[B, 2] ‖∇θ ℓ‖ of every chosen / rejected row (one jitted Jacobian per module, cached per batch)."""
    key = batch.input_ids.tobytes() + batch.loss_mask.tobytes()
    if key not in _ROW_GRADS:
        cfg, graphdef, params, rest = setup
        if "jac" not in _ROW_GRADS:
            sums = lambda p, bt: S.pair_logps(graphdef, p, rest, bt, seq_chunk=8, vocab_chunk=64)[0]
            _ROW_GRADS["jac"] = jax.jit(jax.jacrev(sums))
        b = batch.input_ids.shape[0]
        jac = jax.tree.leaves(_ROW_GRADS["jac"](params, batch))
        _ROW_GRADS[key] = np.linalg.norm(np.concatenate([np.asarray(x).reshape(b, 2, -1) for x in jac], -1), axis=-1)
    return _ROW_GRADS[key]


def _reassociation_bounds(setup, batch, metrics, *, sft: bool = False) -> dict:
    """Rounding bounds (:func:`dpo_step_bounds`) for two programs computing the same step on ``batch``
    with the policy equal to the reference (step 0), so |r| = |ℓ|; SFT with weight 1 when ``sft``."""
    lc, lr = abs(float(metrics["logps/chosen"])), abs(float(metrics["logps/rejected"]))
    return dpo_step_bounds(setup[0], batch.input_ids.shape[-1], metrics, row_grad_norms=_row_grad_norms(setup, batch),
                           reference_abs=lc + lr, beta=BETA, sft_weight=1.0 if sft else 0.0,
                           sft_tokens=float(np.asarray(S.pair_counts(batch))[:, 0].sum()))


def _assert_same_step(a, m_a, b, m_b, bounds):
    assert_same_sgd_step(a.params, m_a, b.params, m_b, bounds, LR)


def test_step0_dpo_loss_is_ln2_and_reference_frozen(setup):
    new, metrics, ref_params, ref_copy, _ = _run(setup)
    bound = _reassociation_bounds(setup, make_batch(setup[0]), metrics)["loss"]  # policy, reference: two forwards
    assert metrics["loss"] == pytest.approx(np.log(2.0), abs=bound)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(ref_copy)):
        np.testing.assert_array_equal(np.asarray(a), b)  # reference untouched
    leaves = zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_copy))
    changed = [not np.allclose(np.asarray(a), b) for a, b in leaves]
    assert any(changed)
    assert int(new.step) == 1 and metrics["pairs"] == 8


def test_accumulation_equals_full_batch(setup):
    full, m1, *_ = _run(setup, loss=("sigmoid", "sft"))
    acc, m4, *_ = _run(setup, micro=4, loss=("sigmoid", "sft"))
    _assert_same_step(full, m1, acc, m4, _reassociation_bounds(setup, make_batch(setup[0]), m1, sft=True))


def test_precomputed_reference_equals_live(setup):
    live, m_live, *_ = _run(setup)
    pre, m_pre, *_ = _run(setup, reference="precomputed")
    _assert_same_step(live, m_live, pre, m_pre, _reassociation_bounds(setup, make_batch(setup[0]), m_live))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_shapes_agree(eight_devices, setup, shape):
    cfg = setup[0]
    batch = make_batch(cfg, seed=1)
    one = parallel.make_mesh(parallel.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    base, m_base, *_ = _run(setup, mesh=one, batch=batch, micro=2)
    mesh = parallel.make_mesh(parallel.MeshConfig(*shape), devices=eight_devices)
    new, metrics, *_ = _run(setup, mesh=mesh, batch=batch, micro=2)
    _assert_same_step(base, m_base, new, metrics, _reassociation_bounds(setup, batch, m_base))
    spec = jax.tree.leaves(parallel.tree_shardings(new.params))[0].spec
    assert spec != jax.sharding.PartitionSpec() or shape == (8, 1, 1)


def test_nan_guard_skips_update(setup):
    cfg, graphdef, params, rest = setup
    opt = sgd()
    comp = losses.compose(["sigmoid"])
    state = S.build_state(params, opt, 0)
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference="precomputed", seq_chunk=8,
                                        vocab_chunk=64))
    bad_ref = jnp.full((8, 2), jnp.nan)
    new, metrics = fn(state, None, make_batch(cfg), bad_ref)
    assert int(metrics["nonfinite"]) == 1 and int(new.skipped) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sft_step_reduces_nll(setup):
    cfg, graphdef, params, rest = setup
    opt = optim.make_optimizer(OptimConfig(name="adamw", lr=1e-2), 10)[0]
    pb = make_batch(cfg)
    batch = SFTBatch(pb.input_ids[:, 0], pb.loss_mask[:, 0], pb.segment_ids[:, 0], pb.positions[:, 0],
                     pb.example_mask, pb.index)
    state = S.build_state(params, opt, 0)
    fn = jax.jit(S.make_sft_step(graphdef, rest, opt, micro_batches=2, seq_chunk=8, vocab_chunk=64))
    losses_seen = []
    for _ in range(5):
        state, m = fn(state, batch)
        losses_seen.append(float(m["loss"]))
    assert losses_seen[-1] < losses_seen[0] - 0.1
    assert losses_seen[0] == pytest.approx(np.log(cfg.vocab_size), rel=0.15)  # random init ~ uniform
