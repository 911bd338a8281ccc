"""Compile time of a DPO train step: layers scanned (``model.scan_layers``) vs unrolled (CPU, float32).

    python bench/compile_time.py                       # both models, both layouts (a few minutes)
    python bench/compile_time.py --models tiny32 --rounds 2
    python bench/compile_time.py --models tiny1,tiny32,tiny1_remat,tiny32_remat --rounds 3 \
        --out bench/results/compile_time_quiet.json      # the committed file (about 4 minutes)

The step is :func:`jaxpref.training.step.make_preference_step` (sigmoid DPO, live frozen reference,
AdamW, clip 1.0), as in ``bench/dpo_step_vs_trl.py``, jitted with the state donated. For each model and
layout a fresh subprocess (no persistent compilation cache, so nothing is reused between measurements)
times ``jit(step).lower(...)`` (tracing + lowering to StableHLO) and ``.compile()`` (XLA) separately, on
abstract inputs (``jax.eval_shape``: nothing is allocated, so the 135M model costs no memory). For the
tiny model the worker then also runs two steps on real weights (the same seed in both layouts, hence the
same weights) and records the step time and the loss and gradient norm, which must agree between layouts.

Models:
  * ``tiny1``: the same with 1 layer: the step's depth-independent compile cost (loss, log-probs, optimizer),
    so ``(tiny32 - tiny1) / 31`` is the compile cost of one more layer in each layout;
  * ``tiny32``: ``tiny_llama`` with 32 layers (D 32, 4 heads / 2 KV heads, V 128), 4 pairs x 64 tokens;
  * ``tiny1_remat`` / ``tiny32_remat``: the same with ``remat`` (each layer rematerialised in the backward
    pass, the setting for models at scale): the scanned loop body then saves only its input, while the
    unrolled program recomputes every layer's forward inside its backward;
  * ``smollm2_135m``: SmolLM2-135M's shape (30 layers, D 576, V 49152; random init), 2 pairs x 128 tokens.

``--rounds`` alternates the layouts and keeps every timing (the machine is shared: read them with
``load_avg``); the summary uses the median.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's jaxpref
import _common  # noqa: E402

MODELS = {
    "tiny1": {"preset": "tiny_llama", "overrides": {"num_layers": 1}, "pairs": 4, "seq": 64, "run": False},
    "tiny32": {"preset": "tiny_llama", "overrides": {"num_layers": 32}, "pairs": 4, "seq": 64, "run": True},
    "tiny1_remat": {"preset": "tiny_llama", "overrides": {"num_layers": 1, "remat": True}, "pairs": 4, "seq": 64,
                    "run": False},
    "tiny32_remat": {"preset": "tiny_llama", "overrides": {"num_layers": 32, "remat": True}, "pairs": 4, "seq": 64,
                     "run": True},
    "smollm2_135m": {"preset": "smollm2_135m", "overrides": {}, "pairs": 2, "seq": 128, "run": False},
}


def worker(name: str, scan: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpref import losses, models
    from jaxpref.config import OptimConfig
    from jaxpref.training import optim
    from jaxpref.training import step as S
    from jaxpref.types import PairBatch

    spec = MODELS[name]
    cfg = models.get_preset(spec["preset"], scan_layers=scan, **spec["overrides"])
    pairs = _common.random_pairs(spec["pairs"], spec["seq"], cfg.vocab_size, seed=0)
    batch = PairBatch(**_common.pair_arrays(pairs))
    opt, _ = optim.make_optimizer(OptimConfig(name="adamw", lr=1e-4, clip_norm=1.0), 10)
    comp = losses.compose([{"name": "sigmoid", "beta": 0.1}])

    graphdef, abstract_params, rest = S.split_model(models.abstract_model(cfg))
    abstract_state = jax.eval_shape(lambda p: S.init_state(p, opt, 0), abstract_params)
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference="live", seq_chunk=spec["seq"],
                                        vocab_chunk=min(cfg.vocab_size, 8192)), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = fn.lower(abstract_state, abstract_params, batch, None)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {"model": name, "scan_layers": scan, "num_layers": cfg.num_layers, "num_params": cfg.num_params(),
           "pairs": spec["pairs"], "seq": spec["seq"], "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
           "total_s": t2 - t0, "hlo_text_chars": len(lowered.as_text())}
    if spec["run"]:
        model = models.build_model(cfg, rngs=0)
        _, params, _ = nnx.split(model, nnx.Param, ...)
        state = S.build_state(params, opt, 0)
        ref = jax.tree.map(jnp.copy, params)
        batch = jax.device_put(batch)
        state, m = compiled(state, ref, batch, None)
        first = {k: float(m[k]) for k in ("loss", "grad_norm")}
        t0 = time.perf_counter()
        state, m = compiled(state, ref, batch, None)
        jax.block_until_ready((state, m))
        out.update(step_s=time.perf_counter() - t0, first_step=first)
    return out


def readme_summary(payload: dict) -> str:
    """The README's sentence on compile time (``tests/test_scan_layers.py`` checks that the README holds exactly
    this text for ``bench/results/compile_time_quiet.json``)."""
    s = payload["summary"]

    def pair(name: str) -> str:
        sc, un = s[name]["scanned"]["total_s"], s[name]["unrolled"]["total_s"]
        return f"{sc:.1f} s scanned vs {un:.1f} s unrolled (**{un / sc:.2f}x**)"

    text = (f"DPO train step compile time on CPU (`bench/results/compile_time_quiet.json`, median of "
            f"{payload['config']['rounds']} rounds, load average {payload['load_avg']['before'][0]:.1f} at the "
            f"start), 32-layer tiny Llama: {pair('tiny32')} without remat")
    if "tiny32_remat" in s:
        text += f", {pair('tiny32_remat')} with remat (the layout at scale: the loop body saves only its input)"
    one = s["tiny1"]["unrolled"]["total_s"]
    return text + (f"; a 1-layer model alone takes {one:.1f} s, the depth-independent loss, log-prob and optimizer "
                   f"part that bounds the ratio, and each further layer adds "
                   f"{s['tiny32']['scanned']['per_extra_layer_s']:.3f} s scanned against "
                   f"{s['tiny32']['unrolled']['per_extra_layer_s']:.3f} s unrolled")


def run_worker(name: str, scan: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--scan", str(int(scan))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {name} scan={scan} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny1,tiny32,smollm2_135m")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scan", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, bool(args.scan))))
        return

    load_before = _common.load_avg()
    runs: list[dict] = []
    for _ in range(args.rounds):
        for name in args.models.split(","):
            for scan in (True, False):
                r = run_worker(name, scan)
                print(json.dumps(r), flush=True)
                runs.append(r)
    import statistics

    summary = {}
    for name in args.models.split(","):
        med = {}
        for scan in (True, False):
            rs = [r for r in runs if r["model"] == name and r["scan_layers"] == scan]
            med["scanned" if scan else "unrolled"] = {k: statistics.median(r[k] for r in rs)
                                                     for k in ("trace_lower_s", "compile_s", "total_s")}
        s, u = med["scanned"], med["unrolled"]
        summary[name] = {**med, "speedup_total": u["total_s"] / s["total_s"],
                         "speedup_compile": u["compile_s"] / s["compile_s"]}
    for one, deep in (("tiny1", "tiny32"), ("tiny1_remat", "tiny32_remat")):
        if one in summary and deep in summary:
            for layout in ("scanned", "unrolled"):
                summary[deep][layout]["per_extra_layer_s"] = (
                    summary[deep][layout]["total_s"] - summary[one][layout]["total_s"]) / 31
    payload = {"env": _common.env(), "load_avg": {"before": load_before, "after": _common.load_avg()},
               "config": {"models": {k: MODELS[k] for k in args.models.split(",")}, "rounds": args.rounds,
                          "step": "make_preference_step sigmoid beta 0.1, live reference, adamw clip 1.0, "
                                  "float32, state donated"},
               "summary": summary, "runs": runs}
    path = _common.write("compile_time", payload, args.out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
