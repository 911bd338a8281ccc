"""DPO train step, steady state: jaxpref's jitted preference step vs TRL 1.16 ``DPOTrainer`` (CPU, float32).

    python bench/dpo_step_vs_trl.py                                   # 4x256, seq 256, 4 pairs (minutes)
    python bench/dpo_step_vs_trl.py --sizes 4x256,8x512,12x768 --seq 256,512   # the full grid (long)
    python bench/dpo_step_vs_trl.py --frameworks jax,trl,trl:1 --rounds 2       # + TRL on 1 torch thread

Both sides get the same Llama-architecture model (random init by jaxpref, exported with
``save_hf`` and loaded by ``transformers``: the same weights), the same batch of pairs (the
same token ids, prompt / response split and padded length ``T``), sigmoid DPO (beta 0.1) with a
frozen live reference (TRL: ``ref_model=copy.deepcopy(model)``), AdamW with the same lr,
clip 1.0, constant schedule, no gradient checkpointing. TRL's own dataset tokenisation is
skipped (``_prepare_dataset`` returns the pre-tokenised ids) and its per-step time is the
interval between consecutive ``on_step_end`` callbacks (data collation included). jaxpref is
timed around each call with ``block_until_ready``. Each framework runs in its own subprocess,
which reports its peak RSS (``ru_maxrss``). Tokens/s counts real (non-padding) tokens of
chosen + rejected; ``model_gflops_per_s`` uses :func:`jaxpref.training.mfu.step_flops`
(padded tokens, reference forward counted once). ``--rounds`` alternates the frameworks and
pools their step times, so a change in machine load hits both. On a loaded machine torch's
default 2 OpenMP threads can stall (steps 10x slower at times): ``trl:1`` shows the 1-thread case.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

# ----------------------------------------------------------------------------------- workers


def worker_jax(args, pairs) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxpref import losses, models
    from jaxpref.config import OptimConfig
    from jaxpref.training import optim
    from jaxpref.training import step as S
    from jaxpref.types import PairBatch

    arrays = _common.pair_arrays(pairs)
    seg = arrays["segment_ids"]
    batch = jax.device_put(PairBatch(**arrays))
    model = models.load_hf(args.dir)
    graphdef, params, rest = S.split_model(model)
    opt, _ = optim.make_optimizer(OptimConfig(name="adamw", lr=args.lr, clip_norm=1.0), args.steps)
    comp = losses.compose([{"name": "sigmoid", "beta": 0.1}])
    state = S.build_state(params, opt, 0)
    ref = jax.tree.map(jnp.copy, params)  # a frozen copy, as TRL's deepcopy
    del model, params
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference="live", seq_chunk=args.seq_chunk,
                                        vocab_chunk=args.vocab_chunk), donate_argnums=(0,))
    t0 = time.perf_counter()
    state, m = fn(state, ref, batch, None)
    losses_ = [float(m["loss"])]
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps - 1):
        t0 = time.perf_counter()
        state, m = fn(state, ref, batch, None)
        jax.block_until_ready((state, m))
        if i >= args.warmup - 1:
            times.append(time.perf_counter() - t0)
        losses_.append(float(m["loss"]))
    out = {"step": _common.summarize(times), "first_step_incl_compile_s": compile_s, "losses": losses_,
           "real_tokens": int(seg.sum()), "padded_tokens": int(seg.size)}
    if args.profile:
        def one():
            nonlocal state
            state, m = fn(state, ref, batch, None)
            jax.block_until_ready((state, m))

        out["op_ms_per_step"] = _common.op_profile(one, steps=2)
    return out


def worker_trl(args, pairs) -> dict:
    import copy

    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from jaxpref.testing.tokenizers import make_tokenizer

    ids, plen, total = pairs["ids"], pairs["prompt_len"], pairs["total"]
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in range(len(ids)):
        rows["prompt_ids"].append(ids[i, 0, :plen[i]].tolist())
        rows["chosen_ids"].append(ids[i, 0, plen[i]:total[i, 0]].tolist())
        rows["rejected_ids"].append(ids[i, 1, plen[i]:total[i, 1]].tolist())

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

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    per_device_train_batch_size=len(ids), gradient_accumulation_steps=1,
                    max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", beta=0.1,
                    loss_type=["sigmoid"], gradient_checkpointing=False, max_length=None,
                    pad_to_multiple_of=ids.shape[-1], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    clock = Clock()
    trainer = PreTokenized(model=model, ref_model=copy.deepcopy(model), args=cfg,
                           train_dataset=Dataset.from_dict(rows), processing_class=make_tokenizer(),
                           callbacks=[clock])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    ends = clock.ends
    times = list(np.diff(ends[args.warmup - 1:]))
    return {"step": _common.summarize(times), "first_step_s": ends[0] - t0, "train_wall_s": wall,
            "losses": clock.losses, "torch_threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,
            "real_tokens": int(total.sum()), "padded_tokens": int(total.size * ids.shape[-1])}


def run_worker(args) -> None:
    pairs = dict(np.load(os.path.join(args.dir, "pairs.npz")))
    load0 = _common.load_avg()
    out = (worker_jax if args.worker == "jax" else worker_trl)(args, pairs)
    out.update(peak_rss_mib=_common.peak_rss_mib(), load_avg_before=load0, load_avg_after=_common.load_avg())
    print("RESULT " + json.dumps(out))


# ----------------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4x256", help="comma list of LAYERSxHIDDEN (heads = hidden / 64)")
    p.add_argument("--seq", default="256", help="comma list of sequence lengths T")
    p.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=8, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first includes compilation)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seq-chunk", type=int, default=128)
    p.add_argument("--vocab-chunk", type=int, default=8192)
    p.add_argument("--frameworks", default="jax,trl",
                   help="comma list of jax, trl, trl:N (TRL with torch.set_num_threads(N))")
    p.add_argument("--rounds", type=int, default=1, help="alternating jax/trl rounds (timings pooled)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/dpo_step_vs_trl.json)")
    p.add_argument("--profile", action="store_true",
                   help="also record jaxpref's ms/step per XLA op kind (perfetto trace; 2 extra steps)")
    p.add_argument("--worker", choices=("jax", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--torch-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    if args.worker:
        return run_worker(args)

    from jaxpref import models
    from jaxpref.training import mfu

    def spawn(spec: str, d: str) -> dict:
        fw, _, threads = spec.partition(":")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", fw, "--dir", d, "--torch-threads", threads or "0"]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if args.profile and fw == "jax":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"{fw} worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(lines[-1][7:])

    results, load0 = [], _common.load_avg()
    for size in args.sizes.split(","):
        for seq in (int(s) for s in args.seq.split(",")):
            cfg = _common.llama_config(size, args.vocab, seq)
            with tempfile.TemporaryDirectory() as d:
                models.save_hf(models.build_model(cfg, rngs=0), d)
                np.savez(os.path.join(d, "pairs.npz"), **_common.random_pairs(args.batch, seq, args.vocab, seed=0))
                row = {"size": size, "seq": seq, "batch_pairs": args.batch, "params": cfg.num_params()}
                flops = mfu.step_flops(cfg, args.batch, seq, reference="live")
                row["step_gflop"] = flops / 1e9
                runs: dict[str, list[dict]] = {}
                for rnd in range(args.rounds):  # frameworks alternate, so load changes hit both
                    for fw in args.frameworks.split(","):
                        r = spawn(fw, d)
                        runs.setdefault(fw, []).append(r)
                        print(f"{size} T={seq} round {rnd} {fw}: {r['step']['median_s'] * 1e3:.0f} ms/step "
                              f"(min {r['step']['min_s'] * 1e3:.0f}), peak RSS {r['peak_rss_mib']:.0f} MiB, "
                              f"loss {[round(x, 6) for x in r['losses'][:3]]}, load {r['load_avg_after']}", flush=True)
                for fw, rs in runs.items():
                    step = _common.summarize([s for r in rs for s in r["step"]["all_s"]])
                    med = step["median_s"]
                    row[fw] = {**rs[0], "step": step, "round_medians_s": [r["step"]["median_s"] for r in rs],
                               "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                               "tokens_per_s": rs[0]["real_tokens"] / med,
                               "padded_tokens_per_s": rs[0]["padded_tokens"] / med,
                               "model_gflops_per_s": flops / med / 1e9,
                               "load_avg_after": [r["load_avg_after"] for r in rs]}
                    print(f"  {fw}: median {med * 1e3:.0f} ms/step, {row[fw]['tokens_per_s']:.0f} tok/s "
                          f"({row[fw]['model_gflops_per_s']:.1f} model GFLOP/s)", flush=True)
                for fw in [f for f in row if f.startswith("trl") and "jax" in row]:
                    for k in ("median_s", "min_s"):
                        row[f"{fw}_over_jax_{k}"] = row[fw]["step"][k] / row["jax"]["step"][k]
                    row[f"{fw}_over_jax_per_round"] = [a / b for a, b in zip(row[fw]["round_medians_s"],
                                                                             row["jax"]["round_medians_s"])]
                results.append(row)
    cfg_out = {k: v for k, v in vars(args).items() if k not in ("worker", "dir")}
    path = _common.write("dpo_step_vs_trl", {"env": _common.env(), "config": cfg_out, "load_avg_start": load0,
                                             "load_avg_end": _common.load_avg(), "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
