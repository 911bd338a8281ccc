"""Single float32 matmuls at the DPO step's shapes: XLA:CPU (jitted ``a @ b``) vs PyTorch eager.

    python bench/matmul_cpu.py                                       # -> bench/results/cpu_flags_matmul.json
    python bench/matmul_cpu.py --xla-flags=--xla_cpu_use_onednn=true --out ...

Shapes are ``[M, K] @ [K, N]`` with M = 2B*T tokens of the 12x768 step (4 pairs, T 512 = 4096) and
K, N from its projections (768 -> 768 attention, 768 <-> 2048 MLP, 768 -> 8192 one LM-head vocabulary
chunk). Each variant runs in its own subprocess (XLA flags must be set before JAX starts); torch runs
with 2 and with 1 thread. ``cpu_util`` = process CPU time / wall time: ~2.0 means both cores worked.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

SHAPES = ((4096, 768, 768), (4096, 768, 2048), (4096, 2048, 768), (4096, 768, 8192))


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    wall = time.perf_counter() - w0
    return wall / repeats, (time.process_time() - c0) / wall


def worker(kind: str, repeats: int) -> list[dict]:
    rows = []
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        matmul = jax.jit(lambda a, b: a @ b)
        for m, k, n in SHAPES:
            a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
            rows.append((m, k, n, *_time(lambda a=a, b=b: matmul(a, b).block_until_ready(), repeats)))
    else:
        import torch

        torch.set_num_threads(int(kind.removeprefix("torch")))
        for m, k, n in SHAPES:
            a, b = torch.ones(m, k), torch.ones(k, n)
            rows.append((m, k, n, *_time(lambda a=a, b=b: a @ b, repeats)))
    return [{"shape": [m, k, n], "ms": t * 1e3, "gflops": 2 * m * k * n / t / 1e9, "cpu_util": u}
            for m, k, n, t, u in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xla-flags", action="append", default=[],
                   help="an XLA_FLAGS variant for JAX (repeatable; the default flags always run)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_flags_matmul.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.repeats)))
        return
    variants = [("jax", ""), *(("jax", f) for f in args.xla_flags), ("torch2", ""), ("torch1", "")]
    results, load0 = [], _common.load_avg()
    for kind, flags in variants:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        if flags:
            env["XLA_FLAGS"] = flags
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"{kind} {flags}: worker failed:\n{proc.stderr[-3000:]}")
        rows = json.loads(lines[-1][7:])
        results.append({"framework": kind, "xla_flags": flags, "rows": rows, "load_avg_after": _common.load_avg()})
        for r in rows:
            print(f"{kind:7s} {flags:40s} {'x'.join(map(str, r['shape'])):16s} {r['ms']:8.1f} ms "
                  f"{r['gflops']:6.1f} GFLOP/s  cpu util {r['cpu_util']:.2f}", flush=True)
    path = _common.write("cpu_flags_matmul", {"env": _common.env(), "config": {"repeats": args.repeats},
                                              "load_avg_start": load0, "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
