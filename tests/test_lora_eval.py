"""LoRA with ``train.eval_every`` and ``reference.source`` (the reference in a graph of its own): the held-out
pairs are the training pairs, so the step-0 ``eval/loss`` (the evaluator's forward of the base and of that
reference) equals the loss of training step 1 (the step's forward of the same parameters), and it is not ln 2
(another reference). LoRA SFT runs with ``train.eval_every``: ``tests/test_lora_sft.py``.
"""


import numpy as np
import pytest
from lora_common import COMMON, LN2, metrics

from jaxpref.config import RunConfig, load_config
from jaxpref.models import build_model, hf_io, presets
from jaxpref.testing.models import fast_compile
from jaxpref.training import loop


@pytest.fixture(scope="module", autouse=True)
def _fast():
    with fast_compile():
        yield


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
