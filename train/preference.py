"""Preference training with any registered loss composition.

    python -m train.preference --config configs/demo/dpo.yaml [--resume] [key=value ...]
"""

from __future__ import annotations

import json

from jaxpref.cli import fail, parse_run_config
from jaxpref.config import ConfigError


def main(argv=None) -> None:
    cfg, args = parse_run_config(argv, "Train a policy on preference pairs (DPO family, ORPO, RPO, TYPO, ...).")
    from jaxpref.data.sources import DataError
    from jaxpref.loading import SpecError
    from jaxpref.training.checkpoint import CheckpointError
    from jaxpref.training.loop import RunError, run_training

    try:
        summary = run_training(cfg, kind="preference", resume=args.resume)
    except (RunError, SpecError, DataError, CheckpointError, ConfigError) as err:
        fail(err)
    print(json.dumps(summary["final_metrics"], indent=1))


if __name__ == "__main__":
    main()
