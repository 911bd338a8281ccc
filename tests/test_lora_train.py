"""LoRA preference training: only the adapters train, the base is the frozen reference.

The step over adapters alone: its optimizer state holds only adapter leaves, step 0's DPO loss is exactly
ln 2 (policy and reference log-probs bitwise equal at B = 0), the base arrays come back bitwise unchanged and
undonated, and after training the reference (the base graph) still gives the base model's log-probs. With a
reference other than its base (``reference.source``) the step takes ``(frozen base, reference)`` and runs the
reference with its own graph: at B = 0 it equals a full-parameter step whose policy is the base. Settings LoRA
does not support are one-line errors.
"""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref import losses
from jaxpref.config import RunConfig, load_config
from jaxpref.models import build_model, lora, presets
from jaxpref.training import step as steplib
from jaxpref.training.loop import RunError, run_training
from jaxpref.types import PairBatch

LN2 = float(np.float32(np.log(2)))
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.limit=8", "data.max_length=32", "data.buckets=[32]", "train.batch_size=8",
          "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
          "optim.lr=1e-2", "lora={rank: 4, alpha: 8}", "train.steps=3", "checkpoint.every=1", "checkpoint.keep=3",
          "checkpoint.async_save=false"]


def make_batch(vocab, b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, 2, t)).astype(np.int32)
    lengths = rng.integers(9, t + 1, (b, 2))
    pos = np.arange(t)
    seg = (pos[None, None] < lengths[..., None]).astype(np.int32)
    lm = (seg.astype(bool) & (pos[None, None] >= 4)).astype(np.int32)
    ids[:, 1, :4] = ids[:, 0, :4]
    return PairBatch(ids * seg, lm, seg, (pos[None, None] * seg).astype(np.int32), np.ones(b, bool),
                     np.ones(b, np.float32), np.arange(b, dtype=np.int32))


def test_step_trains_adapters_only_and_keeps_the_base():
    model = build_model(presets.tiny_llama())
    base_graphdef = nnx.graphdef(model)
    lora.attach(model, rank=4, alpha=8.0)
    parts = lora.split(model, base_graphdef)
    optimizer = optax.adam(1e-2)
    state = steplib.init_state(parts["adapters"], optimizer, seed=0)
    adapter_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(parts["adapters"])[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        if np.ndim(leaf):  # Adam's moments: one per adapter leaf, nothing for the base
            assert any(tuple(path[-len(p):]) == p for p in adapter_paths), path
    n_moments = sum(np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x))
    assert n_moments == 2 * sum(x.size for x in jax.tree.leaves(parts["adapters"]))
    comp = losses.compose([{"name": "sigmoid"}])
    step = jax.jit(steplib.make_preference_step(parts["graphdef"], parts["rest"], optimizer, comp,
                                                seq_chunk=16, vocab_chunk=64, base_graphdef=base_graphdef),
                   donate_argnums=(0,))
    base, before = parts["base"], jax.tree.map(np.array, parts["base"])
    batch = make_batch(model.config.vocab_size)
    losses_seen = []
    for _ in range(3):
        state, metrics = step(state, base, batch, None)
        losses_seen.append(float(metrics["loss"]))
        if len(losses_seen) == 1:  # B = 0: policy and reference log-probs are bitwise equal
            assert float(metrics["sigmoid/rewards/margins"]) == 0.0
    assert losses_seen[0] == LN2
    assert losses_seen[-1] < losses_seen[0]
    for x, want in zip(jax.tree.leaves(base), jax.tree.leaves(before), strict=True):
        assert not x.is_deleted()
        np.testing.assert_array_equal(np.asarray(x), want)  # bitwise
    # after training: the reference (base graph) is the base model's log-probs; the policy moved
    def seq_logps(graphdef, *states):
        fn = jax.jit(lambda st: steplib.pair_logps(graphdef, nnx.merge_state(*st), parts["rest"], batch,
                                                   seq_chunk=16, vocab_chunk=64)[0])
        return fn(states)

    fresh = build_model(presets.tiny_llama())
    want = seq_logps(nnx.graphdef(fresh), nnx.state(fresh, nnx.Param))
    np.testing.assert_allclose(seq_logps(base_graphdef, base), want, rtol=1e-6, atol=1e-6)
    policy = seq_logps(parts["graphdef"], state.params, base)
    assert np.abs(np.asarray(policy) - np.asarray(want)).max() > 1e-3


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


