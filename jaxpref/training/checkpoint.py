"""Orbax checkpoints of a run: train state + JSON metadata, atomic, async, keep-N.

A checkpoint step directory holds ``params/`` (the policy), ``train/`` (optimizer state, step,
RNG, loss state: sharded arrays written by Orbax), ``meta/`` (JSON: data-iterator state, resolved
config, model config, tokenizer source, wall-clock) and, in TR-DPO runs (``reference.sync_every``),
``reference/`` (the synced reference params, so a resumed run continues with them). Orbax
writes each step into a temporary directory and renames it on commit, so a run killed mid-write
leaves only complete checkpoints behind; :meth:`RunCheckpointer.latest_step` only ever returns
committed steps. Restoring targets the shardings of a freshly built state, so a run may resume on
a different mesh, and its layer layout: a checkpoint written with ``model.scan_layers`` (parameters
and optimizer moments stacked on a leading ``layers`` axis) restores into an unrolled model and vice
versa, read in the saved layout and converted (:mod:`jaxpref.models.layer_stack`).
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxpref.models import layer_stack

log = logging.getLogger(__name__)

REFERENCE_ITEM = "reference"  # the synced reference params of a TR-DPO run (reference.sync_every)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (names the directory and the cause)."""


def _abstract(tree):
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def saved_layer_layout(step_dir: pathlib.Path, item: str) -> str | None:
    """``"stacked"`` / ``"unrolled"`` layers of the Orbax item ``step_dir/item`` (None: no layers, or unreadable)."""
    try:
        return layer_stack.layer_layout(ocp.StandardCheckpointHandler().metadata(step_dir / item))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _restore_in_saved_layout(step_dir: pathlib.Path, targets: dict[str, Any], restore):
    """``restore({item: abstract target})`` with every target in the layer layout its item was saved in,
    then each result converted back to its target's layout and placed with the target's shardings."""
    read_as, converted = {}, []
    for item, target in targets.items():
        want, saved = layer_stack.layer_layout(target), saved_layer_layout(step_dir, item)
        if want and saved and want != saved:
            log.info("checkpoint %s/%s has %s layers; converting to %s", step_dir, item, saved, want)
            read_as[item] = layer_stack.to_layout(target, saved)
            converted.append(item)
        else:
            read_as[item] = target
    out = restore(read_as)
    fixed = {}
    for item in converted:
        tree = layer_stack.to_layout(out[item], layer_stack.layer_layout(targets[item]))
        fixed[item] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding) if t.sharding is not None else x,
                                   tree, targets[item])
    return out, fixed


class RunCheckpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for a run directory's ``checkpoints/``.

    Args:
      directory: the checkpoints directory (created if missing).
      every: save cadence in steps (0 = only explicit ``force`` saves).
      keep: number of checkpoints to keep (the last ones).
      async_save: write in a background thread.
      keep_best: the run keeps a best checkpoint (``checkpoint.keep_best``) beside the last ``keep``: Orbax
        then keeps every step and :meth:`prune` deletes the others.
    """

    def __init__(self, directory: str | os.PathLike, *, every: int = 100, keep: int = 2, async_save: bool = True,
                 keep_best: bool = False):
        self.directory = pathlib.Path(directory).expanduser().resolve()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable: {err.strerror}") from None
        self.every, self.keep, self.keep_best = every, keep, keep_best
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep_best else keep, save_interval_steps=1, enable_async_checkpointing=async_save,
            create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False, reference: Any = None) -> bool:
        """Saves ``state`` and ``meta`` at ``step`` if due (or ``force``). Returns whether it saved.

        The policy params are a separate item (``params/``) so evaluation can read them without
        knowing the optimizer; the rest of the state is ``train/``. ``reference``: the (synced)
        reference params of a TR-DPO run, saved as the item ``reference/`` (None: no such item).
        """
        if not (force or self.should_save(step)):
            return False
        if step in self.all_steps():
            return False
        items = {"params": ocp.args.StandardSave(state.params),
                 "train": ocp.args.StandardSave(state.replace(params=None)), "meta": ocp.args.JsonSave(meta)}
        if reference is not None:
            items[REFERENCE_ITEM] = ocp.args.StandardSave(reference)
        args = ocp.args.Composite(**items)
        try:
            self._mngr.save(step, args=args, force=True)
        except OSError as err:
            raise self._disk_error(err, step) from None
        return True

    def prune(self, best: int | None) -> list[int]:
        """With ``keep_best``: deletes every committed step but the last ``keep`` and ``best``; returns them."""
        if not self.keep_best:
            return []
        steps = self.all_steps()
        protect = set(steps[-self.keep:] if self.keep > 0 else steps) | ({best} if best is not None else set())
        drop = [s for s in steps if s not in protect]
        if drop:
            self.wait()  # never delete while a write is in flight
            for s in drop:
                self._mngr.delete(s)
        return drop

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
        targets = {"params": _abstract(template_state.params), "train": _abstract(template_state.replace(params=None))}

        def restore(read_as):
            args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in read_as.items()},
                                      meta=ocp.args.JsonRestore())
            return self._mngr.restore(step, args=args)

        try:
            out, fixed = _restore_in_saved_layout(self._mngr.directory / str(step), targets, restore)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match this run's model/"
                                  f"optimizer state: {str(err).splitlines()[0]}") from None
        params, train = fixed.get("params", out.params), fixed.get("train", out.train)
        return train.replace(params=params), dict(out.meta), step

    def has_reference(self, step: int) -> bool:
        """Whether checkpoint ``step`` holds a ``reference/`` item (TR-DPO runs)."""
        return (self._mngr.directory / str(step) / REFERENCE_ITEM).is_dir()

    def restore_reference(self, template: Any, step: int) -> Any:
        """The reference params saved at ``step`` (:meth:`save` with ``reference=``), into the structure
        and shardings of ``template`` (e.g. the initial reference)."""
        if not self.has_reference(step):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds no reference params "
                                  "(it was written with reference.sync_every=0 or by an older jaxpref)")
        def restore(read_as):
            return self._mngr.restore(step, args=ocp.args.Composite(
                **{k: ocp.args.StandardRestore(v) for k, v in read_as.items()}))

        try:
            out, fixed = _restore_in_saved_layout(self._mngr.directory / str(step),
                                                  {REFERENCE_ITEM: _abstract(template)}, restore)
            return fixed.get(REFERENCE_ITEM, out[REFERENCE_ITEM])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"reference params of checkpoint step {step} in {self.directory} do not match "
                                  f"this run's reference model: {str(err).splitlines()[0]}") from None

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {self.directory}")
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore_params(directory: str | os.PathLike, template_params: Any, step: int | None = None):
    """Reads only the policy params of a run checkpoint (eval / export): ``(params, step)``, in the layer
    layout of ``template_params`` whatever the layout they were saved in."""
    directory = pathlib.Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise CheckpointError(f"no committed checkpoint {'' if step is None else step} in {directory} "
                                  f"(available: {sorted(mngr.all_steps())})")
        def restore(read_as):
            return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(read_as["params"])))

        try:
            out, fixed = _restore_in_saved_layout(mngr.directory / str(step), {"params": _abstract(template_params)},
                                                  restore)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint step {step} in {directory} does not match the model: "
                                  f"{str(err).splitlines()[0]}") from None
        return fixed.get("params", out.params), step
    finally:
        mngr.close()
