"""Load an experiment YAML, apply overrides, run it and record an honest summary.

An experiment file (``configs/experiments/NAME.yaml``)::

    experiment: chen_alignment_gap     # module jaxpref.experiments.<experiment>
    paper: Chen et al. 2024            # optional: the paper, as the summary table names it
    description: one line              # optional
    seeds: [0, 1, 2]
    params: {...}                      # passed to the module's run()
    ci: {seeds: [0, 1], params: {...}} # optional smaller settings used with --ci (merged over the above)

The module's ``run(params, seeds, out_dir, progress)`` returns ``{claim, reproduced, criterion, numbers}``;
the runner adds the resolved settings and the wall time and writes ``summary.json`` next to the module's
``results.json`` and plots.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxpref.config import ConfigError

SUMMARY_KEYS = ("claim", "reproduced", "criterion", "numbers")
DEFAULT_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "experiments"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A resolved experiment: which module, seeds and parameters."""

    name: str
    module: str
    seeds: tuple[int, ...]
    params: dict[str, Any]
    description: str = ""
    source: str = ""
    paper: str = ""



def params_from_dict(cls: type, params: dict[str, Any], name: str):
    """``cls(**params)`` for an experiment's frozen params dataclass: unknown keys raise ``ValueError``
    naming ``name`` and the valid keys; YAML lists become tuples (hashable, as the defaults)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"{name} params: unknown keys {unknown}; valid: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})

def load_experiment(path: str | pathlib.Path, overrides: Sequence[str] = (), *, ci: bool = False,
                    seeds: Sequence[int] | None = None) -> Experiment:
    """Reads ``path``; ``overrides`` are dotted ``params.KEY=VALUE`` (or ``seeds=[..]``) with YAML values."""
    path = pathlib.Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read experiment file ({err})") from err
    if not isinstance(raw, dict) or "experiment" not in raw:
        raise ConfigError(f"{path}: expected a mapping with an 'experiment' key (module name)")
    unknown = set(raw) - {"experiment", "paper", "description", "seeds", "params", "ci"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (allowed: experiment, paper, description, seeds, "
                          "params, ci)")
    conf = OmegaConf.create({"seeds": raw.get("seeds", [0]), "params": raw.get("params") or {}})
    if ci and raw.get("ci"):
        conf = OmegaConf.merge(conf, OmegaConf.create(raw["ci"]))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. params.steps=100)")
        key, value = item.split("=", 1)
        if not (key == "seeds" or key.startswith("params.")):
            raise ConfigError(f"override {item!r}: keys are 'seeds' or 'params.<name>'")
        try:
            OmegaConf.update(conf, key, yaml.safe_load(value), merge=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {err}") from err
    resolved = OmegaConf.to_container(conf, resolve=True)
    seed_list = tuple(int(s) for s in (seeds if seeds is not None else resolved["seeds"]))
    if not seed_list:
        raise ConfigError(f"{path}: at least one seed is needed")
    return Experiment(name=path.stem, module=str(raw["experiment"]), seeds=seed_list, params=resolved["params"],
                      description=str(raw.get("description", "")), source=str(path), paper=str(raw.get("paper", "")))


def run_experiment(exp: Experiment, out_dir: str | pathlib.Path, *, progress: bool = True) -> dict[str, Any]:
    """Runs ``exp`` into ``out_dir`` and returns (and writes) ``summary.json``."""
    try:
        module = importlib.import_module(f"jaxpref.experiments.{exp.module}")
    except ModuleNotFoundError as err:
        raise ConfigError(f"{exp.source}: no experiment module jaxpref.experiments.{exp.module}") from err
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = module.run(dict(exp.params), list(exp.seeds), out, progress=progress)
    missing = [k for k in SUMMARY_KEYS if k not in result]
    if missing:
        raise RuntimeError(f"experiment {exp.module} returned no {missing}")
    summary = {"experiment": exp.module, "name": exp.name, "paper": exp.paper, "description": exp.description,
               "config": exp.source,
               "seeds": list(exp.seeds), "params": exp.params, **result,
               "runtime_s": round(time.perf_counter() - start, 1)}
    write_results(out / "summary.json", summary)
    return summary


def write_results(path: pathlib.Path, obj: dict) -> pathlib.Path:
    """Writes ``obj`` as indented JSON atomically (temp file + rename); NumPy / JAX values become numbers
    and lists. Every experiment writes its ``results.json`` through this."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=json_default) + "\n")
    tmp.replace(path)
    return path


def json_default(x):
    """``json.dumps`` fallback for NumPy scalars / arrays and JAX arrays."""
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


TABLE_HEADER = ("| paper (config) | claim | reproduced | numbers (means over seeds unless named) | seeds | runtime |\n"
                "|---|---|---|---|---|---|\n")
SUMMARY_MD_TITLE = "# Reproductions at the full settings\n\n"


def summary_table(results_dir: str | pathlib.Path, configs_dir: str | pathlib.Path | None = None, *,
                  write: bool = True) -> str:
    """The README's reproduction table, generated from ``results_dir/<config name>/summary.json``.

    One row per experiment file in ``configs_dir`` (default: the repository's ``configs/experiments``), in
    file-name order: the YAML's ``paper`` label and the config name, the summary's claim, verdict, headline
    numbers, seeds and wall time. An experiment without a ``summary.json`` gets a row saying it was not run
    (with its ``description``), so nothing is silently dropped. With ``write`` the table (under a title) is
    also written to ``results_dir/summary.md``. Returns the table (header + rows, newline-terminated).
    """
    results_dir = pathlib.Path(results_dir)
    configs_dir = pathlib.Path(configs_dir) if configs_dir is not None else DEFAULT_CONFIGS_DIR
    rows = []
    for path in sorted(configs_dir.glob("*.yaml")):
        summary_path = results_dir / path.stem / "summary.json"
        if summary_path.is_file():
            rows.append(_table_row(json.loads(summary_path.read_text())))
        else:
            exp = load_experiment(path)
            rows.append(f"| {_cell(exp.paper or exp.module)} (`{exp.name}`) | {_cell(exp.description)} | "
                        f"not run at the full settings | | {len(exp.seeds)} | |")
    table = TABLE_HEADER + "".join(row + "\n" for row in rows)
    if write:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "summary.md").write_text(
            SUMMARY_MD_TITLE + "Generated by `python -m train.reproduce --all --out results/reproductions` "
            "(or `--table` to regenerate this file only) from the `summary.json` files next to it; the README's "
            "table is this one.\n\n" + table)
    return table


README_BEGIN, README_END = "<!-- reproductions:begin -->", "<!-- reproductions:end -->"


def replace_readme_table(readme: str | pathlib.Path, table: str) -> None:
    """Rewrites the part of ``readme`` between :data:`README_BEGIN` and :data:`README_END` with ``table``;
    raises ``ValueError`` unless the file has exactly one pair of markers."""
    path = pathlib.Path(readme)
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{path}: needs exactly one {README_BEGIN} ... {README_END} pair")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    path.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")


def _table_row(s: dict) -> str:
    nums = "; ".join(f"{k} = {_fmt(v)}" for k, v in s["numbers"].items())
    verdict = "yes" if s["reproduced"] else "**no**"
    return (f"| {_cell(s.get('paper') or s['experiment'])} (`{s['name']}`) | {_cell(s['claim'])} | {verdict} | "
            f"{_cell(nums)} | {len(s['seeds'])} | {_duration(s['runtime_s'])} |")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)
