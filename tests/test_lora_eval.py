"""LoRA with ``train.eval_every`` and ``reference.source`` (the reference in a graph of its own): the held-out
pairs are the training pairs, so the step-0 ``eval/loss`` (the evaluator's forward of the base and of that
reference) equals the loss of training step 1 (the step's forward of the same parameters), and it is not ln 2
(another reference). LoRA SFT runs with ``train.eval_every``: ``tests/test_lora_sft.py``.
"""

import json

import numpy as np
import pytest

from jaxpref.config import RunConfig, load_config
from jaxpref.models import build_model, hf_io, presets
from jaxpref.testing.models import fast_compile
from jaxpref.training import loop

LN2 = float(np.float32(np.log(2)))
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.max_length=32", "data.buckets=[32]", "train.batch_size=8", "logging.progress=false",
          "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256", "optim.lr=1e-2",
          "train.steps=1", "checkpoint.async_save=false"]


@pytest.fixture(scope="module", autouse=True)
def _fast():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def pairs8(shared_data, tmp_path_factory):
    """The first 8 HH-RLHF pairs in a file of their own (training and held-out data at once)."""
    path = tmp_path_factory.mktemp("pairs") / "hh8.jsonl"
    with (shared_data / "hh_rlhf_helpful_base_test_2k.jsonl").open() as f:
        path.write_text("".join(next(f) for _ in range(8)))
    return path


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_with_a_reference_of_its_own(tmp_path, pairs8):
    hf_io.save_hf(build_model(presets.tiny_llama(vocab_size=512), rngs=7), tmp_path / "ref")
    run_dir = tmp_path / "run"
    loop.run_training(load_config(RunConfig, None, [
        f"run_dir={run_dir}", f"data.train={pairs8}", f"data.eval={pairs8}", *COMMON, "lora={rank: 4, alpha: 8}",
        f"reference.source=hf:{tmp_path / 'ref'}", "train.eval_every=1", "train.eval_batch_size=8"]))
    rows = metrics(run_dir)
    evals = [r for r in rows if "eval/loss" in r]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 1] and [r["step"] for r in train] == [1]
    assert abs(train[0]["loss"] - LN2) > 1e-3  # the reference is another model than the base
    # the same 8 pairs, the same parameters: the evaluator's loss and the step's agree to float32 rounding
    assert evals[0]["eval/loss"] == pytest.approx(train[0]["loss"], rel=1e-5, abs=1e-6)
    assert evals[0]["eval/pairs"] == 8
    assert all(np.isfinite(r["eval/R_star_median"]) for r in evals)
