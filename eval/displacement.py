"""Likelihood displacement and flip categories over the checkpoints of a training run (Razin; Chen).

    python -m eval.displacement --run RUN_DIR [--data pairs.jsonl] --out DIR [--limit N] [--beta 0.1]

Scores the pairs under the run's **initial** policy (step 0: ``model.source`` rebuilt with the run's seed
and overrides) and under every committed checkpoint, with the run's own tokenizer and tokenisation
settings (``config.yaml``). ``--data`` defaults to the run's ``data.train`` (and ``--limit`` to its
``data.limit``; with ``data.eval_split`` that includes the held-out rows); ``--data heldout:RUN_DIR``
scores only the rows the run held out, the numbers ``train.eval_every`` logs as ``eval/...``. The
reference for flip categories and the DPO loss is ``reference.source`` when the run
set one, else the initial policy.

Writes into ``--out``:

* ``displacement.json``: per step the mean chosen / rejected log-prob, their mean change from step 0
  (Razin's ``preferred_logprobs_change_mean``), the share of pairs whose chosen log-prob fell, ranking
  accuracy, mean DPO loss at ``--beta`` and the four flip-category shares (Chen Figs. 2, 5-7);
  ``likelihood_displacement`` (Razin Def. 1: the loss fell and the mean chosen log-prob fell) at the
  last step;
* ``per_example.jsonl``: chosen / rejected log-probs of every pair at every step;
* ``logps.png`` and ``flip_categories.png``.
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
    p.add_argument("--run", required=True, help="jaxpref run directory")
    p.add_argument("--data", default=None, help="pairs (default: the run's data.train); heldout:RUN_DIR for the "
                                                 "rows the run held out")
    p.add_argument("--format", default=None, help="data format (default: the run's)")
    p.add_argument("--limit", type=int, default=None, help="first N pairs (default: the run's data.limit)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="checkpoint steps (default: all)")
    p.add_argument("--beta", type=float, default=None, help="β of the DPO loss (default: the run's, else 0.1)")
    p.add_argument("--batch-size", type=int, default=8)
    common.add_common_args(p)
    return p


def _run_beta(cfg) -> float:
    for term in cfg.loss:
        if "beta" in term.hparams:
            return float(term.hparams["beta"])
    return 0.1


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    common.setup_logging()
    from jaxpref import evaluation as ev
    from jaxpref import metrics
    from jaxpref.config import RunConfig, load_config
    from jaxpref.loading import load_model, load_tokenizer
    from jaxpref.training.loop import tokenize_config

    run = pathlib.Path(args.run).expanduser().resolve()
    out = pathlib.Path(args.out)
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
    try:
        cfg = load_config(RunConfig, run / "config.yaml")
        tok = load_tokenizer(f"run:{run}")
        source = args.data or cfg.data.train
        data = ev.load_eval_pairs(source, tok, format=args.format or cfg.data.format, split=cfg.data.split,
                                  limit=args.limit if args.limit is not None else cfg.data.limit,
                                  tokenize=tokenize_config(cfg), fields=cfg.data.fields or None)
        steps = ev.run_checkpoint_steps(run)
        if args.steps:
            missing = sorted(set(args.steps) - set(steps))
            if missing:
                raise ev.SpecError(f"run {run}: no checkpoint for steps {missing} (available: {steps})")
            steps = sorted(set(args.steps))
        init = load_model(cfg.model.source, overrides=cfg.model.overrides, seed=cfg.train.seed,
                          dtype=cfg.model.compute_dtype, param_dtype=cfg.model.param_dtype)
        scored = {0: ev.score_pairs(init.model, data.pairs, desc="step 0", **kw)}
        del init
        ref = scored[0].sums
        if cfg.reference.source:
            scored["reference"] = ev.score_pairs(load_model(cfg.reference.source).model, data.pairs,
                                                 desc="reference", **kw)
            ref = scored["reference"].sums
        for s in steps:
            scored[s] = ev.score_pairs(load_model(f"run:{run}@{s}").model, data.pairs, desc=f"step {s}", **kw)
        logps = {k: v.sums for k, v in scored.items() if k != "reference"}
    except common.expected_errors() as err:
        common.fail(err)

    beta = args.beta if args.beta is not None else _run_beta(cfg)
    rc, rr = jnp.asarray(ref[:, 0]), jnp.asarray(ref[:, 1])
    init_lp = jnp.asarray(logps[0])
    per_step = []
    for s, lp in logps.items():
        lp = jnp.asarray(lp)
        ch = metrics.displacement_stats(init_lp[:, 0], lp[:, 0])
        rj = metrics.displacement_stats(init_lp[:, 1], lp[:, 1])
        d = metrics.example_difficulty(lp[:, 0], lp[:, 1], rc, rr, beta)
        fc = metrics.flip_categories(d.reference_correct, d.model_correct, d.dpo_loss, d.margin)
        per_step.append({
            "step": s,
            "chosen_logp_mean": float(jnp.mean(lp[:, 0])), "rejected_logp_mean": float(jnp.mean(lp[:, 1])),
            "chosen_change_mean": float(ch.change_tally.mean), "rejected_change_mean": float(rj.change_tally.mean),
            "fraction_chosen_displaced": float(ch.displaced_tally.mean),
            "ranking_accuracy": float(jnp.mean(d.model_correct)), "dpo_loss_mean": float(jnp.mean(d.dpo_loss)),
            "flip_categories": {n: float(x) for n, x in zip(metrics.FLIP_CATEGORIES, np.asarray(fc.shares))},
        })
    first, last = per_step[0], per_step[-1]
    displaced = bool(metrics.is_displaced(jnp.asarray(last["chosen_change_mean"]), jnp.asarray(first["dpo_loss_mean"]),
                                          jnp.asarray(last["dpo_loss_mean"])))
    summary = {"run": str(run), "data": str(source), "n_pairs": len(data.pairs), "beta": beta,
               "reference": cfg.reference.source or f"initial policy ({cfg.model.source})",
               "steps": list(logps), "per_step": per_step,
               "likelihood_displacement": displaced,
               "final": {"step": last["step"], "chosen_change_mean": last["chosen_change_mean"],
                         "fraction_chosen_displaced": last["fraction_chosen_displaced"],
                         "dpo_loss_change": last["dpo_loss_mean"] - first["dpo_loss_mean"]},
               "scoring": {str(k): v.stats.to_json() for k, v in scored.items()}}
    ev.write_json(out / "displacement.json", summary)
    ev.write_jsonl(out / "per_example.jsonl", [
        {"id": rid, "row": int(data.pairs.row[i]),
         "chosen_logp": {str(s): float(lp[i, 0]) for s, lp in logps.items()},
         "rejected_logp": {str(s): float(lp[i, 1]) for s, lp in logps.items()}}
        for i, rid in enumerate(data.pairs.ids)])

    plt = ev.pyplot()
    xs = [r["step"] for r in per_step]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, [r["chosen_logp_mean"] for r in per_step], "o-", label="chosen")
    ax.plot(xs, [r["rejected_logp_mean"] for r in per_step], "s-", label="rejected")
    ax.set(xlabel="step", ylabel="mean log-prob", title="log-probs over training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "logps.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in metrics.FLIP_CATEGORIES:
        ax.plot(xs, [r["flip_categories"][name] for r in per_step], "o-", label=name)
    ax.set(xlabel="step", ylabel="share of pairs", ylim=(0, 1), title="flip categories (ref -> model)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "flip_categories.png", dpi=100)
    plt.close(fig)
    print(f"steps {xs}: chosen log-prob change {last['chosen_change_mean']:+.3f}, "
          f"displaced {last['fraction_chosen_displaced']:.2f} -> {out / 'displacement.json'}")
    return summary


if __name__ == "__main__":
    main()
