"""CHES / LN-CHES per preference pair (Razin et al. 2025), baselines, and LN-CHES filtering.

    python -m eval.ches --model hf:DIR --data pairs.jsonl --out DIR [--keep-lowest 0.05] [--window 512]

Writes into ``--out``:

* ``ches.jsonl``: per pair ``id``, ``row``, ``ches``, ``ln_ches``, ``last_hidden_ip`` (inner product of the
  last predictor states) and ``edit_distance`` (normalised token Levenshtein distance of the two responses,
  a trailing EOS removed from each);
* ``summary.json``: distribution of every score, share of positive CHES, Spearman correlations
  (average ranks for ties);
* ``ches.png``: histograms;
* with ``--keep-lowest F``: ``filtered.jsonl``, the source rows of the ``ceil(F · N)`` pairs with the lowest
  LN-CHES (Razin §6; the paper keeps 5%), ready to train on, and their ids in the summary;
* with ``--window K``: ids of the ``K`` pairs centred on the 0/25/50/75/100th CHES percentiles (Razin §5).

Hidden states are the final ones (post final norm, the unembedding's input) at the positions that
predict each response token, EOS included; sums in float32.
"""

from __future__ import annotations

import argparse
import pathlib

import jax.numpy as jnp
import numpy as np

from eval import common


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_common_args(p)
    p.add_argument("--keep-lowest", type=float, default=None, metavar="FRAC",
                   help="write filtered.jsonl with the lowest-LN-CHES fraction of the pairs")
    p.add_argument("--window", type=int, default=None, metavar="K", help="ids of K pairs around CHES percentiles")
    return p


def correlations(ches: np.ndarray, ln_ches: np.ndarray, last_ip: np.ndarray, edit: np.ndarray) -> dict[str, float]:
    """Spearman ρ of CHES with each other score (``[N]`` each), average ranks for ties
    (:func:`jaxpref.metrics.spearman`); the edit distance enters negated (smaller distance = more similar)."""
    from jaxpref.metrics import spearman

    return {"ches_vs_ln_ches": spearman(ches, ln_ches), "ches_vs_last_hidden_ip": spearman(ches, last_ip),
            "ches_vs_minus_edit_distance": spearman(ches, -np.asarray(edit))}


def _strip_eos(ids: np.ndarray, eos: int | None) -> np.ndarray:
    return ids[:-1] if eos is not None and len(ids) and ids[-1] == eos else ids


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    common.setup_logging()
    from jaxpref import evaluation as ev
    from jaxpref import metrics

    out = pathlib.Path(args.out)
    try:
        loaded, tok = ev.load_model_and_tokenizer(args.model, args.tokenizer)
        data = ev.load_eval_pairs(args.data, tok, format=args.format, split=args.split, limit=args.limit,
                                  tokenize=common.tokenize_config(args))
        scores = ev.score_pairs(loaded.model, data.pairs, batch_size=args.batch_size, with_hidden=True,
                                progress=not args.no_progress, desc="ches")
    except common.expected_errors() as err:
        common.fail(err)
    hs, cnt = jnp.asarray(scores.hidden_sums), jnp.asarray(scores.counts)
    ch = metrics.ches_scores(hs[:, 0], hs[:, 1], cnt[:, 0], cnt[:, 1])
    ches, ln_ches = np.asarray(ch.ches), np.asarray(ch.ln_ches)
    lh = scores.last_hidden
    last_ip = np.asarray(metrics.last_hidden_inner_product(lh[:, 0], lh[:, 1]))
    eos = tok.eos_token_id
    pairs = data.pairs
    edit = metrics.normalized_edit_distances([_strip_eos(x, eos) for x in pairs.chosen],
                                             [_strip_eos(x, eos) for x in pairs.rejected])
    rows = [{"id": rid, "row": int(pairs.row[i]), "ches": float(ches[i]), "ln_ches": float(ln_ches[i]),
             "last_hidden_ip": float(last_ip[i]), "edit_distance": float(edit[i]),
             "chosen_tokens": int(scores.counts[i, 0]), "rejected_tokens": int(scores.counts[i, 1])}
            for i, rid in enumerate(pairs.ids)]
    ev.write_jsonl(out / "ches.jsonl", rows)
    summary = {
        "model": args.model, "data": str(args.data), "n_pairs": len(rows), "rows_rejected": len(data.rejects),
        "hidden": "final hidden states (unembedding input) at the predictor positions of every response token "
                  "(EOS included); float32 sums",
        "ches": ev.describe(ches), "ln_ches": ev.describe(ln_ches), "last_hidden_ip": ev.describe(last_ip),
        "edit_distance": ev.describe(edit),
        "fraction_ches_positive": float(np.mean(ches > 0)),
        "spearman": correlations(ches, ln_ches, last_ip, edit),
        "scoring": scores.stats.to_json(),
    }
    if args.window:
        k = min(args.window, len(rows))
        summary["windows"] = {"k": k, "by_quantile": {
            str(q): [pairs.ids[j] for j in np.asarray(metrics.quantile_window(jnp.asarray(ches), q, k))]
            for q in (0.0, 0.25, 0.5, 0.75, 1.0)}}
    if args.keep_lowest is not None:
        keep = metrics.lowest_fraction(ln_ches, args.keep_lowest)
        keep_rows = sorted(int(pairs.row[j]) for j in keep)
        from jaxpref.data.sources import load_rows

        raw = dict(load_rows(args.data, split=args.split)[0])
        ev.write_jsonl(out / "filtered.jsonl", [raw[r] for r in keep_rows])
        summary["filtered"] = {"fraction": args.keep_lowest, "n_kept": len(keep_rows), "by": "ln_ches",
                               "max_ln_ches_kept": float(ln_ches[keep].max()),
                               "ids": [pairs.ids[j] for j in keep], "file": "filtered.jsonl"}
    ev.write_json(out / "summary.json", summary)

    plt = ev.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    panels = (("CHES", ches), ("LN-CHES", ln_ches), ("last hidden inner product", last_ip),
              ("normalised edit distance", edit))
    for ax, (name, x) in zip(axes.ravel(), panels):
        ax.hist(x, bins=30)
        ax.set(title=name, ylabel="pairs")
    if args.keep_lowest is not None:
        axes[0, 1].axvline(summary["filtered"]["max_ln_ches_kept"], color="r", ls="--", label="kept ≤")
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(out / "ches.png", dpi=100)
    plt.close(fig)
    print(f"CHES median {summary['ches']['median']:.4g}, LN-CHES median {summary['ln_ches']['median']:.4g} "
          f"over {len(rows)} pairs -> {out}")
    return summary


if __name__ == "__main__":
    main()