def cfg_for(run_dir, hh, *extra):
    return load_config(RunConfig, None, [f"run_dir={run_dir}", f"data.train={hh}", *COMMON, *extra])


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_unsupported_lora_settings_are_one_line_errors(tmp_path, hh):
    from jaxpref.training.wro import run_wro

    with pytest.raises(RunError, match="not wro runs"):
        run_wro(cfg_for(tmp_path / "x", hh, "wro.prompts=p.txt", "wro.judge=m:f"))
    cases = [("preference", ["reference.sync_every=2", "reference.sync_alpha=0.5"], r"sync_alpha=0.5 < 1"),
             ("preference", ["reference.sync_every=2", "reference.source=preset:tiny_llama"],
              "not reference.source: drop one of them")]
    for kind, extra, match in cases:
        with pytest.raises(RunError, match=match):
            run_training(cfg_for(tmp_path / "x", hh, *extra), kind=kind)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_lora_step_with_its_own_reference_equals_the_full_step():
    comp = losses.compose([{"name": "sigmoid"}])
    optimizer = optax.sgd(1e-2)
    other = build_model(presets.tiny_llama(), rngs=7)
    ref_graphdef, ref_params, _ = nnx.split(other, nnx.Param, ...)
    batch = make_batch(other.config.vocab_size)

    full = build_model(presets.tiny_llama())
    graphdef, params, rest = steplib.split_model(full)
    full_step = jax.jit(steplib.make_preference_step(graphdef, rest, optimizer, comp, seq_chunk=16, vocab_chunk=64))
    _, want = full_step(steplib.init_state(params, optimizer, 0), ref_params, batch, None)

    model = build_model(presets.tiny_llama())
    base_graphdef = nnx.graphdef(model)
    lora.attach(model, rank=4, alpha=8.0)
    parts = lora.split(model, base_graphdef)
    lora_step = jax.jit(steplib.make_preference_step(parts["graphdef"], parts["rest"], optimizer, comp,
                                                     base_graphdef=base_graphdef, reference_graphdef=ref_graphdef,
                                                     seq_chunk=16, vocab_chunk=64))
    state = steplib.init_state(parts["adapters"], optimizer, 0)
    _, got = lora_step(state, (parts["base"], ref_params), batch, None)
    assert abs(float(want["loss"]) - np.log(2)) > 1e-3  # the other model is a different reference
    for key in ("loss", "logps/chosen", "logps/rejected", "sigmoid/rewards/margins"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6, atol=1e-6, err_msg=key)


def test_a_loaded_peft_adapter_is_the_one_that_trains(tmp_path):
    """``model.adapter`` with a ``lora`` section: the adapter read from the PEFT directory (rank 2 on q) trains,
    not fresh ``lora.rank`` adapters; the graph without it is the base."""
    from types import SimpleNamespace

    from jaxpref import parallel
    from jaxpref.models import lora_peft
    from jaxpref.training import adapters as run_adapters

    src = build_model(presets.tiny_llama())
    lora.attach(src, rank=2, alpha=4.0, targets=r"attn\.query")
    for site in lora.adapted_sites(src):
        b = getattr(site.module, site.name + "_lora_b")
        b.set_value(b.get_value() + 0.1)
    lora_peft.save_adapter(src, tmp_path / "adapter")
    cfg = load_config(RunConfig, None, ["lora={rank: 8}", f"model.adapter={tmp_path / 'adapter'}"])
    model = build_model(presets.tiny_llama())
    lora_peft.load_adapter(model, cfg.model.adapter)
    setup = SimpleNamespace(loaded=SimpleNamespace(model=model, spec="preset:tiny_llama", hf_dir=None),
                            model_json={}, run_dir=tmp_path)
    parts = run_adapters.attach_for_run(cfg, setup, parallel.make_mesh(parallel.MeshConfig(data=1),
                                                                       jax.devices()[:1]))
    assert setup.model_json["lora"]["adapters"] == {f"layers.{i}.attn.query_dnh": {"rank": 2, "scale": 2.0}
                                                    for i in (0, 1)}
    got = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(parts["adapters"])}
    want = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(src, nnx.LoRAParam))}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    off = nnx.merge(parts["base_graphdef"], parts["base"], parts["rest"])
    assert not lora.has_adapters(off)
