"""Pairwise win rate of a policy against a competitor under a judge, with a bootstrap interval.

    python -m eval.win_rate --policy run:RUN --competitor hf:REF --judge rm:RM_RUN --prompts prompts.jsonl \
        --out DIR [--limit 500] [--max-new-tokens 128] [--temperature 0.7] [--tie-rule half]

One response per prompt is sampled from each model (the same seed per prompt; prompts rendered as in
training, e.g. with the chat template). The judge sees the two responses in a random order per prompt
(``--no-swap`` turns this off) and returns P(first ≻ second); this is mapped back to
P(policy ≻ competitor). Judges: ``module:function`` or ``path/file.py:function`` taking
``(prompts, responses_a, responses_b)`` and returning P(a ≻ b), or ``rm:RUN_DIR[@STEP]`` (a
``train.reward_model`` run: σ(r(a) − r(b))).

Writes ``win_rate.json`` (``win_rate``, ``ci_low``, ``ci_high``, ``n``, ``tie_rule``, the h-win rates for
h = identity / logit / log, settings), ``samples.jsonl`` and ``win_rate.png`` into ``--out``. Ties
(``|p − 0.5| ≤ --tie-eps``) follow ``--tie-rule``: ``half`` (count ½), ``exclude`` or ``loss``;
``--hard`` turns probabilities into win / loss / tie verdicts first.
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
    p.add_argument("--policy", required=True, help="model spec of the evaluated policy")
    p.add_argument("--competitor", required=True, help="model spec of the competitor (e.g. the reference)")
    p.add_argument("--judge", required=True, help="module:function, path/file.py:function or rm:RUN_DIR[@STEP]")
    p.add_argument("--prompts", required=True, help=".txt (one per line), rows with 'prompt', or a pair dataset")
    p.add_argument("--format", default="auto", help="format of --prompts when it is a pair dataset")
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None, help="first N prompts")
    p.add_argument("--tokenizer", default=None, help="policy tokenizer spec (default: the policy's)")
    p.add_argument("--competitor-tokenizer", default=None, help="competitor tokenizer spec (default: its own)")
    p.add_argument("--max-prompt-length", type=int, default=512, help="prompt tokens kept (from the end)")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling, position and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tie-rule", choices=("half", "exclude", "loss"), default="half")
    p.add_argument("--tie-eps", type=float, default=0.0)
    p.add_argument("--hard", action="store_true", help="count verdicts (p > 0.5 win) instead of probabilities")
    p.add_argument("--no-swap", action="store_true", help="always show the policy's response first")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the interval")
    common.add_common_args(p)
    return p


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    common.setup_logging()
    from jaxpref import evaluation as ev
    from jaxpref import metrics
    from jaxpref.data.tokenize import TokenizeConfig

    out = pathlib.Path(args.out)
    tcfg = TokenizeConfig(max_length=args.max_prompt_length + 1, chat_template=not args.no_chat_template)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               seed=args.seed, batch_size=args.batch_size, tokenize=tcfg, progress=not args.no_progress)
    try:
        ids, prompts = ev.load_prompts(args.prompts, format=args.format, split=args.split, limit=args.limit)
        responses = {}
        for role, spec, tok_spec in (("policy", args.policy, args.tokenizer),
                                     ("competitor", args.competitor, args.competitor_tokenizer)):
            loaded, tok = ev.load_model_and_tokenizer(spec, tok_spec)
            responses[role] = ev.generate_responses(loaded.model, tok, prompts, desc=role, **gen)
            del loaded
        judge = ev.load_judge(args.judge)
    except common.expected_errors() as err:
        common.fail(err)
    swaps = (np.zeros(len(prompts), bool) if args.no_swap
             else metrics.position_swaps(len(prompts), args.seed))
    first, second = metrics.order_pair(responses["policy"], responses["competitor"], swaps)
    p_first = np.asarray(judge(prompts, first, second), np.float64)
    p = metrics.unswap(p_first, swaps)
    kw = dict(tie_rule=args.tie_rule, hard=args.hard, tie_eps=args.tie_eps)
    values, keep = (np.asarray(x) for x in metrics.verdict_values(jnp.asarray(p), **kw))
    h_rates = {h: float(metrics.win_rate(jnp.asarray(p), h=h, **kw).mean) for h in metrics.H_FUNCTIONS}
    lo, hi = metrics.bootstrap_ci(values, keep, n_boot=args.n_boot, level=args.level, seed=args.seed)
    tie = np.abs(p - 0.5) <= args.tie_eps
    summary = {
        "win_rate": h_rates["identity"], "ci_low": lo, "ci_high": hi, "n": int(keep.sum()), "n_prompts": len(prompts),
        "n_ties": int(tie.sum()), "tie_rule": args.tie_rule, "tie_eps": args.tie_eps, "hard_verdicts": args.hard,
        "h_win_rates": h_rates, "ci_level": args.level, "n_boot": args.n_boot,
        "position_randomized": not args.no_swap, "policy_first_share": float(np.mean(~swaps)),
        "policy": args.policy, "competitor": args.competitor, "judge": args.judge, "prompts": str(args.prompts),
        "sampling": {k: gen[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")},
    }
    ev.write_json(out / "win_rate.json", summary)
    ev.write_jsonl(out / "samples.jsonl", [
        {"id": i, "prompt": pr, "policy_response": a, "competitor_response": b, "policy_first": not bool(s),
         "p_first": float(pf), "p_policy": float(pp)}
        for i, pr, a, b, s, pf, pp in zip(ids, prompts, responses["policy"], responses["competitor"], swaps,
                                          p_first, p)])
    plt = ev.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(p, bins=20, range=(0, 1))
    ax.axvline(summary["win_rate"], color="r", ls="--", label=f"win rate {summary['win_rate']:.3f}")
    ax.set(xlabel="P(policy ≻ competitor)", ylabel="prompts", title="judge preferences")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "win_rate.png", dpi=100)
    plt.close(fig)
    print(f"win rate {summary['win_rate']:.4f} [{lo:.4f}, {hi:.4f}] over {summary['n']} prompts "
          f"(ties: {args.tie_rule}) -> {out / 'win_rate.json'}")
    return summary


if __name__ == "__main__":
    main()
