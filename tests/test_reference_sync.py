"""TR-DPO reference syncing (``reference.sync_every``) and the reference bookkeeping of the trainers:
config errors before anything is built, the synced reference in checkpoints, reference-free loss terms
read from the registry's ``requires``, and the trainer setup shared by every trainer. The SIGKILL /
``--resume`` proof that a resumed TR-DPO run is bitwise equal to an uninterrupted one is in
``test_reliability.py``."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import config as run_config
from jaxpref import losses, models
from jaxpref.config import ConfigError, ReferenceConfig, RunConfig, load_config
from jaxpref.loading import SpecError
from jaxpref.losses import registry
from jaxpref.training import checkpoint as ckpt
from jaxpref.training import loop, reference

TINY = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
        "data.max_length=128", "data.buckets=[128]", "logging.progress=false", "logging.tensorboard=false"]


@pytest.mark.parametrize("strategy", ["precomputed", "none"])
def test_sync_without_live_reference_is_a_config_error(strategy, tmp_path, capsys):
    overrides = [f"reference.strategy={strategy}", "reference.sync_every=2"]
    with pytest.raises(ConfigError, match=rf"reference\.sync_every=2 .*reference\.strategy={strategy}"):
        load_config(RunConfig, None, overrides)
    with pytest.raises(ConfigError, match="reference.sync_every"):  # also when built in code
        ReferenceConfig(strategy=strategy, sync_every=3)
    # The CLI prints one line and builds nothing (no run directory, no model).
    from train import preference

    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        preference.main([f"run_dir={run}", "data.train=unused.jsonl", *TINY, *overrides])
    message = str(exit_.value.code)
    assert "\n" not in message and message.startswith("config error: reference.sync_every=2")
    assert f"reference.strategy={strategy}" in message
    assert not run.exists()


def test_sync_settings_are_range_checked():
    ok = load_config(RunConfig, None, ["reference.sync_every=4", "reference.sync_alpha=0.5"]).reference
    assert (ok.sync_every, ok.sync_alpha) == (4, 0.5)
    for bad, key in (("reference.sync_every=-1", "sync_every"), ("reference.sync_alpha=0", "sync_alpha"),
                     ("reference.sync_alpha=1.5", "sync_alpha")):
        with pytest.raises(ConfigError, match=f"reference.{key}"):
            load_config(RunConfig, None, [bad])


def test_wro_rejects_sync_every():
    from jaxpref.training.wro import check_wro_config

    cfg = load_config(RunConfig, None, ["wro.prompts=p.txt", "wro.judge=m:f", "reference.sync_every=2"])
    with pytest.raises(loop.RunError, match="reference.sync_every=2: train.wro keeps its reference frozen"):
        check_wro_config(cfg)
    check_wro_config(dataclasses.replace(cfg, reference=ReferenceConfig()))  # the same config without it is fine


def test_sync_reference_is_the_soft_update():
    ref = {"w": jnp.array([1.0, -2.0, 4.0], jnp.float32), "b": jnp.array([0.5], jnp.bfloat16)}
    pol = {"w": jnp.array([3.0, 2.0, 0.0], jnp.float32), "b": jnp.array([1.5], jnp.bfloat16)}
    half = reference.sync_reference(ref, pol, 0.5)  # exactly representable midpoints
    np.testing.assert_array_equal(np.asarray(half["w"]), [2.0, 0.0, 2.0])
    assert half["b"].dtype == jnp.bfloat16 and float(half["b"][0]) == 1.0
    full = reference.sync_reference(ref, pol, 1.0)  # alpha = 1: the reference becomes the policy
    np.testing.assert_array_equal(np.asarray(full["w"]), np.asarray(pol["w"]))


def test_checkpoint_holds_the_synced_reference(tmp_path):
    import optax

    from jaxpref.training.step import init_state

    state = init_state({"w": jnp.arange(4.0)}, optax.sgd(0.1), 0)
    ref = {"w": jnp.array([0.25, -1.0, 3.0, 7.5], jnp.float32)}
    c = ckpt.RunCheckpointer(tmp_path / "ck", every=1, async_save=False)
    assert c.save(1, state, {"step": 1})  # a run without syncing: no reference item
    assert c.save(2, state, {"step": 2}, reference=ref)
    c.wait()
    assert not c.has_reference(1) and c.has_reference(2)
    template = {"w": jnp.zeros(4, jnp.float32)}
    np.testing.assert_array_equal(np.asarray(c.restore_reference(template, 2)["w"]), np.asarray(ref["w"]))
    restored, meta, step = c.restore(state)  # the state restores as before, the reference item aside
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.arange(4.0))
    with pytest.raises(ckpt.CheckpointError, match="step 1 .* holds no reference params"):
        c.restore_reference(template, 1)
    with pytest.raises(ckpt.CheckpointError, match="do not match this run's reference model"):
        c.restore_reference({"w": jnp.zeros(5, jnp.float32)}, 2)
    assert ckpt.restore_params(tmp_path / "ck", {"w": jnp.zeros(4)})[1] == 2  # eval reads params only
    c.close()


def test_resume_picks_the_reference_that_was_in_use(tmp_path):
    import optax

    from jaxpref.training.step import init_state

    cfg = load_config(RunConfig, None, ["reference.sync_every=3", f"run_dir={tmp_path / 'run'}"])
    state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), 0)
    initial, synced = {"w": jnp.zeros(2)}, {"w": jnp.array([1.0, 2.0])}
    c = ckpt.RunCheckpointer(tmp_path / "run" / "checkpoints", every=1, async_save=False)
    c.save(2, state, {}, reference=None)  # before the first sync (old format): the initial reference is right
    c.save(4, state, {}, reference=synced)
    c.save(5, state, {}, reference=None)  # after a sync but without the reference item
    c.wait()
    assert loop._restore_synced_reference(cfg, c, initial, 0) is initial
    assert loop._restore_synced_reference(cfg, c, initial, 2) is initial
    np.testing.assert_array_equal(np.asarray(loop._restore_synced_reference(cfg, c, initial, 4)["w"]), [1.0, 2.0])
    with pytest.raises(loop.RunError, match=r"at step 5: reference.sync_every=3 synced the reference before"):
        loop._restore_synced_reference(cfg, c, initial, 5)
    c.close()


def test_sync_with_a_differently_shaped_reference_model_is_an_error():
    cfg = load_config(RunConfig, None, ["reference.sync_every=2", "reference.source=preset:other"])
    policy = {"w": jnp.zeros((4, 2))}
    loop._check_syncable(cfg, {"w": jnp.ones((4, 2))}, policy)
    with pytest.raises(loop.RunError, match="reference.source=preset:other has other parameters"):
        loop._check_syncable(cfg, {"w": jnp.zeros((4, 3))}, policy)
    with pytest.raises(loop.RunError, match="mixes the policy into the reference"):
        loop._check_syncable(cfg, {"v": jnp.zeros((4, 2))}, policy)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Losses registered inside a test leave the global registry as it was."""
    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))
    return registry


