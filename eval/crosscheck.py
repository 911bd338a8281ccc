"""Independent cross-check of jaxpref's summed response log-probs against plain PyTorch ``transformers``.

    python -m eval.crosscheck --model gguf:FILE --data pairs.jsonl --out DIR [--limit 200]

The same tokenised pairs (jaxpref's data pipeline: chat template, truncation, EOS) are scored twice:

* by jaxpref (:func:`jaxpref.evaluation.score_pairs`: the Flax port, chunked log-softmax in float32);
* by a ``transformers`` ``AutoModelForCausalLM`` loaded by transformers' own code from the same file
  (``gguf_file=`` for GGUF, ``from_pretrained(DIR)`` for an HF directory), float32, one full-logits
  ``log_softmax`` per sequence — nothing of jaxpref's model code, conversion or log-prob code is used.

It also checks that jaxpref's tokenizer and transformers' tokenizer (both read from the file) encode the
raw response strings identically. ``crosscheck.json`` holds the per-example ranking agreement (chosen ≻
rejected on summed and on per-token-mean log-probs), the largest absolute log-prob difference, R and R̃
from both implementations, and ``passed`` against ``--min-agreement`` / ``--max-abs-diff`` (the defaults
are the acceptance thresholds of the evaluation issue: 99.5% and 1e-2). ``per_example.jsonl`` has both
implementations' numbers per pair. The process exits 1 when the check fails.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from eval import common


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="gguf:FILE or hf:DIR (read by both implementations)")
    common.add_data_args(p)
    common.add_common_args(p)
    p.add_argument("--torch-batch", type=int, default=4, help="sequences per PyTorch forward")
    p.add_argument("--min-agreement", type=float, default=0.995, help="pass threshold on ranking agreement")
    p.add_argument("--max-abs-diff", type=float, default=1e-2, help="pass threshold on |Δ log-prob|")
    return p


def load_torch_model(spec: str):
    """A float32 ``transformers`` causal LM (and tokenizer) read by transformers itself from ``spec``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxpref.loading import gguf_path

    kind, _, path = spec.partition(":")
    p = pathlib.Path(path)
    if kind == "gguf":
        p = gguf_path(path)  # a file, or a packaged name such as smollm2-135m-instruct
        kw = {"gguf_file": p.name}
        where = str(p.parent)
    elif kind == "hf":
        kw, where = {}, str(p)
    else:
        raise ValueError(f"--model {spec!r}: the cross-check reads gguf:FILE or hf:DIR")
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(where, **kw)


def torch_sequence_logps(model, sequences: list[np.ndarray], prompt_lengths: list[int], *, batch: int = 4,
                         progress: bool = True) -> np.ndarray:
    """``[n]`` float64 summed log-probs of ``sequence[prompt_len:]`` given its prefix (full-logits reference).

    Sequences are right padded inside a batch with an attention mask (causal attention never sees the
    padding of a right-padded row), sorted by length to limit padding.
    """
    import torch

    from jaxpref.training.logging import progress_bar

    order = np.argsort([len(s) for s in sequences])
    out = np.zeros(len(sequences), np.float64)
    bar = progress_bar((len(order) + batch - 1) // batch, enabled=progress, desc="torch")
    with torch.no_grad():
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            t = max(len(sequences[i]) for i in rows)
            ids = torch.zeros((len(rows), t), dtype=torch.long)
            att = torch.zeros((len(rows), t), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, :len(sequences[i])] = torch.as_tensor(sequences[i], dtype=torch.long)
                att[j, :len(sequences[i])] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.double(), dim=-1)
            for j, i in enumerate(rows):
                n, p = len(sequences[i]), prompt_lengths[i]
                targets = ids[j, p:n]
                out[i] = logp[j, p - 1:n - 1].gather(-1, targets[:, None]).sum().item()
            bar.update(1)
    bar.close()
    return out


def tokenizer_agreement(jax_tok, torch_tok, texts: list[str]) -> float:
    """Share of ``texts`` that both tokenizers encode to the same ids (no special tokens)."""
    same = [list(jax_tok.encode(s, add_special_tokens=False)) == list(torch_tok.encode(s, add_special_tokens=False))
            for s in texts]
    return float(np.mean(same)) if same else 1.0


