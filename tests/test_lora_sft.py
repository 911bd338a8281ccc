"""LoRA SFT, then LoRA DPO from it: ``train.sft`` with a ``lora`` section trains and checkpoints only adapters; a
DPO run whose ``model.source`` is that run folds the SFT adapters into its base, so its reference (the base with
its own adapters off) is the SFT policy and its step-0 loss is exactly ln 2. The SFT run trains with adapter
dropout and evaluates every step (``train.eval_every``) on its own training rows: the step-0 held-out NLL (no
dropout) equals the loss of step 1 (dropout, but B = 0: the adapters add exactly 0)."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxpref import loading
from jaxpref.config import RunConfig, load_config
from jaxpref.models import lora
from jaxpref.training import adapters as run_adapters
from jaxpref.training.loop import run_training

LN2 = float(np.float32(np.log(2)))
IDS = (np.arange(24).reshape(2, 12) * 11 + 3) % 512
COMMON = ["model.overrides={vocab_size: 512}", "data.limit=8", "data.max_length=32", "data.buckets=[32]",
          "train.batch_size=8", "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32",
          "train.vocab_chunk=256", "optim.lr=2e-2", "lora={rank: 4, alpha: 8}", "train.steps=3",
          "checkpoint.async_save=false"]


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in rows(run_dir) if "loss" in r]


def logits(model):
    return np.asarray(model(IDS, segment_ids=np.ones_like(IDS), return_logits=True).logits)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("lora_sft")
    hh = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    with hh.open() as f:  # data.limit=8: these rows are the training rows
        (tmp / "hh8.jsonl").write_text("".join(next(f) for _ in range(8)))
    run_training(load_config(RunConfig, None, [
        f"run_dir={tmp / 'sft'}", f"data.train={hh}", "model.source=preset:tiny_llama", "model.tokenizer=builtin",
        *COMMON, "lora={rank: 4, alpha: 8, dropout: 0.1}", f"data.eval={tmp / 'hh8.jsonl'}", "train.eval_every=1"]),
        kind="sft")
    run_training(load_config(RunConfig, None, [
        f"run_dir={tmp / 'dpo'}", f"data.train={hh}", f"model.source=run:{tmp / 'sft'}", *COMMON]))
    return tmp


def test_lora_sft_trains_and_checkpoints_only_adapters(runs):
    got = losses(runs / "sft")
    assert got[-1] < got[0]
    evals = [r for r in rows(runs / "sft") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3] and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # the held-out rows are the 8 training rows (one batch): step 0's evaluation of the base is step 1's loss,
    # token-mean NLLs of the same tokens in two layouts (float32 rounding)
    assert load_config(RunConfig, runs / "sft" / "config.yaml", []).lora.dropout == 0.1
    assert evals[0]["eval/loss"] == pytest.approx(got[0], rel=1e-5)
    tree = ocp.StandardCheckpointHandler().metadata(runs / "sft" / "checkpoints" / "3" / "params").tree
    paths = [[str(getattr(k, "key", k)) for k in p] for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths and all(any(k.endswith(("_lora_a", "_lora_b")) for k in p) for p in paths)


def test_dpo_from_a_lora_sft_run_uses_the_sft_policy_as_base_and_reference(runs):
    got = losses(runs / "dpo")
    assert got[0] == LN2 and got[-1] < got[0]
    record = json.loads((runs / "dpo" / "model.json").read_text())["lora"]
    assert record["base"]["source"] == f"run:{(runs / 'sft').resolve()}@3"
    sft_policy = loading.load_model(f"run:{runs / 'sft'}").model
    dpo_policy = loading.load_model(f"run:{runs / 'dpo'}").model
    off = nnx.merge(run_adapters._graph_without_adapters(dpo_policy),
                    *nnx.split(dpo_policy, nnx.LoRAParam, nnx.Param, ...)[2:])
    # the DPO reference is the SFT policy (its adapters merged into the weights: float32 rounding of the fold)
    np.testing.assert_allclose(logits(off), logits(sft_policy), atol=1e-5, rtol=1e-5)
    assert lora.has_adapters(dpo_policy) and np.abs(logits(dpo_policy) - logits(sft_policy)).max() > 1e-3
