"""Supervised fine-tuning on demonstrations (or the chosen side of preference pairs).

    python -m train.sft --config configs/hh_sft.yaml [--resume] [key=value ...]
"""

from __future__ import annotations

import functools

from jaxpref.cli import train_main


def main(argv=None) -> None:
    from jaxpref.training.loop import run_training

    train_main(argv, "Supervised fine-tuning (token-mean NLL of responses).",
               functools.partial(run_training, kind="sft"))


if __name__ == "__main__":
    main()
