"""Will it fit? Plan a run's per-device memory and sharding by compiling its train step, allocating nothing.

    python -m train.plan --config configs/hh_dpo.yaml model.source=preset:llama3_8b mesh.data=1 mesh.fsdp=8 \\
        --devices 8 --hbm 80GiB [--kind preference|sft|reward] [--seq-len T] [--out plan.json]

Without accelerators, ``--devices N`` fake CPU devices are used (set before JAX starts); with them, the
real devices (``--cpu`` plans on fake CPU devices anyway). ``--hbm`` adds the largest micro-batch and T
that fit (by recompiling; ``--no-search`` skips that). See :mod:`jaxpref.training.plan`.

The README's memory table (:mod:`jaxpref.training.plan_table`)::

    python -m train.plan --grid --out results/plan/dpo_memory.json     # compile the grid (slow)
    python -m train.plan --table --out results/plan/dpo_memory.json [--readme README.md]  # only the table
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys


def set_devices(n: int | None, cpu: bool) -> None:
    """``XLA_FLAGS`` for ``n`` fake host devices (and ``JAX_PLATFORMS=cpu`` with ``cpu``), before JAX starts.

    The planner never runs what it compiles, so XLA's LLVM backend runs at -O0 unless ``XLA_FLAGS`` sets a
    level: the HLO passes (fusion, scheduling, buffer assignment) and so the memory analysis are the same,
    in half the compile time.
    """
    if cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if n is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
        flags = f"{flags} --xla_force_host_platform_device_count={n}"
    if "--xla_backend_optimization_level" not in flags:
        flags = f"{flags} --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (may start with 'base: other.yaml')")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.source=preset:llama3_8b mesh.fsdp=8")
    p.add_argument("--kind", default="preference", help="preference (default), sft or reward")
    p.add_argument("--devices", type=int, default=None, help="plan on N devices (fake CPU ones without accelerators)")
    p.add_argument("--cpu", action="store_true", help="plan on fake CPU devices even when accelerators are present")
    p.add_argument("--hbm", default=None, help="per-device memory budget, e.g. 80GiB or 141GB: reports the fit and "
                                               "searches the largest micro-batch and T that fit")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length T (default: the config's longest bucket)")
    p.add_argument("--no-search", action="store_true", help="with --hbm: only say whether the config fits")
    p.add_argument("--max-compiles", type=int, default=6, help="compiles per search (default 6)")
    p.add_argument("--out", default=None, help="write the plan as JSON here (with --grid / --table: the grid JSON)")
    p.add_argument("--grid", action="store_true", help="compile the README memory grid into --out")
    p.add_argument("--table", action="store_true", help="run nothing; print the README table of the --out grid JSON")
    p.add_argument("--readme", default=None, help="with --table: replace the table between the markers of this file")
    g = p.add_argument_group("--grid")
    g.add_argument("--presets", default="llama3_2_1b,llama3_2_3b,llama3_8b,qwen2_5_7b,llama3_1_70b")
    g.add_argument("--grid-devices", default="8,64")
    g.add_argument("--seq-lens", default="2048,8192")
    g.add_argument("--time-limit", type=float, default=None, help="start no new cell after this many seconds")
    args = p.parse_args(argv)
    if args.devices is not None and args.devices < 1:
        p.error("--devices must be >= 1")
    if (args.grid or args.table) and not args.out:
        p.error("--grid and --table need --out (the grid JSON)")

    if args.table:
        from jaxpref.training import plan_table

        try:
            table = plan_table.table(json.loads(pathlib.Path(args.out).read_text()))
            if args.readme:
                plan_table.replace_readme_table(args.readme, table)
        except (OSError, ValueError) as err:
            sys.exit(f"error: {err}")
        print(table, end="")
        return None

    set_devices(args.devices or (max(_ints(args.grid_devices)) if args.grid else None), args.cpu)
    import logging

    from jaxpref.cli import expected_errors, fail

    # no persistent compilation cache: plans of large models would fill it with executables nobody runs
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxpref").setLevel(logging.INFO)
    logging.getLogger("jaxpref.models.attention").setLevel(logging.WARNING)
    if args.grid:
        from jaxpref.training import plan_table

        try:
            plan_table.run_grid(args.out, presets=args.presets.split(","), devices=_ints(args.grid_devices),
                                seq_lens=_ints(args.seq_lens), time_limit_s=args.time_limit)
        except expected_errors() as err:
            fail(err)
        return None

    from jaxpref.config import ConfigError, RunConfig, load_config
    from jaxpref.training import plan as planlib

    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    try:
        import jax

        devices = jax.devices()
        if args.devices is not None:
            if args.devices > len(devices):
                raise planlib.PlanError(f"--devices {args.devices}: only {len(devices)} {devices[0].platform} "
                                        "devices here (--cpu plans on fake CPU devices)")
            devices = devices[: args.devices]
        hbm = planlib.parse_bytes(args.hbm) if args.hbm else None
        result = planlib.plan(cfg, kind=args.kind, devices=devices, hbm=hbm, t=args.seq_len,
                              search=() if args.no_search else ("micro_batch", "seq_len"),
                              max_compiles=args.max_compiles)
    except expected_errors() as err:
        fail(err)
    print(planlib.format_plan(result), end="")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
