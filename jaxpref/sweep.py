"""Hyperparameter sweeps over a run config: grid x random draws x seeds, run locally or printed.

A sweep file lists only what varies (style R16)::

    name: beta_grid                 # default: the file's stem
    base: ../hh_dpo.yaml            # the run config, relative to this file
    kind: preference                # preference | sft | reward_model (which train.* script)
    overrides: [train.steps=200]    # fixed overrides for every run (optional)
    grid:                           # Cartesian product, keys are dotted config overrides
      loss.0.name: [sigmoid, ipo]
      loss.0.hparams.beta: [0.05, 0.1]
    random:                         # num_random draws, seeded by random_seed (default 0)
      optim.lr: {distribution: log_uniform, low: 1.0e-6, high: 1.0e-4}
      loss.0.weight: {distribution: choice, values: [0.5, 1.0]}
    num_random: 4
    seeds: [0, 1]                   # each becomes train.seed

Runs = grid points x random draws x seeds. Each run is named from its varied values
(``name=ipo,beta=0.1,lr=3.2e-05,seed=0``: the shortest unambiguous suffix of each key) and lives in
``OUT/NAME``. Every run's config is parsed before any starts. :func:`run_local` runs them one after
another in subprocesses (``python -m train.KIND --config BASE --resume overrides...``): a run whose
``summary.json`` exists is skipped, so re-running a sweep resumes it; a failed run is recorded in
``OUT/NAME/sweep_status.json`` (exit status, last stderr lines) and the sweep goes on.
:func:`write_results` joins each run's values with its summary metrics into ``results.csv`` and
``results.md``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pathlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from jaxpref.config import ConfigError, RunConfig, load_config

KINDS = ("preference", "sft", "reward_model")
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
SEED_KEY = "train.seed"
# Top-level keys that mark a YAML file as a sweep (none of them is a RunConfig field).
SWEEP_KEYS = frozenset({"kind", "grid", "random", "num_random", "random_seed", "seeds"})
_ALLOWED_KEYS = SWEEP_KEYS | {"name", "base", "overrides"}
MAX_NAME = 120


@dataclass(frozen=True)
class RandomParam:
    """One randomly drawn value: ``uniform``/``log_uniform`` over [low, high], or a ``choice`` of values."""

    distribution: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    def draw(self, rng: random.Random) -> Any:
        # Only rng.random() is used: Python guarantees its sequence for a seed across versions.
        u = rng.random()
        if self.distribution == "choice":
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        if self.distribution == "uniform":
            x = self.low + u * (self.high - self.low)
        else:
            x = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return float(f"{x:.4g}")  # readable names and overrides; 4 significant digits


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file (module docstring); ``base`` is resolved to an absolute path."""

    path: pathlib.Path
    name: str
    base: pathlib.Path
    kind: str = "preference"
    overrides: tuple[str, ...] = ()
    grid: dict[str, list] = field(default_factory=dict)
    random: dict[str, RandomParam] = field(default_factory=dict)
    num_random: int = 0
    random_seed: int = 0
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep.

    Attributes:
      name: stable name derived from ``values``.
      run_dir: ``OUT/name``.
      values: the varied dotted keys and this run's values, in sweep-file order (seed last).
      overrides: every override passed to the training script (fixed, varied, then ``run_dir``).
    """

    name: str
    run_dir: pathlib.Path
    values: dict[str, Any]
    overrides: tuple[str, ...]


def is_sweep_file(path: str | pathlib.Path) -> bool:
    """Whether a YAML file is a sweep (has a sweep-only top-level key) rather than a run config."""
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    return isinstance(data, dict) and bool(SWEEP_KEYS & set(data))


def load_sweep(path: str | pathlib.Path) -> SweepSpec:
    """Parses and checks a sweep file.

    Raises:
      ConfigError: naming the file and the offending key.
    """
    path = pathlib.Path(path).expanduser().resolve()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read sweep file: {err}") from None

    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {msg}")

    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(data) - _ALLOWED_KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown sweep key (allowed: {sorted(_ALLOWED_KEYS)})")
    if not data.get("base"):
        raise bad("base", "missing: the run config the sweep varies (relative to the sweep file)")
    base = (path.parent / str(data["base"])).resolve()
    if not base.is_file():
        raise bad("base", f"run config {base} not found")
    kind = data.get("kind", "preference")
    if kind not in KINDS:
        raise bad("kind", f"{kind!r}: expected one of {list(KINDS)}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise bad("overrides", "expected a list of 'key=value' strings")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise bad("grid", "expected a mapping {dotted.key: [values...]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise bad(f"grid.{key}", "expected a non-empty list of values")
    rand_spec = data.get("random") or {}
    if not isinstance(rand_spec, dict):
        raise bad("random", "expected a mapping {dotted.key: {distribution: ..., ...}}")
    rand = {k: _random_param(v, lambda msg, k=k: bad(f"random.{k}", msg)) for k, v in rand_spec.items()}
    num_random = data.get("num_random", 1 if rand else 0)
    if not isinstance(num_random, int) or num_random < 0 or (rand and num_random < 1):
        raise bad("num_random", f"{num_random!r}: expected a positive integer")
    if num_random and not rand:
        raise bad("num_random", "given without a 'random' section")
    seeds = data.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise bad("seeds", f"{seeds!r}: expected a list of distinct integers")
    varied = list(grid) + list(rand) + ([SEED_KEY] if seeds else [])
    if len(set(varied)) != len(varied):
        raise bad("grid", "a key is both in 'grid' and 'random' (or is train.seed next to 'seeds')")
    random_seed = data.get("random_seed", 0)
    if not isinstance(random_seed, int):
        raise bad("random_seed", f"{random_seed!r}: expected an integer")
    return SweepSpec(path=path, name=str(data.get("name") or path.stem), base=base, kind=kind,
                     overrides=tuple(overrides), grid=dict(grid), random=rand, num_random=num_random,
                     random_seed=random_seed, seeds=tuple(seeds))


def _random_param(spec, bad) -> RandomParam:
    if not isinstance(spec, dict) or spec.get("distribution") not in DISTRIBUTIONS:
        raise bad(f"expected {{distribution: one of {list(DISTRIBUTIONS)}, ...}}")
    extra = set(spec) - {"distribution", "low", "high", "values"}
    if extra:
        raise bad(f"unknown field(s) {sorted(extra)}")
    dist = spec["distribution"]
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise bad("choice needs a non-empty 'values' list")
        return RandomParam(dist, values=tuple(values))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise bad(f"{dist} needs numeric 'low' and 'high'") from None
    if not low < high or (dist == "log_uniform" and low <= 0):
        raise bad(f"need {'0 < ' if dist == 'log_uniform' else ''}low < high, got low={low}, high={high}")
    return RandomParam(dist, low=low, high=high)


def draws(spec: SweepSpec) -> list[dict[str, Any]]:
    """The ``num_random`` random assignments (deterministic in ``random_seed``); ``[{}]`` if none."""
    if not spec.random:
        return [{}]
    rng = random.Random(spec.random_seed)
    return [{key: p.draw(rng) for key, p in spec.random.items()} for _ in range(spec.num_random)]


def expand(spec: SweepSpec, out_dir: str | pathlib.Path, extra_overrides: Sequence[str] = ()) -> list[SweepRun]:
    """All runs of a sweep: grid product x random draws x seeds, named and placed under ``out_dir``.

    Args:
      spec: the parsed sweep.
      out_dir: the sweep's output directory (each run is ``out_dir/name``).
      extra_overrides: further fixed overrides for every run (e.g. from the command line),
        applied after the sweep file's and before the varied values.
    """
    out_dir = pathlib.Path(out_dir)
    grid_points = [dict(zip(spec.grid, combo, strict=True)) for combo in itertools.product(*spec.grid.values())]
    seeds = [{SEED_KEY: s} for s in spec.seeds] or [{}]
    assignments = [{**g, **d, **s} for g in grid_points for d in draws(spec) for s in seeds]
    names = unique_names(assignments)
    fixed = (*spec.overrides, *extra_overrides)
    return [SweepRun(name=n, run_dir=out_dir / n, values=v,
                     overrides=(*fixed, *(f"{k}={yaml_value(x)}" for k, x in v.items()),
                                f"run_dir={yaml_value(str(out_dir / n))}"))
            for n, v in zip(names, assignments, strict=True)]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares (list indices are skipped)."""
    parts = {k: [p for p in k.split(".") if not p.isdigit()] or [k] for k in keys}
    out = {}
    for k in keys:
        for n in range(1, len(parts[k]) + 1):
            cand = ".".join(parts[k][-n:])
            if all(o == k or ".".join(parts[o][-n:]) != cand for o in keys):
                break
        out[k] = cand
    return out


