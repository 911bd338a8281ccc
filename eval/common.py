"""Argument plumbing shared by the ``eval.*`` scripts (kept out of the library on purpose)."""

from __future__ import annotations

import argparse

from jaxpref.data.tokenize import TokenizeConfig


def add_data_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--data`` (local file or hub id) and how it is read and tokenised."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="preference pairs: local json/jsonl(.gz)/parquet, hub id, or "
                                                     "heldout:RUN_DIR (the rows a training run held out)")
    g.add_argument("--format", default="auto", help="auto, explicit, hh, messages, votes, llmfao, pandalm, "
                                                    "multi, ultrafeedback, completions, ratings (n > 2 responses)")
    g.add_argument("--split", default=None, help="hub split (default train)")
    g.add_argument("--limit", type=int, default=None, help="first N pairs only")
    g.add_argument("--max-length", type=int, default=512, help="max prompt+response tokens (prompt cut on the left)")
    g.add_argument("--max-prompt-length", type=int, default=None)
    g.add_argument("--no-chat-template", action="store_true", help="plain prompt+response concatenation")
    g.add_argument("--no-eos", action="store_true", help="do not append EOS to responses (fixed-length data, "
                                                         "e.g. the exact-oracle testbed, whose tokenizer has none)")
    g.add_argument("--batch-size", type=int, default=8, help="pairs per forward (2x sequences)")


def add_model_args(p: argparse.ArgumentParser, flag: str = "--model", *, required: bool = True) -> None:
    p.add_argument(flag, required=required,
                   help="model spec: hf:DIR, run:DIR[@STEP], gguf:FILE, preset:NAME (+ --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the model's)")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def tokenize_config(args, base: TokenizeConfig | None = None) -> TokenizeConfig:
    base = base or TokenizeConfig()
    return TokenizeConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                          truncation=base.truncation, chat_template=not args.no_chat_template,
                          add_eos=base.add_eos and not args.no_eos)


def setup_logging() -> None:
    """Logging and the persistent compilation cache: :func:`jaxpref.cli.setup_runtime`."""
    from jaxpref import cli

    cli.setup_runtime()


def expected_errors() -> tuple[type[Exception], ...]:
    """Errors reported as one line (no traceback): :func:`jaxpref.cli.expected_errors`."""
    from jaxpref import cli

    return cli.expected_errors()


def fail(err: Exception) -> None:
    from jaxpref import cli

    cli.fail(err)
