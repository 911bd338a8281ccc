"""Ranking accuracy, idealized ranking accuracy and the alignment gap (Chen et al. 2024).

    python -m eval.ranking --model hf:DIR [--reference hf:REF] --data pairs.jsonl --out DIR \
        [--limit N] [--betas 0.01 0.1 1 5 10] [--strict-ties] [--include-ties]

Writes ``ranking.json`` (summary), ``per_example.jsonl`` and ``margins.png`` / ``idealized.png`` /
``flip_threshold.png`` (the last two with ``--reference``) into ``--out``.

* R and R̃ (Def. 2.3, eq. 15) of ``--model`` on summed / per-token-mean response log-probs; exact ties
  count as correct (the paper's ≥) unless ``--strict-ties`` (the released code).
* With ``--reference`` only (Chen's π_ref, e.g. the SFT model ``--model`` was tuned from):
  R* and R̃* (Cor. 3.3) from the **reference** log-probs and the vote shares α of the data (``votes`` /
  ``pandalm`` / ``llmfao`` formats), clipped to [1e-3, 1 − 1e-3]. Data without votes uses the released
  code's fallback α = ``--fallback-alpha`` (0.75); ``idealized.alpha_source`` says which. Reported per β
  with min / median / max. Alignment gap = 100 · (median_β R* − R), in points. Difficulty (Chen Thm 4.1):
  quantiles of the flip threshold τ = softplus(−β c) with c = log π_ref(y_l) − log π_ref(y_w) at
  ``--beta``, and the four flip categories. Without ``--reference`` none of these is computed (R* of the
  evaluated model itself is not Chen's quantity, and its "gap" is meaningless); ``ranking.json`` then
  holds ``needs_reference`` saying so, and so does stdout. To use ``--model`` as its own reference, pass
  it to ``--reference`` as well.
* Ties (α = 0.5) are excluded from every accuracy by default (Chen Fig. 1, Tables 1 and 4). With
  ``--include-ties`` every accuracy uses the Def. C.1 rule (ε = 0.01), one rule on one scale per pair of
  metrics (``jaxpref.metrics.tie_rule_scores``, the released code's scales): summed log-probs for R and
  R*, the geometric-mean probability exp(mean log-prob) = 1/perplexity for R̃ and R̃*.
* **More than two responses** (``--data`` in a multi-response format such as ``ultrafeedback``, or the
  held-out prompts of a run trained on one; :mod:`jaxpref.data.multi_response`): every response is scored
  and R / R̃ are the **exact match** of the model's full ranking of the n responses with the human one
  (Chen et al. Def. A.8 / App. A.6, the UltraFeedback columns of Tables 2-4): ranks ``1 + #{j : s_j > s_i}``
  on both sides (``scipy.stats.rankdata(method="max")`` with rank 1 = best), so tied human scores need
  exactly equal log-probs. ``ranking.json`` then has ``metric: exact_match`` and ``per_example.jsonl`` one
  row per prompt (scores, log-probs, both rank vectors). R* is defined for pairs only: no ``--reference``;
  ``--strict-ties`` / ``--include-ties`` do not apply (ties are part of the rank vectors).
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
    p.add_argument("--reference", default=None, help="reference model spec (Chen's π_ref) for R* / R̃*, the "
                                                     "alignment gap and the difficulty (none without it); "
                                                     "tokenised with --model's tokenizer")
    common.add_data_args(p)
    common.add_common_args(p)
    p.add_argument("--betas", type=float, nargs="+", default=None, help="β grid for R* (default 0.01 0.1 1 5 10)")
    p.add_argument("--beta", type=float, default=0.1, help="β of the flip threshold / DPO loss (difficulty)")
    p.add_argument("--strict-ties", action="store_true", help="equal log-probs count as wrong (released code)")
    p.add_argument("--include-ties", action="store_true", help="keep α = 0.5 pairs (Def. C.1 tie rule)")
    p.add_argument("--fallback-alpha", type=float, default=0.75, help="α for data without votes (code default)")
    return p


NEEDS_REFERENCE = ("R* / R̃* (Chen et al. Cor. 3.3), the alignment gap and the flip difficulty (Thm 4.1) are "
                   "functions of the reference model's log-probs: pass --reference (e.g. the SFT model the evaluated "
                   "model was tuned from); without it only R / R̃ are reported")


def compute(model_scores, ref_scores, votes: np.ndarray, tie: np.ndarray, *, has_votes: bool, betas, beta: float,
            ties_correct: bool, include_ties: bool, fallback_alpha: float):
    """(summary dict, per-example columns) from :class:`jaxpref.evaluation.PairScores` of model and reference.

    ``ref_scores=None`` (no ``--reference``): R / R̃ only, and the summary's ``needs_reference`` says why.
    """
    from jaxpref import metrics

    alpha = np.asarray(votes, np.float32) if has_votes else np.full(len(votes), fallback_alpha, np.float32)
    tie = np.asarray(tie, bool) & has_votes
    keep = jnp.asarray(~tie | include_ties)
    s, c, m = (jnp.asarray(x) for x in (model_scores.sums, model_scores.counts, model_scores.means))

    plain = metrics.ranking_accuracy(s[:, 0], s[:, 1], c[:, 0], c[:, 1], keep, ties_correct=ties_correct)
    correct = np.array(metrics.ranking_correct(s[:, 0], s[:, 1], ties_correct=ties_correct))  # writable copies
    correct_n = np.array(metrics.ranking_correct(m[:, 0], m[:, 1], ties_correct=ties_correct))
    r, rn = float(plain.ranking.mean), float(plain.normalized.mean)
    if include_ties and tie.any():  # Def. C.1, the same rule and scale as R* / R̃* (metrics.tie_rule_scores)
        a = jnp.asarray(alpha)
        for cols, x, normalized in ((correct, s, False), (correct_n, m, True)):
            t1, t2 = (metrics.tie_rule_scores(x[:, i], normalized=normalized) for i in (0, 1))
            cols[tie] = np.asarray(metrics.ties_rule_correct(t1, t2, a))[tie]
        r, rn = float(correct.mean()), float(correct_n.mean())

    n_eval = int(np.sum(np.asarray(keep)))
    summary = {
        "n_pairs": int(len(votes)),
        "n_evaluated": n_eval,
        "n_ties": int(tie.sum()),
        "ties_included": include_ties,
        "ties_correct": ties_correct,
        "ranking_accuracy": r,
        "ranking_accuracy_normalized": rn,
        "exact_log_prob_ties": int(np.sum(np.asarray(s[:, 0] == s[:, 1]))),
    }
    columns = {"alpha": alpha, "correct": correct, "correct_normalized": correct_n, "evaluated": np.asarray(keep)}
    if ref_scores is None:
        summary["needs_reference"] = NEEDS_REFERENCE
        return summary, columns
    summary.update(_reference_metrics(s, ref_scores, alpha, keep, betas=betas, beta=beta, ties_correct=ties_correct,
                                      include_ties=include_ties, has_votes=has_votes, fallback_alpha=fallback_alpha,
                                      r=r, rn=rn, columns=columns))
    return summary, columns


def _reference_metrics(s, ref_scores, alpha, keep, *, betas, beta, ties_correct, include_ties, has_votes,
                       fallback_alpha, r, rn, columns) -> dict:
    """R* / R̃* per β, the alignment gap, the difficulty and the flip categories; adds per-example columns."""
    from jaxpref import metrics
    from jaxpref.evaluation import describe

    betas = tuple(metrics.DEFAULT_BETAS if betas is None else betas)
    rs, rm = jnp.asarray(ref_scores.sums), jnp.asarray(ref_scores.means)
    b, a = jnp.asarray(betas, jnp.float32), jnp.asarray(alpha)
    ideal = metrics.idealized_ranking_accuracy(rs[:, 0], rs[:, 1], a, b, keep, include_ties=include_ties)
    ideal_n = metrics.idealized_ranking_accuracy(rm[:, 0], rm[:, 1], a, b, keep, include_ties=include_ties,
                                                 normalized=True)
    summ, summ_n = metrics.beta_summary(ideal.mean), metrics.beta_summary(ideal_n.mean)
    d = metrics.example_difficulty(s[:, 0], s[:, 1], rs[:, 0], rs[:, 1], beta, ties_correct=ties_correct)
    kept = np.asarray(keep)
    fc = metrics.flip_categories(d.reference_correct, d.model_correct, d.dpo_loss, d.margin, keep)
    columns.update({"idealized_correct": np.asarray(metrics.idealized_correct(rs[:, 0], rs[:, 1], a, b)).T,  # [N, nβ]
                    "reference_log_ratio": np.asarray(d.ref_log_ratio),
                    "flip_threshold": np.asarray(d.flip_threshold), "dpo_loss": np.asarray(d.dpo_loss),
                    "reference_correct": np.asarray(d.reference_correct)})
    return {
        "idealized": {
            "alpha_source": "votes" if has_votes else f"fallback: no votes in the data, alpha = {fallback_alpha} "
                                                      "for every pair (simulate_proportion of the released code)",
            "alpha_clip": [metrics.ALPHA_EPS, 1 - metrics.ALPHA_EPS],
            "betas": list(betas),
            "per_beta": {str(bb): {"R_star": float(x), "R_star_normalized": float(y)}
                         for bb, x, y in zip(betas, np.asarray(ideal.mean), np.asarray(ideal_n.mean))},
            "R_star": {k: float(v) for k, v in summ.items()},
            "R_star_normalized": {k: float(v) for k, v in summ_n.items()},
        },
        "alignment_gap": float(metrics.alignment_gap(summ["median"], r)),
        "alignment_gap_normalized": float(metrics.alignment_gap(summ_n["median"], rn)),
        "difficulty": {
            "beta": beta,
            "reference_log_ratio": describe(np.asarray(d.ref_log_ratio)[kept]),
            "flip_threshold": describe(np.asarray(d.flip_threshold)[kept]),
            "reference_ranking_accuracy": float(np.mean(np.asarray(d.reference_correct)[kept])),
        },
        "flip_categories": {
            name: {"count": int(n), "share": float(sh), "mean_dpo_loss": float(lo), "mean_margin": float(mg)}
            for name, n, sh, lo, mg in zip(metrics.FLIP_CATEGORIES, np.asarray(fc.counts), np.asarray(fc.shares),
                                           np.asarray(fc.mean_loss), np.asarray(fc.mean_margin))},
    }


def _plots(out: pathlib.Path, model_scores, summary: dict, columns: dict) -> None:
    from jaxpref.evaluation import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].hist(model_scores.sums[:, 0] - model_scores.sums[:, 1], bins=30)
    ax[0].axvline(0, color="k", lw=0.8)
    ax[0].set(title=f"log π(y_w) − log π(y_l)   R = {summary['ranking_accuracy']:.3f}", xlabel="summed log-ratio")
    ax[1].hist(model_scores.means[:, 0] - model_scores.means[:, 1], bins=30)
    ax[1].axvline(0, color="k", lw=0.8)
    ax[1].set(title=f"per-token   R̃ = {summary['ranking_accuracy_normalized']:.3f}", xlabel="mean log-ratio")
    fig.tight_layout()
    fig.savefig(out / "margins.png", dpi=100)
    plt.close(fig)
    if "idealized" not in summary:  # no reference: R / R̃ only
        return

    ideal = summary["idealized"]
    betas = ideal["betas"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(betas, [ideal["per_beta"][str(b)]["R_star"] for b in betas], "o-", label="R*")
    ax.plot(betas, [ideal["per_beta"][str(b)]["R_star_normalized"] for b in betas], "s-", label="R̃*")
    ax.axhline(summary["ranking_accuracy"], color="C0", ls="--", label="R")
    ax.axhline(summary["ranking_accuracy_normalized"], color="C1", ls=":", label="R̃")
    ax.set(xscale="log", xlabel="β", ylabel="accuracy", ylim=(0, 1.02), title="idealized ranking accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "idealized.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(columns["flip_threshold"], bins=30)
    ax.set(xlabel=f"flip threshold τ (β = {summary['difficulty']['beta']})", ylabel="pairs", title="difficulty")
    fig.tight_layout()
    fig.savefig(out / "flip_threshold.png", dpi=100)
    plt.close(fig)


def compute_multi(sums: list[np.ndarray], means: list[np.ndarray], human: list[np.ndarray]) -> tuple[dict, dict]:
    """(summary, per-prompt columns): exact-match ranking accuracy over n responses (Chen Def. A.8 / App. A.6)
    on summed (R) and per-token mean (R̃) log-probs; per prompt ``[n]`` arrays, padded with ``-inf``
    (:func:`jaxpref.data.multi_response.padded_scores`), which never changes a match."""
    from jaxpref import metrics
    from jaxpref.data.multi_response import padded_scores

    h = jnp.asarray(padded_scores(human))
    cols = {"human_rank": np.asarray(metrics.competition_ranks(h))}
    summary = {"metric": "exact_match", "n_prompts": len(human),
               "responses_per_prompt": {str(k): int(v) for k, v in zip(*np.unique([len(x) for x in human],
                                                                                  return_counts=True))},
               "prompts_with_tied_human_scores": int(sum(len(set(x.tolist())) < len(x) for x in human))}
    for key, values in (("ranking_accuracy", sums), ("ranking_accuracy_normalized", means)):
        m = jnp.asarray(padded_scores(values))
        summary[key] = float(metrics.exact_match_ranking(m, h).mean)
        rank = np.asarray(metrics.competition_ranks(m))
        cols["model_rank" if key == "ranking_accuracy" else "model_rank_normalized"] = rank
        cols["correct" if key == "ranking_accuracy" else "correct_normalized"] = np.all(rank == cols["human_rank"], -1)
    return summary, cols


def _main_multi(args, ev, model, tok, records, rejects, out: pathlib.Path) -> dict:
    """eval.ranking on multi-response records: score every response, exact-match R / R̃ (module docstring)."""
    from jaxpref.data import multi_response
    from jaxpref.data.sources import DataError

    if args.reference:
        raise DataError(f"--reference {args.reference}: R* / R̃* (Chen et al. Cor. 3.3) are defined for pairs; "
                        f"{args.data} holds n > 2 responses per prompt (exact-match ranking accuracy only)")
    records = records[: args.limit] if args.limit else records
    sp = multi_response.scoring_pairs(records, tok, common.tokenize_config(args), rejects=rejects)
    if not sp.records:
        raise DataError(f"{args.data}: no usable multi-response rows ({rejects.summary()})")
    scores = ev.score_pairs(model, sp.pairs, batch_size=args.batch_size, progress=not args.no_progress, desc="model")
    sums, means = sp.response_scores(scores.sums), sp.response_scores(scores.means)
    summary, cols = compute_multi(sums, means, [np.asarray(r.scores, np.float32) for r in sp.records])
    summary = {"model": args.model, "data": str(args.data), "rows_rejected": len(rejects), **summary,
               "scoring": {"model": scores.stats.to_json()}}
    ev.write_json(out / "ranking.json", summary)
    ev.write_jsonl(out / "per_example.jsonl", [
        {"id": r.id, "row": r.row, "n": len(r.scores), "scores": list(r.scores), "logp": sums[i].tolist(),
         "logp_mean": means[i].tolist(), "human_rank": cols["human_rank"][i, :len(r.scores)].tolist(),
         "model_rank": cols["model_rank"][i, :len(r.scores)].tolist(),
         "model_rank_normalized": cols["model_rank_normalized"][i, :len(r.scores)].tolist(),
         "correct": bool(cols["correct"][i]), "correct_normalized": bool(cols["correct_normalized"][i])}
        for i, r in enumerate(sp.records)])
    print(f"R = {summary['ranking_accuracy']:.4f}  R̃ = {summary['ranking_accuracy_normalized']:.4f}  (exact match "
          f"over {summary['responses_per_prompt']} responses per prompt) -> {out / 'ranking.json'}")
    return summary


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    common.setup_logging()
    from jaxpref import evaluation as ev
    from jaxpref.data import multi_response

    out = pathlib.Path(args.out)
    try:
        loaded, tok = ev.load_model_and_tokenizer(args.model, args.tokenizer)
        source = multi_response.load_records(args.data, format=args.format, split=args.split)
        if multi_response.is_multi(source[0]):
            return _main_multi(args, ev, loaded.model, tok, source[0], source[1], out)
        data = ev.load_eval_pairs(args.data, tok, format=args.format, split=args.split, limit=args.limit,
                                  tokenize=common.tokenize_config(args), loaded=source)
        kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
        scores = ev.score_pairs(loaded.model, data.pairs, desc="model", **kw)
        del loaded
        ref_scores = None
        if args.reference:
            from jaxpref.loading import check_vocab, load_model

            ref = load_model(args.reference)
            check_vocab(ref.model, tok, args.reference)
            ref_scores = ev.score_pairs(ref.model, data.pairs, desc="reference", **kw)
    except common.expected_errors() as err:
        common.fail(err)
    summary, cols = compute(scores, ref_scores, data.pairs.votes, data.pairs.tie, has_votes=data.has_votes,
                            betas=args.betas, beta=args.beta, ties_correct=not args.strict_ties,
                            include_ties=args.include_ties, fallback_alpha=args.fallback_alpha)
    summary = {"model": args.model, "reference": args.reference, "data": str(args.data),
               "rows_rejected": len(data.rejects), **summary,
               "scoring": {"model": scores.stats.to_json(),
                           **({"reference": ref_scores.stats.to_json()} if ref_scores is not None else {})}}
    ev.write_json(out / "ranking.json", summary)
    rows = []
    for i, rid in enumerate(data.pairs.ids):
        row = {"id": rid, "row": int(data.pairs.row[i]), "alpha": float(cols["alpha"][i]),
               "tie": bool(data.pairs.tie[i]),
               "evaluated": bool(cols["evaluated"][i]),
               "chosen_logp": float(scores.sums[i, 0]), "rejected_logp": float(scores.sums[i, 1]),
               "chosen_tokens": int(scores.counts[i, 0]), "rejected_tokens": int(scores.counts[i, 1]),
               "chosen_logp_mean": float(scores.means[i, 0]), "rejected_logp_mean": float(scores.means[i, 1]),
               "correct": bool(cols["correct"][i]), "correct_normalized": bool(cols["correct_normalized"][i])}
        if ref_scores is not None:
            row.update(idealized_correct={str(b): bool(x) for b, x in zip(summary["idealized"]["betas"],
                                                                          cols["idealized_correct"][i])},
                       reference_log_ratio=float(cols["reference_log_ratio"][i]),
                       flip_threshold=float(cols["flip_threshold"][i]),
                       ref_chosen_logp=float(ref_scores.sums[i, 0]), ref_rejected_logp=float(ref_scores.sums[i, 1]),
                       reference_correct=bool(cols["reference_correct"][i]), dpo_loss=float(cols["dpo_loss"][i]))
        rows.append(row)
    ev.write_jsonl(out / "per_example.jsonl", rows)
    _plots(out, scores, summary, cols)
    line = f"R = {summary['ranking_accuracy']:.4f}  R̃ = {summary['ranking_accuracy_normalized']:.4f}  "
    if ref_scores is None:
        line += f"(no --reference: {NEEDS_REFERENCE})  "
    else:
        line += (f"R* median = {summary['idealized']['R_star']['median']:.4f}  "
                 f"gap = {summary['alignment_gap']:.1f} pts  ")
    print(f"{line}-> {out / 'ranking.json'}")
    return summary


if __name__ == "__main__":
    main()
