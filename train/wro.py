"""Win-rate optimisation: on-policy sampling, a judge, RLOO advantages and a KL penalty.

    python -m train.wro --config configs/wro_tiny.yaml [--resume] [key=value ...]
"""

from __future__ import annotations

from jaxpref.cli import train_main


def main(argv=None) -> None:
    from jaxpref.training.wro import run_wro

    train_main(argv, "Train a policy by win-rate optimisation (papers-addendum.md, WRO).", run_wro)


if __name__ == "__main__":
    main()
