"""Shared command-line plumbing for the thin scripts in ``train/`` and ``eval/``."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxpref import compile_cache
from jaxpref.config import ConfigError, RunConfig, load_config


def run_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                epilog="Overrides are dotted keys with YAML values, e.g. optim.lr=1e-5 "
                                       "'loss=[{name: ipo, hparams: {beta: 0.1}}]' mesh.data=-1")
    p.add_argument("--config", help="YAML run config (may start with 'base: other.yaml')")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def parse_run_config(argv, description: str, schema=RunConfig):
    args = run_parser(description).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxpref").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    compile_cache.enable()
    try:
        return load_config(schema, args.config, args.overrides), args
    except ConfigError as err:
        sys.exit(f"config error: {err}")


def fail(err: Exception) -> None:
    """Prints one clear error line and exits non-zero (no traceback for expected errors)."""
    sys.exit(f"error: {err}")


def train_main(argv, description: str, train_fn) -> None:
    """The body of every ``train.*`` script: parse, run ``train_fn(cfg, resume=...)``, print final metrics.

    Expected errors (bad config, data, model spec, checkpoint) print one line and exit non-zero.
    """
    import json

    cfg, args = parse_run_config(argv, description)
    from jaxpref.data.sources import DataError
    from jaxpref.loading import SpecError
    from jaxpref.training.checkpoint import CheckpointError
    from jaxpref.training.loop import RunError

    try:
        summary = train_fn(cfg, resume=args.resume)
    except (RunError, SpecError, DataError, CheckpointError, ConfigError) as err:
        fail(err)
    print(json.dumps(summary["final_metrics"], indent=1))
