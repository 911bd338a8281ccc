"""Held-out rows: a seeded, disjoint evaluation split of the training file, recorded in the run directory.

``data.eval_split: f`` (``0 < f < 1``) holds out ``max(1, round(f · N))`` of the ``N`` normalised
records (after ``data.limit``): the first ones of the permutation ``default_rng([seed, SALT])`` of
their positions, where ``seed`` is ``data.split_seed`` (default ``train.seed``). The training run
sees the other records only. The held-out source rows (``row``: the 0-based position in the file,
and the record ``id``) are written to ``RUN_DIR/eval_split.json``; a resumed run reads them back
instead of recomputing, and refuses a config whose source, fraction, seed or limit differ.

Evaluation scripts read the held-out rows of a run as ``--data heldout:RUN_DIR``
(:func:`heldout_source`): the run's ``data.eval`` file when it set one, else the recorded rows of
its ``data.train``, read with the run's format, field names, split and limit.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpref.data.sources import DataError

SPLIT_FILE = "eval_split.json"
SALT = 0x5E1D  # separates the split's stream from the epoch permutations, which use [seed, epoch]
PREFIX = "heldout:"


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """Which records are held out (``rows``/``ids`` ascending by row) and how they were chosen.

    Attributes:
      source: the train file.
      fraction: ``data.eval_split``.
      seed: the split seed.
      limit: ``data.limit`` the split was drawn after (None = all records).
      n_records: records the split was drawn from.
      rows: [n_eval] source rows of the held-out records.
      ids: their record ids.
    """

    source: str
    fraction: float
    seed: int
    limit: int | None
    n_records: int
    rows: tuple[int, ...]
    ids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows": list(self.rows), "ids": list(self.ids),
                "n_eval": len(self.rows), "n_train": self.n_records - len(self.rows)}


def n_held_out(n: int, fraction: float) -> int:
    """``max(1, round(fraction · n))`` held-out records of ``n``; DataError when no training record is left."""
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise DataError(f"data.eval_split={fraction} of {n} records leaves no training records")
    return k


def draw_split(records: Sequence[Any], fraction: float, seed: int, *, source: str = "",
               limit: int | None = None) -> EvalSplit:
    """The seeded hold-out of ``records`` (objects with ``row`` and ``id``), see the module docstring."""
    n = len(records)
    k = n_held_out(n, fraction)
    picked = np.sort(np.random.default_rng([int(seed), SALT]).permutation(n)[:k])
    return EvalSplit(source=str(source), fraction=float(fraction), seed=int(seed), limit=limit, n_records=n,
                     rows=tuple(int(records[i].row) for i in picked), ids=tuple(str(records[i].id) for i in picked))


def apply_split(records: Sequence[Any], split: EvalSplit) -> tuple[list, list]:
    """``(train records, held-out records)`` of ``records`` by the split's source rows."""
    held = set(split.rows)
    present = {int(r.row) for r in records}
    missing = sorted(held - present)
    if missing:
        raise DataError(f"{split.source}: held-out rows {missing[:5]} of the recorded split are not among the "
                        f"{len(records)} records read now (the file changed?)")
    return [r for r in records if int(r.row) not in held], [r for r in records if int(r.row) in held]


def write_split(path: str | pathlib.Path, split: EvalSplit) -> None:
    path = pathlib.Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(split.to_json(), indent=1))
    tmp.replace(path)


def read_split(path: str | pathlib.Path) -> EvalSplit:
    path = pathlib.Path(path)
    try:
        obj = json.loads(path.read_text())
        return EvalSplit(source=obj["source"], fraction=float(obj["fraction"]), seed=int(obj["seed"]),
                         limit=obj.get("limit"), n_records=int(obj["n_records"]),
                         rows=tuple(int(r) for r in obj["rows"]), ids=tuple(str(i) for i in obj["ids"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a readable eval split ({err})") from None


def hold_out(records: Sequence[Any], *, fraction: float, seed: int, source: str, limit: int | None,
             run_dir: str | pathlib.Path, resume: bool, write: bool = True) -> tuple[list, list, EvalSplit]:
    """``(train, held out, split)``: the recorded split on ``resume`` (checked against the config), else a
    fresh :func:`draw_split` written to ``run_dir/eval_split.json`` (when ``write``: process 0)."""
    path = pathlib.Path(run_dir) / SPLIT_FILE
    if resume and path.is_file():
        split = read_split(path)
        now = {"source": str(source), "fraction": float(fraction), "seed": int(seed), "limit": limit}
        saved = {k: getattr(split, k) for k in now}
        if now != saved:
            diff = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if now[k] != saved[k])
            raise DataError(f"resume of {path.parent}: the held-out split was drawn with other settings ({diff}); "
                            "resume with the run's own data settings")
    else:
        split = draw_split(records, fraction, seed, source=source, limit=limit)
        if write:
            write_split(path, split)
    train, held = apply_split(records, split)
    return train, held, split


def is_heldout_spec(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def heldout_source(spec: str):
    """``(records, rejects, source description, run config)`` of ``heldout:RUN_DIR`` (module docstring).

    Raises:
      DataError: no such run, or a run with neither ``data.eval`` nor ``data.eval_split``.
    """
    from jaxpref.config import ConfigError, RunConfig, load_config
    from jaxpref.data import formats as data_formats

    run = pathlib.Path(spec[len(PREFIX):]).expanduser().resolve()
    if not (run / "config.yaml").is_file():
        raise DataError(f"{spec}: {run} is not a jaxpref run directory (no config.yaml)")
    try:
        cfg = load_config(RunConfig, run / "config.yaml")
    except ConfigError as err:
        raise DataError(f"{spec}: {err}") from None
    d = cfg.data
    fmt = data_formats.format_config(None if d.format == "auto" else d.format, fields=d.fields or None)
    if d.eval:
        data = data_formats.load_preferences(d.eval, fmt, split=d.split)
        return data.records, data.rejects, str(d.eval), cfg
    if not (run / SPLIT_FILE).is_file():
        raise DataError(f"{spec}: the run held out no rows (it set neither data.eval nor data.eval_split)")
    split = read_split(run / SPLIT_FILE)
    data = data_formats.load_preferences(d.train, fmt, split=d.split)
    records = data.records[: d.limit] if d.limit else data.records
    _, held = apply_split(records, split)
    return held, data.rejects, f"{d.train} (held-out rows of {run})", cfg
