"""Bradley-Terry reward-model training on preference pairs (a linear head on the last token).

    python -m train.reward_model --config configs/base.yaml run_dir=runs/rm [--resume] [key=value ...]

The run directory is like ``train.preference``'s; use it as a win-rate judge with ``--judge rm:RUN_DIR``.
The ``loss`` section of the config is ignored (the objective is fixed: −log σ(r_w − r_l)).
"""

from __future__ import annotations

from jaxpref.cli import train_main


def main(argv=None) -> None:
    from jaxpref.reward_model import run_reward_training

    train_main(argv, "Train a Bradley-Terry reward model on preference pairs.",
               run_reward_training)


if __name__ == "__main__":
    main()
