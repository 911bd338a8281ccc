"""Forward-only summed response log-probs (the ranking-accuracy workload): jaxpref vs PyTorch ``transformers``.

    python bench/logprob_eval_vs_transformers.py                       # 4x256, T 256, 32 pairs in batches of 8
    python bench/logprob_eval_vs_transformers.py --sizes 4x256,8x512,12x768 --seq 256,512

Both sides score the same pairs (random ids, right padded to ``T``) with the same weights
(jaxpref random init exported by ``save_hf``, loaded by ``LlamaForCausalLM.from_pretrained``):
jaxpref runs a jitted forward + chunked :func:`jaxpref.logprobs.sequence_logprobs` (via
``training.step.pair_logps``); PyTorch runs a plain ``model(input_ids, attention_mask).logits``
+ ``log_softmax`` + ``gather`` under ``torch.inference_mode`` (full ``[2B, T, V]`` logits).
One untimed pass over all pairs (jit compile), then ``--repeats`` timed passes; the median
pass time gives real-token/s. The summed log-probs of both sides are compared (max abs diff).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402


def jax_scorer(model_dir: str, seq_chunk: int, vocab_chunk: int):
    import jax

    from jaxpref import models
    from jaxpref.training import step as S
    from jaxpref.types import PairBatch

    graphdef, params, rest = S.split_model(models.load_hf(model_dir))
    fn = jax.jit(lambda p, b: S.pair_logps(graphdef, p, rest, b, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)[0])

    def score(arrays):
        return np.asarray(jax.block_until_ready(fn(params, PairBatch(**arrays))))

    return score


def torch_scorer(model_dir: str, threads: int):
    import torch
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(arrays):
        b, two, t = arrays["input_ids"].shape
        ids = torch.from_numpy(arrays["input_ids"].reshape(b * two, t)).long()
        attn = torch.from_numpy(arrays["segment_ids"].reshape(b * two, t)).long()
        mask = torch.from_numpy(arrays["loss_mask"].reshape(b * two, t))[:, 1:].float()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            return (logp * mask).sum(-1).reshape(b, two).numpy()

    return score, torch.get_num_threads(), model.config._attn_implementation


def timed_passes(score, batches, repeats: int) -> tuple[dict, np.ndarray, float]:
    t0 = time.perf_counter()
    sums = np.concatenate([score(b) for b in batches])  # warm-up (and jit compile)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            score(b)
        times.append(time.perf_counter() - t0)
    return _common.summarize(times), sums, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4x256", help="comma list of LAYERSxHIDDEN (heads = hidden / 64)")
    p.add_argument("--seq", default="256", help="comma list of sequence lengths T")
    p.add_argument("--pairs", type=int, default=32, help="pairs scored per pass")
    p.add_argument("--batch", type=int, default=8, help="pairs per forward")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-chunk", type=int, default=128)
    p.add_argument("--vocab-chunk", type=int, default=8192)
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/logprob_eval_vs_transformers.json)")
    args = p.parse_args()
    if args.pairs % args.batch:
        p.error("--pairs must be a multiple of --batch")

    from jaxpref import models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results, load0 = [], _common.load_avg()
    for size in args.sizes.split(","):
        for seq in (int(s) for s in args.seq.split(",")):
            cfg = _common.llama_config(size, args.vocab, seq)
            pairs = _common.random_pairs(args.pairs, seq, args.vocab, seed=1)
            arrays = _common.pair_arrays(pairs)
            batches = [{k: v[i:i + args.batch] for k, v in arrays.items()} for i in range(0, args.pairs, args.batch)]
            real = int(arrays["segment_ids"].sum())
            padded = int(arrays["segment_ids"].size)
            row = {"size": size, "seq": seq, "pairs": args.pairs, "batch_pairs": args.batch, "params": cfg.num_params(),
                   "real_tokens_per_pass": real, "padded_tokens_per_pass": padded,
                   "forward_gflop_per_pass": cfg.flops_per_token(seq, training=False) * padded / 1e9}
            with tempfile.TemporaryDirectory() as d:
                models.save_hf(models.build_model(cfg, rngs=0), d)
                jax_score = jax_scorer(d, args.seq_chunk, args.vocab_chunk)
                torch_score, threads, attn = torch_scorer(d, args.torch_threads)
                for name, score in (("jax", jax_score), ("torch", torch_score)):
                    la = _common.load_avg()
                    stats, sums, first = timed_passes(score, batches, args.repeats)
                    row[name] = {"pass": stats, "first_pass_s": first, "tokens_per_s": real / stats["median_s"],
                                 "load_avg_before": la, "load_avg_after": _common.load_avg(), "sums": sums}
                    print(f"{size} T={seq} {name}: {stats['median_s'] * 1e3:.0f} ms/pass, "
                          f"{row[name]['tokens_per_s']:.0f} tok/s, load {row[name]['load_avg_after']}", flush=True)
                row["torch"].update(torch_threads=threads, attn_implementation=attn)
            row["max_abs_diff_sums"] = float(np.abs(row["jax"].pop("sums") - row["torch"].pop("sums")).max())
            row["torch_over_jax_time"] = row["torch"]["pass"]["median_s"] / row["jax"]["pass"]["median_s"]
            print(f"  max |sum logp jax - torch| = {row['max_abs_diff_sums']:.2e}", flush=True)
            results.append(row)
    path = _common.write("logprob_eval_vs_transformers", {"env": _common.env(), "config": vars(args),
                                                          "load_avg_start": load0, "load_avg_end": _common.load_avg(),
                                                          "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
