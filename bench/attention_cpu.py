"""Attention backends on CPU: ``blocked`` (flash, pure JAX) vs ``xla`` (dense scores).

    nice python bench/attention_cpu.py                       # T 512,1024,2048,4096,8192 (~3 min)
    python bench/attention_cpu.py --seq 2048 --repeats 5

Two measurements per sequence length T:

* ``layer``: one attention layer's forward + backward (``jax.vjp`` of
  :func:`jaxpref.models.attention.attend`, cotangent given), the kernel alone. Inputs are a
  DPO pair: 2 rows of ``[T, H, hd]``, chosen T tokens long, rejected 3T/4 (right padded),
  causal. Reports the compiled temp memory (``memory_analysis().temp_size_in_bytes``) and the
  median step time. The ``xla`` step is executed only while its temp memory is below
  ``--max-run-mib`` (a shared 2-core VM with ~20 GiB); above that only the compile-only memory
  is reported and ``executed`` is false.
* ``dpo_step``: compiled temp memory of the real preference train step
  (:func:`jaxpref.training.step.make_preference_step`, sigmoid DPO, precomputed reference) of a
  2-layer tiny Llama at T (compile only); the same program as the memory test in
  ``tests/test_attention.py``.

The ``auto`` threshold of :mod:`jaxpref.models.attention.select` (``AUTO_BLOCKED_MIN_LEN``) is
read off the ``layer`` rows: the shortest T from which ``blocked`` is at least as fast.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


def layer_program(backend: str, t: int, heads: int, kv_heads: int, head_dim: int):
    """(compiled fwd+bwd, args) for one attention layer on a right-padded DPO pair."""
    import jax
    import jax.numpy as jnp

    from jaxpref.models.attention import MaskSpec, attend

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, t, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, t, kv_heads, head_dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = np.ones((2, t), np.int32)
    seg[1, 3 * t // 4:] = 0
    pos = np.tile(np.arange(t, dtype=np.int32), (2, 1)) * seg
    spec = MaskSpec.self_attention(jnp.asarray(seg), jnp.asarray(pos))

    def fwd_bwd(q, k, v, w, spec):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, spec, backend), q, k, v)
        return out, vjp(w)

    args = (q, k, v, w, spec)
    return jax.jit(fwd_bwd).lower(*args).compile(), args


def dpo_step_temp_bytes(backend: str, t: int) -> int:
    import jax
    import jax.numpy as jnp

    from jaxpref import losses
    from jaxpref.config import OptimConfig
    from jaxpref.models import presets
    from jaxpref.models.registry import abstract_model
    from jaxpref.training import optim
    from jaxpref.training import step as S
    from jaxpref.types import PairBatch

    cfg = presets.tiny_llama(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1,
                             head_dim=16, max_position_embeddings=t, attention=backend)
    graphdef, params, rest = S.split_model(abstract_model(cfg))
    opt = optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, clip_norm=None), 10)[0]
    state = jax.eval_shape(lambda p: S.init_state(p, opt, 0), params)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch = PairBatch(i32(1, 2, t), i32(1, 2, t), i32(1, 2, t), i32(1, 2, t), jax.ShapeDtypeStruct((1,), bool),
                      jax.ShapeDtypeStruct((1,), jnp.float32), i32(1))
    step = S.make_preference_step(graphdef, rest, opt, losses.compose(["sigmoid"]), reference="precomputed",
                                  seq_chunk=512, vocab_chunk=128)
    compiled = jax.jit(step).lower(state, None, batch, jax.ShapeDtypeStruct((1, 2), jnp.float32)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="512,1024,2048,4096,8192", help="comma list of T")
    p.add_argument("--dpo-seq", default="2048,8192", help="T of the compile-only DPO train-step memory")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-run-mib", type=float, default=3072, help="execute xla only below this temp memory")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/attention_cpu.json)")
    args = p.parse_args()

    import jax

    from jaxpref.models.attention import blocked

    load_before = _common.load_avg()
    layer = []
    for t in [int(x) for x in args.seq.split(",")]:
        for backend in ("xla", "blocked"):
            t0 = time.perf_counter()
            compiled, call_args = layer_program(backend, t, args.heads, args.kv_heads, args.head_dim)
            row = {"T": t, "backend": backend, "compile_s": round(time.perf_counter() - t0, 3),
                   "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}
            if backend == "xla" and row["temp_mib"] > args.max_run_mib:
                row.update(executed=False, reason=f"temp {row['temp_mib']:.0f} MiB > --max-run-mib "
                                                  f"{args.max_run_mib:.0f}: compile-only")
            else:
                stats = _common.timeit(lambda c=compiled, a=call_args: jax.block_until_ready(c(*a)), warmup=args.warmup,
                                       repeats=args.repeats)
                row.update(executed=True, ms_per_step=1e3 * stats["median_s"], timing=stats)
            row["load_avg"] = _common.load_avg()
            print(row, flush=True)
            layer.append(row)

    dpo = []
    for t in [int(x) for x in args.dpo_seq.split(",")]:
        for backend in ("xla", "blocked"):
            dpo.append({"T": t, "backend": backend, "temp_mib": dpo_step_temp_bytes(backend, t) / 2**20})
            print(dpo[-1], flush=True)

    by = {(r["T"], r["backend"]): r for r in layer}
    faster = [t for (t, b), r in by.items() if b == "blocked" and r.get("executed") and by[(t, "xla")].get("executed")
              and r["ms_per_step"] <= by[(t, "xla")]["ms_per_step"]]
    out = {
        "env": _common.env(),
        "config": {**vars(args), "rows": 2, "mask": "causal; row 0 full, row 1 right-padded to 3T/4",
                   "block_q": blocked.DEFAULT_BLOCK_Q, "block_kv": blocked.DEFAULT_BLOCK_KV, "dtype": "float32",
                   "dpo_step_model": "tiny_llama 2 layers, D 32, H 2, KV 1, hd 16, V 128, seq_chunk 512"},
        "load_avg": {"before": load_before, "after": _common.load_avg()},
        "layer_fwd_bwd": layer,
        "dpo_step_compile_only": dpo,
        "blocked_at_least_as_fast_from_T": min(faster) if faster else None,
    }
    print("wrote", _common.write("attention_cpu", out, args.out))


if __name__ == "__main__":
    main()
