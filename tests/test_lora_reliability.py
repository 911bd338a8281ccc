"""SIGKILL and ``--resume`` of a LoRA run (the pattern of ``tests/test_reliability.py`` at tiny size): a
``train.preference`` subprocess killed right after its asynchronous step-2 checkpoint write started resumes from
its last committed checkpoint and ends with adapters bitwise equal to an uninterrupted run's. The subprocess sees
the same 8 CPU devices as this process, so the uninterrupted run and the resume run in process and all three share
compiled programs (the session's compilation cache)."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
from conftest import xla_flags
from flax import nnx

from jaxpref import loading
from jaxpref.config import RunConfig, load_config
from jaxpref.training.loop import run_training

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.limit=16", "data.max_length=32", "data.buckets=[32]", "train.batch_size=8", "optim.lr=1e-2",
          "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
          "lora={rank: 4, alpha: 8}", "train.steps=4", "checkpoint.every=1", "checkpoint.keep=4"]


def _adapters(run_dir):
    state = nnx.state(loading.load_model(f"run:{run_dir}").model, nnx.LoRAParam)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_killed_lora_run_resumes_bitwise(tmp_path, shared_data, subprocess_env):
    hh = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    args = [f"data.train={hh}", *COMMON]
    run_training(load_config(RunConfig, None, [f"run_dir={tmp_path / 'full'}", *args]))
    env = {**subprocess_env, "XLA_FLAGS": xla_flags(8), "JAXPREF_FAULT_KILL_AFTER_SAVE_STEP": "2"}
    killed = subprocess.run([sys.executable, "-m", "train.preference", f"run_dir={tmp_path / 'run'}", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    summary = run_training(load_config(RunConfig, None, [f"run_dir={tmp_path / 'run'}", *args]), resume=True)
    assert summary["resumed_from"] in (1, 2) and summary["steps"] == 4
    for a, b in zip(_adapters(tmp_path / "run"), _adapters(tmp_path / "full"), strict=True):
        np.testing.assert_array_equal(a, b)
