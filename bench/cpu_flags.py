"""Which XLA / JAX CPU settings change the step time of a plain LM train step (vs PyTorch eager)?

    python bench/cpu_flags.py                                  # all variants, 5 timed steps each (a few minutes)
    python bench/cpu_flags.py --variants baseline,thunk_off,torch_eager --steps 10
    python bench/cpu_flags.py --rounds 3 --profile             # repeated, order rotated; + op-time breakdown

Workload (env-notes §7 scale): the jaxpref Llama model with 4 layers, D 256 (4 heads, MLP
704), vocab 1024, untied, batch 8 x 128 tokens, float32; one step = forward + mean token
cross-entropy (full logits) + backward + AdamW (optax), jitted with the state donated.
``torch_eager`` is the same model and weights (``save_hf`` -> ``LlamaForCausalLM``) with
``torch.optim.AdamW``; ``torch_eager_1thread`` adds ``torch.set_num_threads(1)``. Every variant
runs in its own subprocess (XLA_FLAGS are read when the backend starts), after ``--warmup``
untimed steps; the first loss is reported as a numerics check. A variant whose flag XLA does
not know fails; its error is recorded, not raised. ``relative_to_baseline`` is the median over
rounds of each variant's step time divided by the baseline's in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

# name -> (extra XLA_FLAGS, jax.config updates)
VARIANTS: dict[str, tuple[str, dict]] = {
    "baseline": ("", {}),
    "eigen_multi_thread": ("--xla_cpu_multi_thread_eigen=true", {}),
    "eigen_intra_op_2": ("--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2", {}),
    "eigen_single_thread": ("--xla_cpu_multi_thread_eigen=false", {}),
    "thunk_off": ("--xla_cpu_use_thunk_runtime=false", {}),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", {}),
    "ynn_fusion_off": ("--xla_cpu_experimental_ynn_fusion_type=", {}),
    "onednn": ("--xla_cpu_use_onednn=true", {}),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}),
    "concurrency_scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", {}),
    "fake_devices_8": ("--xla_force_host_platform_device_count=8", {}),
    "matmul_precision_highest": ("", {"jax_default_matmul_precision": "highest"}),
    "matmul_precision_bf16": ("", {"jax_default_matmul_precision": "bfloat16"}),
    "async_dispatch_off": ("", {"jax_cpu_enable_async_dispatch": False}),
    "torch_eager": ("", {}),
    "torch_eager_1thread": ("", {"torch_threads": 1}),
    "profile": ("--xla_cpu_enable_xprof_traceme=true", {}),  # baseline + per-op time by HLO kind (--profile)
}


def batch_ids(batch: int, seq: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int32)


def jax_step_fn(model_dir: str, updates: dict, lr: float):
    import jax

    for k, v in updates.items():
        jax.config.update(k, v)
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxpref import models

    graphdef, params, rest = nnx.split(models.load_hf(model_dir), nnx.Param, ...)
    opt = optax.adamw(lr)

    def loss_fn(p, ids):
        model = nnx.merge(graphdef, p, rest)
        hidden = model(ids).hidden
        w, layout = model.unembedding()
        logits = jnp.einsum("btd,dv->btv" if layout == "dv" else "btd,vd->btv", hidden[:, :-1], w)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    def step(state, ids):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        upd, o = opt.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    state = [(params, opt.init(params))]
    step = jax.jit(step, donate_argnums=(0,))

    def run(ids):
        state[0], loss = step(state[0], ids)
        return float(jax.block_until_ready(loss))

    return run


def torch_step_fn(model_dir: str, lr: float, threads: int):
    import torch
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def run(ids):
        t = torch.from_numpy(ids).long()
        loss = model(input_ids=t, labels=t, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return run


def worker(args) -> None:
    ids = batch_ids(args.batch, args.seq, args.vocab)
    flags, updates = VARIANTS[args.worker]
    if args.worker.startswith("torch"):
        run = torch_step_fn(args.dir, args.lr, updates.get("torch_threads", 0))
    else:
        run = jax_step_fn(args.dir, updates, args.lr)
    load0 = _common.load_avg()
    t0 = time.perf_counter()
    first_loss = run(ids)
    first = time.perf_counter() - t0
    stats = _common.timeit(lambda: run(ids), warmup=args.warmup, repeats=args.steps)
    extra = {"op_ms_per_step": _common.op_profile(lambda: run(ids))} if args.worker == "profile" else {}
    if args.worker.startswith("torch"):
        import torch

        extra["torch_threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps({"step": stats, "first_step_s": first, "first_loss": first_loss,
                                  "load_avg_before": load0, "load_avg_after": _common.load_avg(), **extra}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "profile"),
                   help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--profile", action="store_true", help="add the baseline's op-time breakdown (perfetto trace)")
    p.add_argument("--size", default="4x256", help="LAYERSxHIDDEN")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rounds", type=int, default=1, help="passes over the variants (order rotated; timings pooled)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_flags.json)")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.profile:
        args.variants += ",profile"
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; available: {list(VARIANTS)}")

    from jaxpref import models

    def spawn(name: str, d: str) -> dict:
        flags = VARIANTS[name][0]
        env = {**base_env, "HF_HUB_OFFLINE": "1", **({"XLA_FLAGS": flags} if flags else {})}
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--dir", d]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            return {"error": " | ".join([ln for ln in proc.stderr.splitlines() if ln.strip()][-3:])}
        notes = [ln.split("] ", 1)[-1] for ln in proc.stderr.splitlines() if "flags" in ln and "] " in ln]
        return {**json.loads(lines[-1][7:]), "xla_messages": notes}

    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cfg = _common.llama_config(args.size, args.vocab, args.seq)
    names, load0 = args.variants.split(","), _common.load_avg()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as d:
        models.save_hf(models.build_model(cfg, rngs=0), d)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # rotate the order each round
                r = spawn(name, d)
                runs[name].append(r)
                msg = (f"FAILED: {r['error'][:200]}" if "error" in r else
                       f"{r['step']['median_s'] * 1e3:7.1f} ms/step (min {r['step']['min_s'] * 1e3:.1f}), "
                       f"loss {r['first_loss']:.5f}, load {r['load_avg_after']}")
                print(f"round {rnd} {name:<26} {msg}", flush=True)
    results = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        flags, updates = VARIANTS[name]
        if not ok:
            results[name] = {"xla_flags": flags, "config": updates, "error": rs[0]["error"]}
            continue
        step = _common.summarize([t for r in ok for t in r["step"]["all_s"]])
        results[name] = {"xla_flags": flags, "config": updates, "step": step,
                         "round_medians_s": [r["step"]["median_s"] for r in ok], "first_loss": ok[0]["first_loss"],
                         "xla_messages": ok[0]["xla_messages"], "load_avg_after": [r["load_avg_after"] for r in ok],
                         **{k: ok[0][k] for k in ("torch_threads", "op_ms_per_step") if k in ok[0]}}
    base = results.get("baseline", {}).get("round_medians_s")
    for name, r in results.items():
        if base and "step" in r and len(r["round_medians_s"]) == len(base):
            # per-round ratio to the baseline of the same round, then the median: robust to load drift
            r["relative_to_baseline"] = statistics.median(x / b for x, b in zip(r["round_medians_s"], base))
            print(f"{name:<26} {r['step']['median_s'] * 1e3:7.1f} ms/step, x{r['relative_to_baseline']:.2f} baseline")
    path = _common.write("cpu_flags", {"env": _common.env(), "config": {**vars(args), "model": args.size,
                                                                        "params": cfg.num_params()},
                                       "load_avg_start": load0, "load_avg_end": _common.load_avg(),
                                       "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
