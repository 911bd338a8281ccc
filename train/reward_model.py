"""Bradley-Terry reward-model training on preference pairs (a linear head on the last token).

    python -m train.reward_model --config configs/base.yaml run_dir=runs/rm [--resume] [key=value ...]

The run directory is like ``train.preference``'s; use it as a win-rate judge with ``--judge rm:RUN_DIR``.
The ``loss`` section of the config is ignored (the objective is fixed: −log σ(r_w − r_l)).
"""

from __future__ import annotations

import json

from jaxpref.cli import fail, parse_run_config
from jaxpref.config import ConfigError


def main(argv=None) -> None:
    cfg, args = parse_run_config(argv, "Train a Bradley-Terry reward model on preference pairs.")
    from jaxpref.data.sources import DataError
    from jaxpref.loading import SpecError
    from jaxpref.reward_model import run_reward_training
    from jaxpref.training.checkpoint import CheckpointError
    from jaxpref.training.loop import RunError

    try:
        summary = run_reward_training(cfg, resume=args.resume)
    except (RunError, SpecError, DataError, CheckpointError, ConfigError) as err:
        fail(err)
    print(json.dumps(summary["final_metrics"], indent=1))


if __name__ == "__main__":
    main()
