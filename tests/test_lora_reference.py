"""LoRA runs whose reference does more than score pairs: TYPO's reference samples and TR-DPO's synced reference.

(a) A LoRA run with TYPO (reference samples) trains a loaded PEFT adapter whose B is not zero, so its policy at
step 0 is not its base: the reference samples it draws are the base model's own samples with the adapters off
(generated here independently, from a freshly built base) and not the adapted model's; the term is logged.
(b) TR-DPO with LoRA (``reference.sync_every=1``, hard sync): the reference is the base plus the adapters copied
at the last sync, so every step's policy is its reference and every loss is exactly ln 2 while the adapters
move; the checkpoint's synced reference is that step's adapters.
"""

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from lora_common import COMMON, LN2, metrics

from jaxpref.config import RunConfig, load_config
from jaxpref.models import build_model, lora, lora_peft, presets
from jaxpref.testing.models import fast_compile
from jaxpref.training import loop


@pytest.fixture(scope="module", autouse=True)
def _fast():
    with fast_compile():
        yield


def test_typo_reference_samples_are_the_base_models(tmp_path, pairs8, monkeypatch):
    src = build_model(presets.tiny_llama(vocab_size=512))
    lora.attach(src, rank=2, alpha=4.0, targets=r"attn\.(query|value)")
    for i, site in enumerate(lora.adapted_sites(src)):  # a strong adapter: it changes what the model samples
        b = getattr(site.module, site.name + lora.B_SUFFIX)
        b.set_value(jax.random.normal(jax.random.key(i), b.get_value().shape, b.get_value().dtype))
    lora_peft.save_adapter(src, tmp_path / "adapter")
    drawn = {}
    sample_reference = loop._sample_reference

    def spy(cfg, graphdef, rest, params, data, tokenizer):
        drawn.update(cfg=cfg, rest=rest, data=data, tokenizer=tokenizer)
        drawn["samples"] = sample_reference(cfg, graphdef, rest, params, data, tokenizer)
        return drawn["samples"]

    monkeypatch.setattr(loop, "_sample_reference", spy)
    cache = tmp_path / "cache"
    cfg = load_config(RunConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"data.train={pairs8}", *COMMON, "lora={}",
        f"model.adapter={tmp_path / 'adapter'}",
        "reference.strategy=none", "loss=[{name: typo, hparams: {lam: 0.5}}]",
        f"reference.samples={{n: 2, max_new_tokens: 6, batch_size: 8, cache_dir: '{cache}'}}"])
    loop.run_training(cfg)
    m = metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1]
    for key in ("loss/typo", "typo/sample_nll", "logps/reference_sample", "reference_sample/kl"):
        assert all(np.isfinite(r[key]) for r in m), key
    # the policy at step 0 is base + adapter, so it is not the reference the samples came from
    assert abs(m[0]["reference_sample/kl"]) > 1e-3

    def samples_of(model, cache_dir):
        fresh = dataclasses.replace(drawn["cfg"], reference=dataclasses.replace(
            drawn["cfg"].reference, samples=dataclasses.replace(drawn["cfg"].reference.samples,
                                                                cache_dir=str(cache_dir))))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        out = sample_reference(fresh, graphdef, rest, params, drawn["data"], drawn["tokenizer"])
        assert out.computed
        return out.samples

    got = drawn["samples"].samples
    base = samples_of(build_model(presets.tiny_llama(vocab_size=512)), tmp_path / "base")
    np.testing.assert_array_equal(got.tokens, base.tokens)
    np.testing.assert_array_equal(got.lengths, base.lengths)
    adapted = samples_of(lora.merged(src), tmp_path / "adapted")
    assert not np.array_equal(adapted.tokens, got.tokens)  # the adapters on would have sampled otherwise


def test_tr_dpo_syncs_a_copy_of_the_adapters(tmp_path, pairs8):
    run_dir = tmp_path / "run"
    loop.run_training(load_config(RunConfig, None, [
        f"run_dir={run_dir}", f"data.train={pairs8}", *COMMON, "lora={rank: 4, alpha: 8}", "train.steps=2",
        "reference.sync_every=1", "checkpoint.every=2"]))
    rows = metrics(run_dir)
    assert [r["loss"] for r in rows] == [LN2] * 2  # policy == synced reference, bitwise, at every step
    assert all(r["update_norm"] > 0 for r in rows)
    reader = ocp.StandardCheckpointer()
    step_dir = run_dir / "checkpoints" / "2"  # synced after step 2, then saved: the reference is step 2's policy
    ref, params = (jax.tree.leaves(reader.restore(step_dir / item)) for item in ("reference", "params"))
    assert len(ref) == len(params) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for a, b in zip(ref, params, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
