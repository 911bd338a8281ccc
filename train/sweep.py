"""Hyperparameter sweeps: expand a sweep file into runs, then run them locally or print their commands.

    python -m train.sweep --sweep configs/sweeps/beta_grid.yaml --dry-run        # list the runs
    python -m train.sweep --sweep configs/sweeps/beta_grid.yaml --print-commands # one line per run
    python -m train.sweep --sweep configs/sweeps/beta_grid.yaml [--out DIR] [key=value ...]
    python -m train.sweep --sweep configs/sweeps/beta_grid.yaml --collect        # tables only

Every run's config is parsed before any run starts. Local mode runs them one after another, skips
runs that already have ``summary.json`` (re-running resumes the sweep), records failures without
stopping, writes ``results.csv`` and ``results.md`` into the output directory (default
``runs/sweeps/NAME``) and exits non-zero if any run failed. The file format is in :mod:`jaxpref.sweep`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import pathlib
import shlex
import sys

from jaxpref import sweep
from jaxpref.config import ConfigError


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Expand and run a hyperparameter sweep.")
    p.add_argument("--sweep", required=True, help="sweep YAML (see jaxpref/sweep.py)")
    p.add_argument("--out", default=None, help="output directory (default runs/sweeps/NAME)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    mode.add_argument("--print-commands", action="store_true", help="print one shell command per run and exit")
    mode.add_argument("--collect", action="store_true", help="only write results.csv / results.md")
    p.add_argument("--timeout", type=float, default=None, help="per-run time limit in seconds (local mode)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_args(argv)

    try:
        spec = sweep.load_sweep(args.sweep)
        out = pathlib.Path(args.out or f"runs/sweeps/{spec.name}")
        runs = sweep.expand(spec, out, args.overrides)
        sweep.validate(spec, runs)
    except ConfigError as err:
        sys.exit(f"config error: {err}")

    if args.print_commands:
        for run in runs:
            print(shlex.join(sweep.command(spec, run)))
        return
    n_grid = math.prod(len(v) for v in spec.grid.values())
    print(f"{spec.name}: {len(runs)} runs ({n_grid} grid points x {max(spec.num_random, 1)} draws x "
          f"{max(len(spec.seeds), 1)} seeds) in {out}", file=sys.stderr)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}\t{sweep.run_status(run)[0]}\t{' '.join(map(shlex.quote, run.overrides))}")
        return
    if not args.collect:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2, default=str))
        sweep.run_local(spec, runs, python=sys.executable, timeout_s=args.timeout,
                        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = sweep.collect_results(runs)
    csv_path, md_path = sweep.write_results(rows, out)
    print(sweep.results_markdown(rows))
    counts = collections.Counter(r["status"] for r in rows)
    print(f"results: {csv_path}, {md_path}; " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
          file=sys.stderr)
    failed = [r["name"] for r in rows if r["status"] not in ("ok", "pending")]
    if failed and not args.collect:
        sys.exit(1)


if __name__ == "__main__":
    main()