def test_reference_free_terms_come_from_requires(scratch_registry):
    @scratch_registry.register("test_only_margin", losses.NoHParams, requires=registry.POLICY)
    def margin(inputs, hp):
        return registry.pair_mean_output(inputs.policy_rejected_logps - inputs.policy_chosen_logps, {})

    @scratch_registry.register("test_only_ref_margin", losses.NoHParams, requires=registry.POLICY + registry.REFERENCE)
    def ref_margin(inputs, hp):
        return registry.pair_mean_output(inputs.reference_chosen_logps - inputs.policy_chosen_logps, {})

    none = load_config(RunConfig, None, ["reference.strategy=none"])
    # A new reference-free term (and ORPO's odds-ratio term, which a hard-coded list had missed).
    for spec in (["test_only_margin"], ["test_only_margin", "orpo_odds_ratio", "simpo", {"name": "sft"}]):
        comp = losses.compose(spec)
        assert reference.reference_terms(comp) == ()
        loop.check_reference(none, comp)
    comp = losses.compose(["test_only_margin", "test_only_ref_margin", {"name": "sigmoid", "key": "dpo"}])
    assert reference.reference_terms(comp) == ("test_only_ref_margin", "dpo")
    with pytest.raises(loop.RunError, match=r"strategy=none but loss terms \['test_only_ref_margin', 'dpo'\]"):
        loop.check_reference(none, comp)
    loop.check_reference(load_config(RunConfig, None, []), comp)  # live: fine
    # Every registered loss: needs a reference exactly when it fails without reference log-probs.
    ones = jnp.ones((2,), jnp.float32)
    for name in losses.available():
        fields = {f.name: ones for f in dataclasses.fields(losses.LossInputs)
                  if not f.name.startswith("reference_")}
        inputs = losses.LossInputs(**{**fields, "bco_delta": jnp.zeros(()),
                                      "reference_sample_logps": ones, "reference_sample_tokens": ones})
        try:
            jax.eval_shape(lambda x, n=name: losses.get(n)(x), inputs)
            fails = False
        except ValueError as err:
            fails = "reference_chosen_logps" in str(err) or "reference_rejected_logps" in str(err)
        assert bool(reference.reference_terms(losses.compose([name]))) == fails, name


def test_run_config_model_section_is_not_named_like_the_architecture():
    assert run_config.RunConfig.__dataclass_fields__["model"].type == "ModelRunConfig"
    assert not hasattr(run_config, "ModelConfig")  # one ModelConfig: the architecture
    assert models.ModelConfig.__module__ == "jaxpref.models.config"
    cfg = load_config(RunConfig, None, ["model.source=preset:tiny_llama", "model.remat=true"])
    assert isinstance(cfg.model, run_config.ModelRunConfig) and cfg.model.model_overrides()["remat"] is True


# ---------------------------------------------------------------- the trainer setup shared by the trainers


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


def _trainers():
    from jaxpref.reward_model import run_reward_training
    from jaxpref.training.wro import run_wro

    wro = ["wro.prompts=p.txt", "wro.judge=m:f"]
    return {"preference": (loop.run_training, []), "reward_model": (run_reward_training, []),
            "wro": (run_wro, wro)}


@pytest.mark.parametrize("trainer", ["preference", "reward_model", "wro"])
def test_every_trainer_checks_the_model_before_building(trainer, tmp_path, hh):
    """The vocabulary check and the architecture check of a resume run before the run directory is
    touched or a model is built, in all three trainers (one shared setup)."""
    fn, extra = _trainers()[trainer]
    small = load_config(RunConfig, None, [f"run_dir={tmp_path / 'v'}", f"data.train={hh}", *TINY, *extra,
                                          "model.overrides={vocab_size: 64}"])
    with pytest.raises(SpecError, match="vocab_size is 64"):
        fn(small, resume=False)
    assert not (tmp_path / "v").exists()
    run = tmp_path / "r"
    run.mkdir()
    saved = {"hf_config": {"hidden_size": 32, "num_hidden_layers": 2}}
    (run / "model.json").write_text(json.dumps(saved))
    other = load_config(RunConfig, None, [f"run_dir={run}", f"data.train={hh}", *TINY, *extra,
                                          "model.overrides={vocab_size: 512, hidden_size: 48, head_dim: 12}"])
    with pytest.raises(SpecError, match=r"resume of .*hidden_size: checkpoint 32 vs config 48"):
        fn(other, resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["model.json"]