def format_value(value: Any) -> str:
    """A value as it appears in a run name (filesystem-safe)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int | str):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_") or "_"


def run_name(values: dict[str, Any], shorts: dict[str, str] | None = None) -> str:
    """``short=value`` pairs joined by ``,`` (``run`` when nothing varies); long names end in a hash."""
    shorts = shorts or short_keys(list(values))
    name = ",".join(f"{shorts[k]}={format_value(v)}" for k, v in values.items()) or "run"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}~{digest}"
    return name


def unique_names(assignments: Sequence[dict[str, Any]]) -> list[str]:
    """Run names for a list of assignments; repeats (e.g. equal random draws) get ``~2``, ``~3``."""
    keys = list(dict.fromkeys(k for a in assignments for k in a))
    shorts = short_keys(keys)
    names, seen = [], {}
    for a in assignments:
        name = run_name(a, shorts)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}~{seen[name]}")
    return names


def yaml_value(value: Any) -> str:
    """A value written as the YAML text of a ``key=value`` override (round-trips through yaml.safe_load)."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value and "\n" not in value:
        return value  # unquoted when unambiguous (e.g. "1e-5" stays as typed)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()


def validate(spec: SweepSpec, runs: Sequence[SweepRun]) -> None:
    """Parses every run's config (and loss composition) before anything starts.

    Raises:
      ConfigError: naming the sweep file and the run.
    """
    from jaxpref import losses

    for run in runs:
        try:
            cfg = load_config(RunConfig, spec.base, run.overrides)
            if spec.kind == "preference":
                losses.compose([{"name": t.name, "weight": t.weight, **t.hparams} for t in cfg.loss])
        except (ConfigError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{spec.path}: run {run.name}: {err}") from None


def command(spec: SweepSpec, run: SweepRun, python: str = "python") -> list[str]:
    """The argv that trains one run (``--resume`` continues an interrupted run, else starts it)."""
    base = spec.base
    if base.is_relative_to(pathlib.Path.cwd()):
        base = base.relative_to(pathlib.Path.cwd())  # portable to a cluster checkout of the same repo
    return [python, "-m", f"train.{spec.kind}", "--config", str(base), "--resume", *run.overrides]


# --- local runner -----------------------------------------------------------------------------------------------

STATUS_FILE = "sweep_status.json"
STDERR_TAIL = 20


def is_done(run: SweepRun) -> bool:
    """A run is done once its ``summary.json`` exists (the training loop writes it last)."""
    return (run.run_dir / "summary.json").is_file()


def run_one(spec: SweepSpec, run: SweepRun, *, python: str, timeout_s: float | None = None) -> dict[str, Any]:
    """Trains one run in a subprocess; returns (and writes to ``run_dir/sweep_status.json``) its record.

    stdout and stderr go to ``run_dir/stdout.log`` and ``run_dir/stderr.log``; the record holds the
    exit status and the last stderr lines. A failure is recorded, never raised.
    """
    import subprocess
    import time

    run.run_dir.mkdir(parents=True, exist_ok=True)
    argv = command(spec, run, python)
    t0 = time.perf_counter()
    with open(run.run_dir / "stdout.log", "w") as out, open(run.run_dir / "stderr.log", "w") as err:
        try:
            returncode = subprocess.run(argv, stdout=out, stderr=err, timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    lines = [x for x in (run.run_dir / "stderr.log").read_text(errors="replace").splitlines() if x.strip()]
    status = "ok" if returncode == 0 and is_done(run) else ("timeout" if returncode is None else "failed")
    record = {"name": run.name, "status": status, "returncode": returncode,
              "seconds": round(time.perf_counter() - t0, 3), "command": argv,
              "stderr_tail": [] if status == "ok" else lines[-STDERR_TAIL:]}
    (run.run_dir / STATUS_FILE).write_text(json.dumps(record, indent=2))
    return record


def run_local(spec: SweepSpec, runs: Sequence[SweepRun], *, python: str, timeout_s: float | None = None,
              log=print) -> list[dict[str, Any]]:
    """Runs the sweep's runs one after another, skipping done ones; returns one record per run."""
    records = []
    for i, run in enumerate(runs, 1):
        if is_done(run):
            records.append({"name": run.name, "status": "ok", "skipped": True})
            log(f"[{i}/{len(runs)}] {run.name}: done already, skipped")
            continue
        log(f"[{i}/{len(runs)}] {run.name}: running")
        rec = run_one(spec, run, python=python, timeout_s=timeout_s)
        tail = f" ({rec['stderr_tail'][-1]})" if rec["stderr_tail"] else ""
        log(f"[{i}/{len(runs)}] {run.name}: {rec['status']} in {rec['seconds']:.1f}s{tail}")
        records.append(rec)
    return records


# --- results table ----------------------------------------------------------------------------------------------

# Final-metric columns. ``rewards/accuracies`` is the *reward* accuracy of the DPO family (Chen Remark 2.5);
# TYPO logs the policy's *ranking* accuracy (Chen Def. 2.3) as ``typo/ranking_accuracy`` (jaxpref.losses.typo),
# a different quantity in its own column. Optional columns appear only when some run logged them.
METRICS = ("loss", "rewards/accuracies", "typo/ranking_accuracy", "rewards/margins")
OPTIONAL_METRICS = ("typo/ranking_accuracy",)
SUMMARY_COLUMNS = ("steps", "tokens_per_s", "seconds")


def run_status(run: SweepRun) -> tuple[str, str]:
    """``(status, error)`` of a run from its directory: ok, failed, timeout or pending."""
    if is_done(run):
        return "ok", ""
    status_file = run.run_dir / STATUS_FILE
    if status_file.is_file():
        rec = json.loads(status_file.read_text())
        return rec.get("status", "failed"), (rec.get("stderr_tail") or [""])[-1]
    return "pending", ""


def collect_results(runs: Sequence[SweepRun]) -> list[dict[str, Any]]:
    """One row per run: name, varied values, status, final metrics (:data:`METRICS`) and throughput from
    ``summary.json``."""
    rows = []
    for run in runs:
        status, error = run_status(run)
        row = {"name": run.name, **run.values, "status": status}
        summary = json.loads((run.run_dir / "summary.json").read_text()) if status == "ok" else {}
        final = summary.get("final_metrics") or {}
        row.update({m: final.get(m) for m in METRICS})
        row.update({c: summary.get(c) for c in SUMMARY_COLUMNS})
        row["error"] = error
        rows.append(row)
    unused = [m for m in OPTIONAL_METRICS if all(r[m] is None for r in rows)]
    return [{k: v for k, v in r.items() if k not in unused} for r in rows]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of :func:`collect_results` rows."""
    if not rows:
        return "(no runs)\n"
    cols = list(rows[0])
    esc = lambda s: s.replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(_cell(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``results.csv`` (full precision) and ``results.md``; returns their paths."""
    import csv

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else json.dumps(v) if isinstance(v, list | dict) else v)
                             for k, v in r.items()})
    md_path.write_text(results_markdown(rows))
    return csv_path, md_path