def compare(jax_sums: np.ndarray, torch_sums: np.ndarray, counts: np.ndarray) -> dict:
    """Agreement statistics of two ``[N, 2]`` summed log-prob arrays (``[:, 0]`` chosen)."""
    diff = np.abs(jax_sums.astype(np.float64) - torch_sums)
    j_correct, t_correct = jax_sums[:, 0] > jax_sums[:, 1], torch_sums[:, 0] > torch_sums[:, 1]
    jm, tm = jax_sums / np.maximum(counts, 1), torch_sums / np.maximum(counts, 1)
    jn_correct, tn_correct = jm[:, 0] > jm[:, 1], tm[:, 0] > tm[:, 1]
    return {
        "n_pairs": int(len(jax_sums)),
        "ranking_agreement": float(np.mean(j_correct == t_correct)),
        "ranking_agreement_normalized": float(np.mean(jn_correct == tn_correct)),
        "max_abs_logp_diff": float(diff.max()),
        "mean_abs_logp_diff": float(diff.mean()),
        "max_rel_logp_diff": float((diff / np.maximum(np.abs(torch_sums), 1.0)).max()),
        "jaxpref": {"ranking_accuracy": float(j_correct.mean()),
                    "ranking_accuracy_normalized": float(jn_correct.mean())},
        "transformers": {"ranking_accuracy": float(t_correct.mean()),
                         "ranking_accuracy_normalized": float(tn_correct.mean())},
    }


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    common.setup_logging()
    from jaxpref import evaluation as ev

    out = pathlib.Path(args.out)
    progress = not args.no_progress
    try:
        loaded, tok = ev.load_model_and_tokenizer(args.model)
        data = ev.load_eval_pairs(args.data, tok, format=args.format, split=args.split, limit=args.limit,
                                  tokenize=common.tokenize_config(args))
        scores = ev.score_pairs(loaded.model, data.pairs, batch_size=args.batch_size, progress=progress, desc="jaxpref")
        del loaded
        torch_model, torch_tok = load_torch_model(args.model)
    except (*common.expected_errors(), ValueError) as err:
        common.fail(err)
    pairs = data.pairs
    seqs, plens = [], []
    for i in range(len(pairs)):
        for resp in (pairs.chosen[i], pairs.rejected[i]):
            seqs.append(np.concatenate([pairs.prompt[i], resp]))
            plens.append(len(pairs.prompt[i]))
    torch_sums = torch_sequence_logps(torch_model, seqs, plens, batch=args.torch_batch,
                                      progress=progress).reshape(-1, 2)
    summary = compare(scores.sums, torch_sums, scores.counts)
    texts = [t for r in data.records for t in (r.chosen, r.rejected) if isinstance(t, str)]
    summary["tokenizer_agreement"] = tokenizer_agreement(tok, torch_tok, texts)
    summary["passed"] = bool(summary["ranking_agreement"] >= args.min_agreement
                             and summary["max_abs_logp_diff"] <= args.max_abs_diff)
    summary = {"model": args.model, "data": str(args.data), "limit": args.limit, "max_length": args.max_length,
               "thresholds": {"min_agreement": args.min_agreement, "max_abs_diff": args.max_abs_diff}, **summary}
    ev.write_json(out / "crosscheck.json", summary)
    ev.write_jsonl(out / "per_example.jsonl", [
        {"id": pairs.ids[i], "row": int(pairs.row[i]), "jaxpref_chosen": float(scores.sums[i, 0]),
         "jaxpref_rejected": float(scores.sums[i, 1]), "torch_chosen": float(torch_sums[i, 0]),
         "torch_rejected": float(torch_sums[i, 1]), "chosen_tokens": int(scores.counts[i, 0]),
         "rejected_tokens": int(scores.counts[i, 1])} for i in range(len(pairs))])
    print(f"{summary['n_pairs']} pairs: agreement {summary['ranking_agreement']:.4f}, "
          f"max |Δ logp| {summary['max_abs_logp_diff']:.2e}, R {summary['jaxpref']['ranking_accuracy']:.3f} "
          f"(transformers {summary['transformers']['ranking_accuracy']:.3f}), passed={summary['passed']}")
    if not summary["passed"]:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
