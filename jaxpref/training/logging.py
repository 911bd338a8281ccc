"""Run logging: ``metrics.jsonl`` always, TensorBoard and W&B optionally, a progress bar.

Metrics are fetched from the device one step late (:class:`AsyncMetrics`): step ``t``'s
metrics are converted to Python floats only after step ``t + 1`` has been dispatched, so the
host never blocks the accelerator waiting for a scalar.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def _to_float(v) -> float | int:
    v = np.asarray(v)
    if v.dtype.kind in "iub":
        return int(v)
    return float(v)  # NaN / inf are written as JSON NaN / Infinity (Python's json reads them back)


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (+ TensorBoard / W&B).

    Lines are flushed immediately, so a killed run keeps every logged step. On resume, lines
    with ``step`` greater than the resumed step are dropped first (they belong to work that
    was not checkpointed and will be redone).
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, wandb_project: str | None = None,
                 config: dict | None = None, resume_step: int | None = None):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists() and jax.process_index() == 0:
            self._truncate_after(resume_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - declared dependency
                log.warning("tensorboardX is not installed; TensorBoard logging is off")
        self._wandb = None
        if wandb_project and jax.process_index() == 0:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(self.run_dir))
            except ImportError:
                log.warning("wandb is not installed; W&B logging is off (pip install wandb)")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        tmp.replace(self.path)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}
        if jax.process_index() == 0:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
            if self._tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, int | float):
                        self._tb.add_scalar(k, v, step)
            if self._wandb is not None:
                self._wandb.log(record, step=step)
        return record

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class AsyncMetrics:
    """Holds the device metrics of the last step and converts them one step later."""

    def __init__(self):
        self._pending: tuple[int, dict, float] | None = None

    def push(self, step: int, metrics: dict, t_dispatch: float) -> tuple[int, dict, float] | None:
        """Stores this step's metrics; returns the previous step's ``(step, host metrics, seconds)``."""
        prev, self._pending = self._pending, (step, metrics, t_dispatch)
        return self._materialise(prev)

    def flush(self) -> tuple[int, dict, float] | None:
        prev, self._pending = self._pending, None
        return self._materialise(prev)

    @staticmethod
    def _materialise(item):
        if item is None:
            return None
        step, metrics, t0 = item
        host = jax.device_get(metrics)
        return step, host, time.perf_counter() - t0


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    """A tqdm bar on process 0 (disabled elsewhere or when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not enabled or jax.process_index() != 0, unit="step")
