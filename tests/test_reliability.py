"""Faults during training: repeated SIGKILLs (also during an async checkpoint write) resume from
the last committed checkpoint and end bitwise equal to an uninterrupted run, also with TR-DPO
reference syncing; disk-full and unwritable directories give clear errors and keep the last good
checkpoint; the NaN guard; and bitwise determinism of two identical runs on CPU.

The training subprocesses run on one CPU device and share the session's compilation cache
(``subprocess_env``), so only the first of these identical tiny runs compiles."""

import errno
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref import loading
from jaxpref.config import RunConfig, load_config
from jaxpref.training import checkpoint as ckpt
from jaxpref.training.loop import RunError, run_training

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.limit=24", "data.max_length=128", "data.buckets=[128]", "train.batch_size=8",
          "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256"]
TIMING = {"tokens_per_s", "data_wait_s"}


def _cli(run_dir, hh, base_env, *extra, env=None, resume=False):
    cmd = [sys.executable, "-m", "train.preference", f"run_dir={run_dir}", f"data.train={hh}", *COMMON,
           "train.steps=7", "checkpoint.every=2", "checkpoint.keep=3", "optim.lr=1e-3", *extra]
    cmd += ["--resume"] if resume else []
    return subprocess.run(cmd, cwd=REPO, env={**base_env, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def _resumed_at(out) -> int | None:
    m = re.search(r"resumed .* at step (\d+)", out.stderr)
    return int(m.group(1)) if m else None


def _params(run_dir):
    model = loading.load_model(f"run:{run_dir}").model
    return [np.asarray(x) for x in jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1])]


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, hh, subprocess_env):
    run = tmp_path_factory.mktemp("rel") / "full"
    out = _cli(run, hh, subprocess_env)
    assert out.returncode == 0, out.stderr[-2000:]
    return run


@pytest.mark.slow
def test_repeated_kills_resume_from_committed_checkpoints(tmp_path, hh, uninterrupted, subprocess_env):
    run = tmp_path / "killed"
    faults = [  # (fault, extra overrides)
        ({"JAXPREF_FAULT_KILL_AFTER_SAVE_STEP": "2"}, ()),  # during the async write of step 2
        ({"JAXPREF_FAULT_KILL_AT_STEP": "5"}, ("checkpoint.async_save=false",)),  # mid-run; sync: step 4 committed
        ({"JAXPREF_FAULT_KILL_AFTER_SAVE_STEP": "6"}, ()),  # during the async write of step 6
    ]
    resumed_at = []
    for i, (env, extra) in enumerate(faults):
        out = _cli(run, hh, subprocess_env, *extra, env=env, resume=i > 0)
        assert out.returncode == -9, out.stderr[-2000:]
        resumed_at.append(_resumed_at(out) or 0)
    final = _cli(run, hh, subprocess_env, resume=True)
    assert final.returncode == 0, final.stderr[-2000:]
    # Each resume started from a committed checkpoint at or before the previous kill point (an
    # async write still in flight at the kill is discarded, never used half-written).
    assert resumed_at[0] == 0 and resumed_at[1] in (0, 2) and resumed_at[2] == 4  # sync save of 4 before the kill
    assert _resumed_at(final) in (4, 6)
    for a, b in zip(_params(uninterrupted), _params(run)):
        np.testing.assert_array_equal(a, b)
    assert _metrics(run) == _metrics(uninterrupted)


