"""Preference training with any registered loss composition.

    python -m train.preference --config configs/hh_dpo.yaml [--resume] [key=value ...]
"""

from __future__ import annotations

import functools

from jaxpref.cli import train_main


def main(argv=None) -> None:
    from jaxpref.training.loop import run_training

    train_main(argv, "Train a policy on preference pairs (DPO family, ORPO, RPO, TYPO, ...).",
               functools.partial(run_training, kind="preference"))


if __name__ == "__main__":
    main()
