"""A tiny ``train.preference`` LoRA run with stacked layers (``model.scan_layers``), packed pairs and 2
micro-batches: step 0's loss is exactly ln 2 and the loss falls; the checkpoint holds only the
adapters and their optimizer moments and records the base it needs; ``run:`` rebuilds the base and restores the
adapters, and with the adapters off it is the base bitwise; the README command SIGKILLed after an asynchronous
checkpoint write and resumed ends bitwise equal to the uninterrupted run (adapter dropout included: its masks are
keyed by the checkpointed run key and step). The run is the README's LoRA command (``### LoRA and QLoRA``) with
size limits appended."""

import json
import pathlib
import shlex
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import xla_flags
from flax import nnx

from jaxpref import loading
from jaxpref.config import RunConfig, load_config
from jaxpref.models import build_model, lora, presets
from jaxpref.training import adapters as run_adapters
from jaxpref.training.loop import run_training

LN2 = float(np.float32(np.log(2)))
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.limit=8", "data.max_length=32", "data.buckets=[32]", "train.batch_size=8",
          "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
          "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "data.eval_split=0", "train.steps=3",
          "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.async_save=false", "model.scan_layers=true",
          "data.packing=true", "train.micro_batches=2"]
REPO = pathlib.Path(__file__).resolve().parents[1]


def readme_lora_commands() -> list[list[str]]:
    """argv of each line of the ```bash block of the README's LoRA section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### LoRA and QLoRA"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return [argv for raw in block[:block.index("```")].splitlines() if (argv := shlex.split(raw, comments=True))]


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


def cfg_for(run_dir, hh, *extra):
    """The README's LoRA training command, shrunk (its ``--config`` and overrides first, then :data:`COMMON`)."""
    train = readme_lora_commands()[0]
    assert train[:4] == ["python", "-m", "train.preference", "--config"] and "'" not in " ".join(train)
    return load_config(RunConfig, REPO / train[4], [*train[5:], f"run_dir={run_dir}", f"data.train={hh}", *COMMON,
                                                    *extra])


def test_readme_commands_are_the_tested_ones():
    train, merge, adapter = readme_lora_commands()
    assert [c[:3] for c in (merge, adapter)] == [["python", "-m", "train.export_hf"]] * 2
    assert merge[-1] == "--merge" and adapter[-1] == "--adapter"  # as tests/test_lora_export.py runs them
    assert any(a.startswith("lora=") for a in train)
    # with adapter dropout, so the kill-and-resume test below resumes the dropout masks too
    assert load_config(RunConfig, REPO / train[4], train[5:]).lora.dropout > 0


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, hh):
    tmp = tmp_path_factory.mktemp("lora")
    run_training(cfg_for(tmp / "run", hh))
    return tmp


def test_run_checkpoints_adapters_only_and_records_the_base(run):
    m = metrics(run / "run")
    assert m[0]["loss"] == LN2 and m[-1]["loss"] < m[0]["loss"]
    record = json.loads((run / "run" / "model.json").read_text())["lora"]
    assert record["base"]["source"] == "preset:tiny_llama" and record["base"]["overrides"]["vocab_size"] == 512
    assert set(record["adapters"]) == {f"layers.{m}" for m in ("attn.query_dnh", "attn.key_dkh", "attn.value_dkh",
                                                               "attn.out_nhd", "mlp.gate_df", "mlp.up_df",
                                                               "mlp.down_fd")}
    assert {(a["rank"], a["scale"]) for a in record["adapters"].values()} == {(16, 2.0)}  # README: rank 16, alpha 32
    step_dir = run / "run" / "checkpoints" / "3"
    for item in ("params", "train"):
        tree = ocp.StandardCheckpointHandler().metadata(step_dir / item).tree
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = [str(getattr(k, "key", k)) for k in path]
            if item == "params" or keys[0] == "opt_state" and len(getattr(leaf, "shape", ())) > 0:
                # every saved parameter is an adapter, every optimizer array an adapter's Adam moment
                assert any(k.endswith(("_lora_a", "_lora_b")) for k in keys), (item, keys)
    # the run: spec rebuilds the base and restores the adapters; adapters off = the base itself
    policy = loading.load_model(f"run:{run / 'run'}").model
    assert lora.has_adapters(policy)
    base = build_model(presets.tiny_llama(vocab_size=512, scan_layers=True))
    off = nnx.merge(run_adapters._graph_without_adapters(policy), *nnx.split(policy, nnx.LoRAParam, nnx.Param, ...)[2:])
    for a, b in zip(jax.tree.leaves(nnx.state(off, nnx.Param)), jax.tree.leaves(nnx.state(base, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_readme_command_killed_and_resumed_is_bitwise(run, hh, subprocess_env):
    """The README command itself as a subprocess (8 CPU devices, as here), SIGKILLed right after its asynchronous
    step-2 checkpoint write started, then ``--resume``: adapters bitwise equal to the uninterrupted run's (the
    pattern of ``tests/test_reliability.py``)."""
    train = readme_lora_commands()[0]
    env = {**subprocess_env, "XLA_FLAGS": xla_flags(8), "JAXPREF_FAULT_KILL_AFTER_SAVE_STEP": "2"}
    killed = subprocess.run([sys.executable, *train[1:], f"run_dir={run / 'killed'}", f"data.train={hh}", *COMMON,
                             "checkpoint.async_save=true"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    summary = run_training(cfg_for(run / "killed", hh), resume=True)
    assert summary["resumed_from"] in (1, 2) and summary["steps"] == 3
    got = nnx.state(loading.load_model(f"run:{run / 'killed'}").model, nnx.LoRAParam)
    want = nnx.state(loading.load_model(f"run:{run / 'run'}").model, nnx.LoRAParam)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
