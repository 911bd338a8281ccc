"""Orbax checkpoints of a run: train state + JSON metadata, atomic, async, keep-N.

A checkpoint step directory holds ``state/`` (params, optimizer state, step, RNG, loss state:
sharded arrays written by Orbax) and ``meta/`` (JSON: data-iterator state, resolved config,
model config, tokenizer source, wall-clock). Orbax writes each step into a temporary directory
and renames it on commit, so a run killed mid-write leaves only complete checkpoints behind;
:meth:`RunCheckpointer.latest_step` only ever returns committed steps. Restoring targets the
shardings of a freshly built state, so a run may resume on a different mesh.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (names the directory and the cause)."""


def _abstract(tree):
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


class RunCheckpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for a run directory's ``checkpoints/``.

    Args:
      directory: the checkpoints directory (created if missing).
      every: save cadence in steps (0 = only explicit ``force`` saves).
      keep: number of checkpoints to keep.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int = 100, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(directory).expanduser().resolve()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable: {err.strerror}") from None
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves ``state`` and ``meta`` at ``step`` if due (or ``force``). Returns whether it saved."""
        if not (force or self.should_save(step)):
            return False
        if step in self.all_steps():
            return False
        try:
            self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        except OSError as err:
            raise self._disk_error(err, step) from None
        return True

    def _disk_error(self, err: OSError, step: int) -> CheckpointError:
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        last = self.latest_step()
        return CheckpointError(f"could not write checkpoint step {step} to {self.directory}: {reason}; "
                               f"the last good checkpoint is step {last}")

    def wait(self) -> None:
        """Blocks until background writes are committed (raises CheckpointError on failure)."""
        try:
            self._mngr.wait_until_finished()
        except OSError as err:
            raise self._disk_error(err, -1) from None

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def restore(self, template_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores ``(state, meta, step)`` into the structure and shardings of ``template_state``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(template_state)), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this run's model/"
                                  f"optimizer state: {str(err).splitlines()[0]}") from None
        return out.state, dict(out.meta), step

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore_params_only(directory: str | os.PathLike, template_params: Any, step: int | None = None):
    """Reads only the policy params of a run checkpoint (for eval / export): ``(params, meta, step)``."""
    mngr = ocp.CheckpointManager(pathlib.Path(directory).expanduser().resolve(),
                                 options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no committed checkpoint in {directory}")
    meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    ckptr = ocp.StandardCheckpointer()
    state_dir = pathlib.Path(directory).expanduser().resolve() / str(step) / "state"
    full = ckptr.metadata(state_dir)
    del full
    restored = ckptr.restore(state_dir, {"params": _abstract(template_params)} if False else None)
    params = restored["params"]
    mngr.close()
    return params, meta, step
