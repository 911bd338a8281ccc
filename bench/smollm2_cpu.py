"""The README's real-model route on CPU: SmolLM2-135M-Instruct DPO on HH-RLHF, then ``eval.ranking``.

    python bench/smollm2_cpu.py                      # -> bench/results/smollm2_cpu.json
    python bench/smollm2_cpu.py --steps 6 --batch 4 --max-length 512 --buckets 256 512

Runs ``python -m train.preference --config configs/smollm2_dpo.yaml`` (the README command, model
``gguf:smollm2-135m-instruct``) in this process with fewer steps, pairs and tokens
(``train.steps``, ``train.batch_size``, ``data.limit``, ``data.max_length``, ``data.buckets``; the
config's ``micro_batches: 2`` and precomputed reference are kept), then the README's
``eval.ranking`` command on ``--eval-limit`` pairs. Records:

* ``setup_s``: start -> the step loop begins (GGUF read and dequantisation, tokenisation, the
  precomputed reference pass over ``data.limit`` pairs);
* per step: seconds and tokens/s (from ``metrics.jsonl``: tokens / step time); the first step of
  each new bucket shape includes an XLA compile;
* ``compiles``: XLA backend compiles during training (count, seconds; ``jax.monitoring``);
* ``steady``: median / min / max tokens/s and s/step over the steps after the first;
* ``eval_ranking``: wall seconds of the eval command and pairs/s.

Numbers depend on the machine's load: ``load_avg`` (before / after) and the process CPU time are
recorded next to them (this 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402


def readme_summary(payload: dict) -> str:
    """The README's sentence on what a CPU user should expect (tests/test_readme_commands.py checks that the
    README holds exactly this text for the committed result file)."""
    r, cfg, la = payload["results"], payload["config"], payload["load_avg"]
    st, loop, ev = r["steady"], r["step_loop"], r["eval_ranking"]
    return (f"{r['time_to_first_step_s']:.0f} s to the end of the first step ({r['setup_s']:.0f} s of GGUF "
            f"loading, tokenisation and the reference pass over {cfg['limit']} pairs, then the first step and its "
            f"compile), then {st['seconds_per_step_median']:.0f} s per step of {cfg['batch']} pairs at most "
            f"{cfg['max_length']} tokens, {st['tokens_per_s_median']:.1f} tokens/s (median of steps 2-{cfg['steps']}; "
            f"{st['tokens_per_s_min']:.1f}-{st['tokens_per_s_max']:.1f}), with {r['compiles']['count']} XLA compiles "
            f"taking {r['compiles']['seconds']:.0f} s; `eval.ranking` on {ev['pairs']} pairs with the reference took "
            f"{ev['wall_s']:.0f} s. The machine was shared (load average {la['before'][0]:.0f} before, "
            f"{la['after'][0]:.0f} after, on 2 cores): the step loop, compiles and checkpoint included, did "
            f"{loop['tokens_per_cpu_s']:.1f} tokens per CPU-second of its own, roughly "
            f"{2 * loop['tokens_per_cpu_s']:.0f} tokens/s on two otherwise idle cores")


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="train.batch_size (pairs per step, 2 micro-batches)")
    p.add_argument("--limit", type=int, default=16, help="data.limit (pairs tokenised and reference-scored)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--buckets", type=int, nargs="+", default=[128, 256])
    p.add_argument("--eval-limit", type=int, default=8)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_helpful_base_test_2k.jsonl"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax

    from eval import ranking
    from jaxpref.config import RunConfig, load_config
    from jaxpref.training.loop import run_training

    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    marks: dict[str, float] = {}

    class Mark(logging.Handler):  # the time the precomputed reference pass ends: the step loop starts next
        def emit(self, record):
            if "reference log-probs" in record.getMessage() and "reference_done" not in marks:
                marks["reference_done"], marks["cpu_at_loop"] = time.perf_counter(), _cpu_s()

    logging.getLogger("jaxpref").addHandler(Mark())
    logging.getLogger("jaxpref").setLevel(logging.INFO)

    load0, cpu0 = _common.load_avg(), os.times()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = pathlib.Path(tmp) / "smollm2_dpo"
        overrides = [f"run_dir={run_dir}", f"data.train={args.data}", f"train.steps={args.steps}",
                     f"train.batch_size={args.batch}", f"data.limit={args.limit}",
                     f"data.max_length={args.max_length}", f"data.buckets={json.dumps(args.buckets)}",
                     f"reference.cache_dir={tmp}/ref_cache", "logging.progress=false", "logging.tensorboard=false"]
        cfg = load_config(RunConfig, ROOT / "configs" / "smollm2_dpo.yaml", overrides)
        t0 = time.perf_counter()
        run_training(cfg, kind="preference")
        t_train, cpu_train_end = time.perf_counter() - t0, _cpu_s()
        n_compiles, compile_s = len(compiles), sum(compiles)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [{"step": r["step"], "tokens": r["tokens"], "seconds": round(r["tokens"] / r["tokens_per_s"], 2),
                  "tokens_per_s": round(r["tokens_per_s"], 2)} for r in rows]
        t1 = time.perf_counter()
        ranking.main(["--model", f"run:{run_dir}", "--reference", "gguf:smollm2-135m-instruct", "--data", args.data,
                      "--out", f"{tmp}/rank", "--limit", str(args.eval_limit), "--max-length", str(args.max_length),
                      "--batch-size", "4", "--no-progress"])
        t_eval = time.perf_counter() - t1
    cpu1, load1 = os.times(), _common.load_avg()
    later = steps[1:] or steps
    tps = [s["tokens_per_s"] for s in later]
    sec = [s["seconds"] for s in later]
    setup = marks.get("reference_done", t0) - t0
    loop_wall = t_train - setup
    loop_cpu = cpu_train_end - marks.get("cpu_at_loop", cpu_train_end)
    loop_tokens = sum(s["tokens"] for s in steps)
    results = {
        "setup_s": round(setup, 1),
        "first_step_s": steps[0]["seconds"],
        "time_to_first_step_s": round(setup + steps[0]["seconds"], 1),
        "steps": steps,
        "steady": {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps),
                   "tokens_per_s_max": max(tps), "seconds_per_step_median": statistics.median(sec),
                   "steps_per_s_median": round(1 / statistics.median(sec), 4)},
        "compiles": {"count": n_compiles, "seconds": round(compile_s, 1)},
        # the step loop (compiles, steps, final checkpoint): wall vs this process's CPU time, which the
        # machine's other jobs do not inflate; tokens per CPU-second x cores ~ tokens/s on an idle machine
        "step_loop": {"wall_s": round(loop_wall, 1), "process_cpu_s": round(loop_cpu, 1), "tokens": loop_tokens,
                      "tokens_per_cpu_s": round(loop_tokens / max(loop_cpu, 1e-9), 2)},
        "train_wall_s": round(t_train, 1),
        "eval_ranking": {"wall_s": round(t_eval, 1), "pairs": args.eval_limit,
                         "pairs_per_s": round(args.eval_limit / t_eval, 3)},
        "process_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
        "peak_rss_mib": round(_common.peak_rss_mib()),
    }
    payload = {"env": _common.env(), "load_avg": {"before": load0, "after": load1},
               "config": {"config": "configs/smollm2_dpo.yaml", "model": "gguf:smollm2-135m-instruct",
                          "micro_batches": cfg.train.micro_batches, "reference": cfg.reference.strategy,
                          **{k: v for k, v in vars(args).items() if k not in ("out", "data")}},
               "results": results}
    path = _common.write("smollm2_cpu", payload, args.out)
    print(json.dumps(results, indent=1))
    print(f"-> {path}\nREADME: {readme_summary(payload)}")
    return payload


if __name__ == "__main__":
    main()