@pytest.mark.slow
def test_kill_and_resume_with_reference_sync_is_bitwise_equal(tmp_path, hh, uninterrupted, subprocess_env):
    """TR-DPO (reference.sync_every=3): the reference synced after step 3 is checkpointed with step 4;
    a run killed before step 5 resumes at step 4 with that reference, not the initial one, and ends
    bitwise equal to the uninterrupted run."""
    sync = ("reference.sync_every=3", "reference.sync_alpha=0.5", "train.steps=5")
    full = tmp_path / "sync_full"
    out = _cli(full, hh, subprocess_env, *sync)
    assert out.returncode == 0, out.stderr[-2000:]
    # The sync happened: steps 1-3 match the run without syncing, step 4 (new reference) does not.
    plain, synced = _metrics(uninterrupted), _metrics(full)
    assert synced[:3] == plain[:3] and synced[3]["loss"] != plain[3]["loss"]
    killed = tmp_path / "sync_killed"
    out = _cli(killed, hh, subprocess_env, *sync, "checkpoint.async_save=false",
               env={"JAXPREF_FAULT_KILL_AT_STEP": "5"})  # sync saves: step 4 is committed at the kill
    assert out.returncode == -9, out.stderr[-2000:]
    assert (killed / "checkpoints" / "4" / ckpt.REFERENCE_ITEM).is_dir()
    final = _cli(killed, hh, subprocess_env, *sync, resume=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _resumed_at(final) == 4 and "restored the synced reference of step 4" in final.stderr
    assert _metrics(killed) == synced  # every metric, every step, bitwise
    for a, b in zip(_params(full), _params(killed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_two_identical_runs_are_bitwise_equal(tmp_path, hh, uninterrupted, subprocess_env):
    again = tmp_path / "again"
    out = _cli(again, hh, subprocess_env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _metrics(again) == _metrics(uninterrupted)  # every metric, every step, bitwise
    for a, b in zip(_params(uninterrupted), _params(again)):
        np.testing.assert_array_equal(a, b)


def test_disk_full_gives_clear_error_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import optax

    from jaxpref.training.step import init_state

    tree = init_state({"w": jax.numpy.arange(4.0)}, optax.sgd(0.1), 0)
    c = ckpt.RunCheckpointer(tmp_path / "ck", every=1, async_save=False)
    assert c.save(1, tree, {"step": 1})
    c.wait()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(c._mngr, "save", full)
    with pytest.raises(ckpt.CheckpointError, match=r"disk is full.*last good checkpoint is step 1"):
        c.save(2, tree, {"step": 2})
    assert c.latest_step() == 1


def test_unwritable_run_directory_is_a_clear_error(tmp_path, hh):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = load_config(RunConfig, None, [f"run_dir={blocker / 'run'}", f"data.train={hh}", *COMMON])
    with pytest.raises(RunError, match="not writable"):
        run_training(cfg)
    with pytest.raises(ckpt.CheckpointError, match="not writable"):
        ckpt.RunCheckpointer(blocker / "ck")


def test_impossible_mesh_and_vocab_mismatch_fail_before_training(tmp_path, hh):
    bad_mesh = load_config(RunConfig, None, [f"run_dir={tmp_path / 'm'}", f"data.train={hh}", *COMMON,
                                             "mesh.data=3"])
    with pytest.raises(RunError, match="devices"):
        run_training(bad_mesh)
    assert not (tmp_path / "m").exists()
    small_vocab = load_config(RunConfig, None, [f"run_dir={tmp_path / 'v'}", f"data.train={hh}", *COMMON,
                                                "model.overrides={vocab_size: 64}"])
    with pytest.raises(loading.SpecError, match="vocab_size is 64"):
        run_training(small_vocab)
    assert not (tmp_path / "v").exists()  # failed before creating the run (or compiling anything)


def test_checkpoint_from_a_different_model_is_rejected(tmp_path, hh, uninterrupted):
    import shutil

    run = tmp_path / "other"
    shutil.copytree(uninterrupted, run)
    cfg = load_config(RunConfig, None, [f"run_dir={run}", f"data.train={hh}", *COMMON, "train.steps=9",
                                        "model.overrides={vocab_size: 512, hidden_size: 48, head_dim: 12}"])
    before = (run / "config.yaml").read_text()
    with pytest.raises(loading.SpecError, match=r"does not match the configured model \(hidden_size: checkpoint 32"):
        run_training(cfg, resume=True)
    assert (run / "config.yaml").read_text() == before  # failed before touching the run (or compiling)
    # A checkpoint whose shapes differ even though model.json was lost is still caught, by Orbax's restore.
    (run / "model.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        run_training(cfg, resume=True)


def test_nan_guard_skip_and_stop(tmp_path, hh):
    boom = ["optim.name=sgd", "optim.lr=1e12", "optim.clip_norm=null", "train.steps=4", "checkpoint.every=0"]
    summary = run_training(load_config(RunConfig, None, [f"run_dir={tmp_path / 'skip'}", f"data.train={hh}",
                                                         *COMMON, *boom]))
    rows = _metrics(tmp_path / "skip")
    assert summary["skipped_updates"] >= 1 and sum(r["nonfinite"] for r in rows) == summary["skipped_updates"]
    with pytest.raises(RunError, match=r"non-finite loss or gradient at step \d+ \(batch rows") as err:
        run_training(load_config(RunConfig, None, [f"run_dir={tmp_path / 'stop'}", f"data.train={hh}", *COMMON,
                                                   *boom, "train.nan_policy=stop"]))
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    report = json.loads((tmp_path / "stop" / f"nonfinite_step{step}.json").read_text())
    assert len(report["source_rows"]) == 8 and report["step"] == step
