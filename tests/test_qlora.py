"""QLoRA (``lora.quantize``, :func:`jaxpref.models.lora.quantize`): the frozen base stored as int8 / int4 and
dequantised in every projection. Each weight is within half a quantisation step, all of the logits' error comes
from that step (the float model of the dequantised weights gives the same logits), the error against the float
base stays within a first-order bound derived from the step, and a tiny QLoRA int8 DPO run lowers the loss and
evaluates held-out pairs during training."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.config import RunConfig, load_config
from jaxpref.models import build_model, lora, presets
from jaxpref.training.loop import run_training

IDS = (np.arange(24).reshape(2, 12) * 7 + 3) % 128
LN2 = float(np.float32(np.log(2)))
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.max_length=32", "data.buckets=[32]", "train.batch_size=8", "logging.progress=false",
          "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256", "optim.lr=1e-2",
          "train.steps=3", "checkpoint.async_save=false"]


def logits(model):
    return np.asarray(model(IDS, segment_ids=np.ones_like(IDS), return_logits=True).logits)


@pytest.fixture(scope="module")
def base_logits():
    return logits(build_model(presets.tiny_llama()))


@pytest.mark.parametrize("kind,q_max", [("int8", 127), ("int4", 7)])
def test_quantised_base_is_within_half_a_step(kind, q_max, base_logits):
    model = build_model(presets.tiny_llama())
    float_w = {s.path: np.asarray(s.var.get_value()) for s in lora.sites(model)}
    lora.quantize(model, kind)
    deq = {}
    for site in lora.sites(model):
        q = site.var.get_value()
        assert q.dtype == jnp.dtype(kind)
        step = np.asarray(getattr(site.module, site.name + "_qscale").get_value())
        w = float_w[site.path]
        in_axes = tuple(range(site.n_in))
        np.testing.assert_allclose(step, np.abs(w).max(axis=in_axes, keepdims=True) / q_max, rtol=1e-6)
        deq[site.path] = np.asarray(q, np.float32) * step
        assert np.all(np.abs(w - deq[site.path]) <= step / 2 * (1 + 1e-6))  # half a step per weight
    got = logits(model)
    if kind == "int8":
        stacked = build_model(presets.tiny_llama(scan_layers=True))
        lora.quantize(stacked, kind)  # steps per layer and output channel: the same integers when stacked
        np.testing.assert_allclose(logits(stacked), got, atol=1e-6, rtol=1e-6)
    # all the error is the quantisation: the float model of the dequantised weights computes the same logits
    plain = build_model(presets.tiny_llama())
    for site in lora.sites(plain):
        site.var.set_value(jnp.asarray(deq[site.path]))
    np.testing.assert_allclose(got, logits(plain), atol=1e-6, rtol=1e-6)
    # vs the float base: each weight is off by <= 1 / (2 q_max) of its channel's max |w|; to first order the
    # 7 projections of each of the L = 2 layers add such relative errors, so |dlogits| <= 7 L / (2 q_max) max|logits|
    tol = 7 * 2 / (2 * q_max) * np.abs(base_logits).max()
    err = np.abs(got - base_logits).max()
    assert 0 < err <= tol, (err, tol)


def test_qlora_int8_run_lowers_the_loss_and_evaluates(tmp_path, shared_data):
    hh = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    run_training(load_config(RunConfig, None, [
        f"run_dir={tmp_path / 'q8'}", f"data.train={hh}", *COMMON, "lora={rank: 4, alpha: 8, quantize: int8}",
        "data.limit=12", "data.eval_split=0.25", "train.eval_every=3"]))
    rows = [json.loads(x) for x in (tmp_path / "q8" / "metrics.jsonl").read_text().splitlines()]
    m = [r for r in rows if "loss" in r]
    assert m[0]["loss"] == LN2 and m[-1]["loss"] < m[0]["loss"] - 0.01
    evals = {r["step"]: r for r in rows if "eval/loss" in r}  # held-out pairs under the LoRA policy
    assert sorted(evals) == [0, 3] and evals[0]["eval/loss"] == LN2 and evals[3]["eval/loss"] != LN2
    assert json.loads((tmp_path / "q8" / "model.json").read_text())["lora"]["quantize"] == "int8"


