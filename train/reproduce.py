"""Run reproductions of the seed papers' claims.

    python -m train.reproduce configs/experiments/chen_alignment_gap.yaml --out results/chen [params.steps=200]
    python -m train.reproduce --all --out results/reproductions [--ci]
    python -m train.reproduce --table --out results/reproductions [--readme README.md]  # only the table

Each experiment writes ``results.json``, PNG plots and ``summary.json`` (claim, reproduced, criterion,
numbers, runtime) into its output folder; ``--all`` also writes ``summary.md`` there, the table that the
README shows (:func:`jaxpref.experiments.runner.summary_table`; one row per experiment file, "not run" for
one without results). ``--ci`` uses each file's smaller ``ci:`` settings.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs" / "experiments"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="experiment YAML (configs/experiments/NAME.yaml)")
    p.add_argument("overrides", nargs="*", help="params.KEY=VALUE or seeds=[...]")
    p.add_argument("--all", action="store_true", help="every file in configs/experiments/")
    p.add_argument("--table", action="store_true",
                   help="run nothing; regenerate OUT/summary.md from OUT/<name>/summary.json")
    p.add_argument("--readme", default=None,
                   help="with --table: also replace the table between the reproductions markers of this file")
    p.add_argument("--out", required=True, help="output folder (one subfolder per experiment with --all)")
    p.add_argument("--ci", action="store_true", help="use the files' smaller ci: settings")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from jaxpref.cli import expected_errors, fail
    from jaxpref.config import ConfigError
    from jaxpref.experiments import runner

    if args.table:
        if args.all or args.config:
            p.error("--table runs nothing: give only --out")
        table = runner.summary_table(args.out)
        if args.readme:
            try:
                runner.replace_readme_table(args.readme, table)
            except (OSError, ValueError) as err:
                sys.exit(f"--readme: {err}")
        print(table, end="")
        return []
    if args.all == bool(args.config):
        p.error("give one experiment file or --all")
    paths = sorted(EXPERIMENTS_DIR.glob("*.yaml")) if args.all else [pathlib.Path(args.config)]
    out = pathlib.Path(args.out)
    summaries = []
    try:
        for path in paths:
            exp = runner.load_experiment(path, args.overrides, ci=args.ci, seeds=args.seeds)
            dest = out / exp.name if args.all else out
            s = runner.run_experiment(exp, dest, progress=not args.no_progress)
            print(f"{exp.name}: reproduced={s['reproduced']} ({s['criterion']}) in {s['runtime_s']:.0f} s")
            summaries.append(s)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    except expected_errors() as err:
        fail(err)
    if args.all:
        runner.summary_table(out)
    return summaries


if __name__ == "__main__":
    main()
