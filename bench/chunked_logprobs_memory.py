"""Compiled peak memory of loss + grad: chunked ``sequence_logprobs`` vs naive full logits (compile only).

    python bench/chunked_logprobs_memory.py                      # V in {32k, 128k}, T in {1k, 4k}, N 2, D 256
    python bench/chunked_logprobs_memory.py --vocab 32000,128256,256000 --seq 1024,4096,8192 --n 4

The loss is ``-sum(summed response log-probs)`` of ``N`` sequences and the gradient is taken
with respect to both the hidden states ``[N, T, D]`` and the unembedding ``[D, V]`` (what a
train step needs). Each variant is lowered with ``jax.ShapeDtypeStruct`` arguments and
compiled, never run (so it is cheap and allocates nothing); XLA's ``memory_analysis()`` gives
the temporary buffer bytes and the argument / output bytes. ``peak`` = temp + argument +
output - aliased. The naive version materialises ``[N, T, V]`` float32 logits and their
``log_softmax``; the chunked one streams ``seq_chunk x vocab_chunk`` tiles. ``temp_over_w_f32``
is the chunked temp memory in units of one float32 ``[D, V]`` matrix (the gradient accumulator
is one such buffer; the backward before the in-place vocab slicing held 3-5 of them).
``--layout vd`` feeds a tied ``[V, D]`` embedding instead of a ``[D, V]`` head.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

MIB = 2**20


def naive_logprobs(hidden, w_dv, ids, mask):
    import jax
    import jax.numpy as jnp

    logits = jnp.einsum("ntd,dv->ntv", hidden[:, :-1], w_dv, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (tgt * mask[:, 1:]).sum(-1)


def memory(kind: str, n: int, t: int, d: int, v: int, dtype: str, seq_chunk: int, vocab_chunk: int,
           layout: str = "dv") -> dict:
    import jax
    import jax.numpy as jnp

    from jaxpref.logprobs import sequence_logprobs

    if kind == "naive":
        sums = naive_logprobs if layout == "dv" else lambda h, w, i, m: naive_logprobs(h, w.T, i, m)
    else:
        sums = lambda h, w, i, m: sequence_logprobs(h, w, i, m, layout=layout, seq_chunk=seq_chunk,
                                                    vocab_chunk=vocab_chunk).sums
    loss = lambda h, w, i, m: -sums(h, w, i, m).sum()
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    w_shape = (d, v) if layout == "dv" else (v, d)
    args = (jax.ShapeDtypeStruct((n, t, d), jnp.dtype(dtype)), jax.ShapeDtypeStruct(w_shape, jnp.dtype(dtype)),
            jax.ShapeDtypeStruct((n, t), jnp.int32), jax.ShapeDtypeStruct((n, t), jnp.int32))
    t0 = time.perf_counter()
    ma = fn.lower(*args).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    temp, arg, out = ma.temp_size_in_bytes, ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias = getattr(ma, "alias_size_in_bytes", 0)
    return {"temp_mib": temp / MIB, "argument_mib": arg / MIB, "output_mib": out / MIB, "alias_mib": alias / MIB,
            "peak_mib": (temp + arg + out - alias) / MIB, "temp_over_w_f32": temp / (d * v * 4),
            "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="32000,128000", help="comma list of V")
    p.add_argument("--seq", default="1024,4096", help="comma list of T")
    p.add_argument("--n", type=int, default=2, help="sequences N")
    p.add_argument("--hidden", type=int, default=256, help="D")
    p.add_argument("--dtype", default="float32", help="hidden / unembedding dtype")
    p.add_argument("--seq-chunk", type=int, default=128)
    p.add_argument("--vocab-chunk", type=int, default=8192)
    p.add_argument("--layout", default="dv", choices=("dv", "vd"), help="[D, V] head or tied [V, D] embedding")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/chunked_logprobs_memory.json)")
    args = p.parse_args()

    results, load0 = [], _common.load_avg()
    for v in (int(x) for x in args.vocab.split(",")):
        for t in (int(x) for x in args.seq.split(",")):
            row = {"vocab": v, "seq": t, "n": args.n, "hidden": args.hidden,
                   "full_logits_mib": args.n * (t - 1) * v * 4 / MIB, "w_f32_mib": args.hidden * v * 4 / MIB}
            for kind in ("naive", "chunked"):
                row[kind] = memory(kind, args.n, t, args.hidden, v, args.dtype, args.seq_chunk, args.vocab_chunk,
                                   args.layout)
            row["peak_ratio_naive_over_chunked"] = row["naive"]["peak_mib"] / row["chunked"]["peak_mib"]
            row["temp_ratio_naive_over_chunked"] = row["naive"]["temp_mib"] / max(row["chunked"]["temp_mib"], 1e-9)
            print(f"V={v:>6} T={t:>5}: naive peak {row['naive']['peak_mib']:8.1f} MiB (temp "
                  f"{row['naive']['temp_mib']:8.1f}), chunked peak {row['chunked']['peak_mib']:7.1f} MiB (temp "
                  f"{row['chunked']['temp_mib']:6.1f} = {row['chunked']['temp_over_w_f32']:.2f} f32 W), ratio "
                  f"{row['peak_ratio_naive_over_chunked']:.1f}x", flush=True)
            results.append(row)
    path = _common.write("chunked_logprobs_memory", {"env": _common.env(), "config": vars(args),
                                                     "load_avg_start": load0, "load_avg_end": _common.load_avg(),
                                                     "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
