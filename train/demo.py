"""The embedded-default demo (README command 1): SFT → DPO / RPO / TYPO → evaluation, no download.

    python -m train.demo [--out runs/demo] [--config configs/demo/demo.yaml] [--quick] [--no-progress]

Everything runs on the exact-oracle testbed (see :mod:`jaxpref.demo`); the report is ``OUT/report``
(``metrics.json``, ``report.md`` and PNG plots).
"""

from __future__ import annotations

import argparse
import logging
import time


def main(argv=None) -> dict:
    from jaxpref.demo import DEFAULT_CONFIG, run_demo

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder (runs, eval outputs, report/)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo settings (YAML)")
    p.add_argument("--quick", action="store_true", help="1/5 of the steps (smoke test; numbers not meaningful)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # (Orbax's read-only notices on every checkpoint read are dropped by jaxpref.loading's absl filter)
    from jaxpref.cli import expected_errors, fail

    start = time.perf_counter()
    try:
        result = run_demo(args.out, config=args.config, progress=not args.no_progress, quick=args.quick)
    except expected_errors() as err:
        fail(err)
    print(f"\nreport: {args.out}/report/report.md  ({time.perf_counter() - start:.0f} s)")
    for name, m in result["methods"].items():
        print(f"  {name:5s} exact win rate vs reference {m['exact_win_rate_vs_reference']:.3f}  "
              f"KL {m['exact_kl_to_reference']:.3f}  R {m['ranking']['ranking_accuracy']:.3f}  "
              f"R* {m['ranking']['idealized_R_star']['median']:.3f}")
    return result


if __name__ == "__main__":
    main()
