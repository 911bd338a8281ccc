"""The one-call accelerator suite: correctness on the device, DPO MFU, scoring and generation throughput.

    python bench/accelerator_suite.py --out DIR                      # on a GPU (about 5-8 minutes on an H200)
    python bench/accelerator_suite.py --out DIR --dry-run            # every stage at tiny sizes, on CPU (the tests)
    python bench/accelerator_suite.py --out DIR --stages device,checks    # some stages only

Stages (``--stages``, in this order; each is timed, a failing stage is recorded and the next one runs, and
``DIR/suite.json`` + ``DIR/suite.md`` are rewritten after every stage, so a run cut short keeps what it did):

* ``device`` -- device kind, memory, versions, and a measured bf16 matmul rate (8192^3; the achievable peak).
* ``checks`` -- the numerical checks of :mod:`jaxpref.testing.device_checks` (the same functions the tests marked
  ``gpu`` run): log-probs and one DPO step in float32 and bfloat16 on the device against CPU float32, and every
  attention backend of the platform against the dense ``xla`` math, values and gradients.
* ``logprob_memory`` -- compiled memory (``memory_analysis``, compile only) of loss + grad of summed log-probs,
  chunked (:func:`jaxpref.logprobs.sequence_logprobs`) vs full ``[N, T, V]`` logits, on the device.
* ``dpo`` -- the DPO train step (sigmoid, AdamW, float32 master weights, bfloat16 compute) of the
  ``llama3_2_1b`` preset (random init) at T 4096 and 2048, with a live and a precomputed reference, for each
  attention backend, layers scanned (``--dpo-layers``): tokens/s and MFU
  (:func:`jaxpref.training.mfu.step_flops`, against the datasheet's dense bf16 peak and against the measured
  matmul rate). Configurations run in priority order until
  ``--dpo-budget-s`` is spent; the rest are listed as skipped.
* ``scoring`` -- ``eval.ranking``'s scorer (:func:`jaxpref.evaluation.score_pairs`) of ``--model`` on ``--data``
  (default: SmolLM2-135M-Instruct GGUF on the 2k HH-RLHF pairs, plain text, no EOS, max length 1024): float32
  ("highest" matmul precision) with R / R̃ compared to ``--cpu-reference`` (a CPU ``eval.ranking`` summary of
  the same pairs), and bfloat16; compile time and steady tokens/s of each.
* ``generation`` -- KV-cache generation tokens/s (greedy, fixed length) of the scoring model.

``--dry-run`` swaps in tiny sizes (tiny presets, T 64, the llama2.c stories260K model on 8 pairs) so that every
stage's code runs on a CPU in about a minute; ``tests/test_accelerator_suite.py`` runs it.
``bench/accelerator_suite.md``
gives the exact command for the device image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402

STAGES = ("device", "checks", "logprob_memory", "dpo", "scoring", "generation")
SHARED = ROOT.parent / "shared" / "data"
HH_2K = SHARED / "hh_rlhf_helpful_base_test_2k.jsonl"
STORIES = SHARED / "models" / "llama2c_stories260K"
# Dense bf16 tensor-core peak by device kind (vendor datasheets, SXM parts, without sparsity).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12, "TPU v5p": 459e12,
             "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}
MIB = 2**20


def peak_flops(kind: str) -> float | None:
    for name, value in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return value
    return None


# --------------------------------------------------------------------------------------------- stages


def stage_device(args) -> dict:
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    out = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
           "env": _common.env(), "peak_bf16_flops_datasheet": peak_flops(dev.device_kind)}
    try:
        stats = dev.memory_stats() or {}
        out["memory_bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 (CPU devices have no memory stats)
        out["memory_bytes_limit"] = None
    n = 256 if args.dry_run else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = _common.timeit(lambda: mm(a).block_until_ready(), warmup=2, repeats=10)
    out["matmul_bf16"] = {"n": n, "median_s": t["median_s"], "tflops": 2 * n**3 / t["median_s"] / 1e12}
    return out


def stage_checks(args) -> dict:
    from jaxpref.testing import device_checks as D

    rows = []
    for fn, dtype in ((D.logprob_check, "float32"), (D.logprob_check, "bfloat16"), (D.dpo_step_check, "float32"),
                      (D.dpo_step_check, "bfloat16")):
        t0 = time.perf_counter()
        rows.append(_guard(lambda fn=fn, dtype=dtype: fn(dtype), f"{fn.__name__}_{dtype}"))
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 2)
    small = {"seq_len": 64, "head_dim": 16, "cases": ("packed",)} if args.dry_run else {}
    t0 = time.perf_counter()
    try:
        rows += D.attention_checks(**small)
        rows[-1]["seconds_all_attention_checks"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001
        rows.append({"check": "attention", "passed": False, "error": _error(e)})
    ran = [r for r in rows if r.get("passed") is not None]
    return {"passed": sum(bool(r["passed"]) for r in ran), "failed": [r["check"] for r in ran if not r["passed"]],
            "unsupported": sum(r.get("passed") is None for r in rows), "results": rows}


def stage_logprob_memory(args) -> dict:
    import chunked_logprobs_memory as M

    v, t, n, d = (1024, 128, 2, 32) if args.dry_run else (128256, 4096, 4, 2048)
    row = {"vocab": v, "seq": t, "n": n, "hidden": d, "dtype": "bfloat16", "full_logits_f32_mib": n * t * v * 4 / MIB}
    for kind in ("naive", "chunked"):
        row[kind] = _guard(lambda kind=kind: M.memory(kind, n, t, d, v, "bfloat16", 128, 8192, "vd"), kind)
    if "peak_mib" in row["naive"] and "peak_mib" in row["chunked"]:
        row["peak_ratio_naive_over_chunked"] = row["naive"]["peak_mib"] / row["chunked"]["peak_mib"]
    return row


def dpo_configs(dry_run: bool, backends: list[str]) -> list[dict]:
    """Priority order: the 1B target (T 4096, live), then precomputed, then T 2048; each for every backend."""
    if dry_run:  # both references, two backends: every code path, two compiles
        return [{"attention": b, "seq_len": 64, "pairs": 2, "reference": r}
                for b, r in zip(backends[-2:], ("live", "precomputed"))]
    rows = []
    for t, pairs in ((4096, 4), (2048, 8)):
        for reference in ("live", "precomputed"):
            for b in backends:
                rows.append({"attention": b, "seq_len": t, "pairs": pairs, "reference": reference})
    return rows


def stage_dpo(args, device: dict) -> dict:
    import jax

    from jaxpref.models.attention import select

    on = select.platform()
    kernels = [k for k, m in select.KERNELS.items() if on in m.PLATFORMS]
    backends = [b for b in (args.dpo_backends.split(",") if args.dpo_backends else [*kernels, "blocked", "xla"])]
    preset = "tiny_llama" if args.dry_run else args.dpo_preset
    peak = device.get("peak_bf16_flops_datasheet")
    measured = (device.get("matmul_bf16") or {}).get("tflops")
    rows, start = [], time.perf_counter()
    for cfg in dpo_configs(args.dry_run, backends):
        if time.perf_counter() - start > args.dpo_budget_s:
            rows.append({**cfg, "skipped": f"--dpo-budget-s {args.dpo_budget_s} spent"})
            continue
        row = {**cfg, **_guard(lambda cfg=cfg: _dpo_run(preset, args, **cfg), "dpo")}
        if "step_s" in row:
            tflops = row["model_flops"] / row["step_s"] / 1e12
            row["model_tflops_per_s"] = tflops
            row["mfu_datasheet"] = tflops * 1e12 / peak if peak else None
            row["mfu_measured_matmul"] = tflops / measured if measured else None
        rows.append(row)
        print(f"  dpo {json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))})}", flush=True)
        jax.clear_caches()
    best = max((r for r in rows if r.get("mfu_datasheet")), key=lambda r: r["mfu_datasheet"], default=None)
    return {"preset": preset, "layers": args.dpo_layers, "results": rows, "best": best}


def device_random_model(cfg, seed: int = 0, std: float = 0.02):
    """A random-init model drawn by ``jax.random`` on the default device (seconds for 1B parameters, where
    :func:`jaxpref.testing.models.random_model`'s host NumPy draws take minutes): norms' scales 1, the
    rest normal(0, ``std``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpref.models.registry import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        shape, name = var.get_value().shape, str(path[-1])
        if name.startswith("scale"):
            value = jnp.full(shape, 0.0 if cfg.traits.norm == "rms_plus_one" else 1.0, cfg.jnp_param_dtype)
        else:
            value = std * jax.random.normal(jax.random.fold_in(key, i), shape, cfg.jnp_param_dtype)
        var.set_value(value)
    return nnx.merge(graphdef, state)


def _dpo_run(preset: str, args, *, attention: str, seq_len: int, pairs: int, reference: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxpref import losses
    from jaxpref.config import OptimConfig
    from jaxpref.data import pair_batch
    from jaxpref.models import presets
    from jaxpref.testing.device_checks import synthetic_pairs
    from jaxpref.training import optim
    from jaxpref.training import step as S
    from jaxpref.training.mfu import step_flops

    cfg = presets.get_preset(preset, dtype="bfloat16", param_dtype="float32", attention=attention,
                             max_position_embeddings=max(seq_len, 64), scan_layers=args.dpo_layers == "scanned")
    graphdef, params, rest = S.split_model(device_random_model(cfg))
    prompt = seq_len // 4
    data = synthetic_pairs(pairs, vocab=cfg.vocab_size, max_prompt=prompt, max_response=seq_len - prompt, seed=0)
    # full-length sequences: every token is real, so tokens/s counts no padding
    rng = np.random.default_rng(1)
    for i in range(pairs):
        data.prompt[i] = rng.integers(3, cfg.vocab_size, prompt).astype(np.int32)
        data.chosen[i] = rng.integers(3, cfg.vocab_size, seq_len - prompt).astype(np.int32)
        data.rejected[i] = rng.integers(3, cfg.vocab_size, seq_len - prompt).astype(np.int32)
    batch = jax.device_put(pair_batch(data, list(range(pairs)), seq_len=seq_len))
    opt, _ = optim.make_optimizer(OptimConfig(name="adamw", lr=1e-6, clip_norm=1.0), 100)
    comp = losses.compose([{"name": "sigmoid", "beta": 0.1}])
    state = S.build_state(params, opt, 0)
    ref_params = jax.tree.map(jnp.copy, params) if reference == "live" else None
    ref_logps = jnp.zeros((pairs, 2), jnp.float32) - 1.0 * seq_len if reference == "precomputed" else None
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference=reference), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, ref_params, batch, ref_logps).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, losses_ = [], []
    for i in range(args.dpo_warmup + args.dpo_steps):
        t0 = time.perf_counter()
        state, m = compiled(state, ref_params, batch, ref_logps)
        loss = float(m["loss"])  # blocks
        if i >= args.dpo_warmup:
            times.append(time.perf_counter() - t0)
        losses_.append(loss)
    step = float(np.median(times))
    tokens = 2 * pairs * seq_len
    return {"compile_s": compile_s, "step_s": step, "step_times_s": [round(t, 5) for t in times],
            "tokens_per_s": tokens / step, "model_flops": step_flops(cfg, pairs, seq_len, reference),
            "losses": losses_, "temp_mib": getattr(mem, "temp_size_in_bytes", 0) / MIB,
            "argument_mib": getattr(mem, "argument_size_in_bytes", 0) / MIB, "params": cfg.num_params()}


def stage_scoring(args) -> dict:
    import jax

    from eval import ranking
    from eval.common import tokenize_config
    from jaxpref import evaluation as ev

    model_spec, tokenizer, data, limit, max_len = _scoring_inputs(args)
    targs = argparse.Namespace(max_length=max_len, max_prompt_length=None, no_chat_template=True, no_eos=True)
    out = {"model": model_spec, "data": str(data), "limit": limit, "max_length": max_len, "runs": {}}
    for dtype in ("float32", "bfloat16"):
        loaded, tok = ev.load_model_and_tokenizer(model_spec, tokenizer, dtype=dtype)
        pairs = ev.load_eval_pairs(data, tok, limit=limit, tokenize=tokenize_config(targs))
        precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with precision:
            scores = ev.score_pairs(loaded.model, pairs.pairs, batch_size=args.score_batch, progress=False)
        wall = time.perf_counter() - t0
        summary, _ = ranking.compute(scores, None, pairs.pairs.votes, pairs.pairs.tie, has_votes=pairs.has_votes,
                                     betas=(0.1,), beta=0.1, ties_correct=True, include_ties=False,
                                     fallback_alpha=1.0)
        run = {"wall_s": wall, "R": summary["ranking_accuracy"], "R_tilde": summary["ranking_accuracy_normalized"],
               "n_pairs": summary["n_pairs"], "scoring": scores.stats.to_json() if scores.stats else None}
        out["runs"][dtype] = run
        del loaded
    if args.cpu_reference:
        out.update(compare_cpu(out, args.cpu_reference))
    return out


def compare_cpu(scoring: dict, path) -> dict:
    """The float32 run's R / R̃ against a CPU ``eval.ranking`` summary of the same pairs (within 1e-3)."""
    ref = json.loads(pathlib.Path(path).read_text())
    r32 = scoring["runs"]["float32"]
    return {"cpu_reference": {"file": str(path), "R": ref["ranking_accuracy"],
                              "R_tilde": ref["ranking_accuracy_normalized"], "n_pairs": ref.get("n_pairs")},
            "matches_cpu_within_1e-3": bool(ref.get("n_pairs") == r32["n_pairs"]
                                            and abs(ref["ranking_accuracy"] - r32["R"]) <= 1e-3
                                            and abs(ref["ranking_accuracy_normalized"] - r32["R_tilde"]) <= 1e-3)}


def _scoring_inputs(args):
    if args.dry_run:
        return f"llama2c:{STORIES}", "builtin:512", args.data or HH_2K, 8, 128
    return args.model, args.tokenizer, args.data or HH_2K, args.limit, 1024


def stage_generation(args) -> dict:
    import jax
    import numpy as np

    from jaxpref import evaluation as ev
    from jaxpref.generation import SamplingConfig, generate

    model_spec, tokenizer = _scoring_inputs(args)[:2]
    loaded, _ = ev.load_model_and_tokenizer(model_spec, tokenizer, dtype="bfloat16")
    model = loaded.model
    b, prompt, new = (4, 8, 8) if args.dry_run else (args.gen_batch, 128, args.gen_tokens)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (b, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    cfg = SamplingConfig(max_new_tokens=new, temperature=0.0, eos_token_ids=(), pad_token_id=0)
    keys = jax.random.split(jax.random.key(0), b)
    t0 = time.perf_counter()
    jax.block_until_ready(generate(model, ids, mask, key=keys, config=cfg))
    first = time.perf_counter() - t0
    t = _common.timeit(lambda: jax.block_until_ready(generate(model, ids, mask, key=keys, config=cfg)), warmup=0,
                       repeats=3)
    return {"model": model_spec, "batch": b, "prompt_len": prompt, "new_tokens": new, "first_call_s": first,
            "median_s": t["median_s"], "tokens_per_s": b * new / t["median_s"], "dtype": "bfloat16"}


# --------------------------------------------------------------------------------------------- plumbing


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:500]} | {traceback.format_exc(limit=-3)[-800:]}"


def _guard(fn, name: str) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (the suite records a failing part and goes on)
        return {"check": name, "passed": False, "error": _error(e)}


def markdown(result: dict) -> str:
    """A short human-readable summary of ``suite.json``."""
    lines = [f"# Accelerator suite: {result.get('device', {}).get('device_kind', '?')}", "",
             f"dry run: {result['dry_run']}; stages: {', '.join(result['stages'])}", ""]
    stages = result["results"]
    dev = stages.get("device", {})
    if "matmul_bf16" in dev:
        lines.append(f"- bf16 matmul {dev['matmul_bf16']['n']}^3: {dev['matmul_bf16']['tflops']:.1f} TFLOP/s "
                     f"(datasheet peak {dev.get('peak_bf16_flops_datasheet') or 'n/a'})")
    chk = stages.get("checks", {})
    if "results" in chk:
        lines.append(f"- numerical checks: {chk['passed']} passed, failed {chk['failed'] or 'none'}, "
                     f"{chk['unsupported']} unsupported combinations skipped")
    mem = stages.get("logprob_memory", {})
    if "peak_ratio_naive_over_chunked" in mem:
        lines.append(f"- log-prob loss+grad compiled peak, V {mem['vocab']} T {mem['seq']} N {mem['n']}: naive "
                     f"{mem['naive']['peak_mib']:.0f} MiB, chunked {mem['chunked']['peak_mib']:.0f} MiB")
    dpo = stages.get("dpo", {})
    if dpo.get("results"):
        lines += ["", f"## DPO step, {dpo['preset']} (bf16 compute, f32 master weights, AdamW)", "",
                  "| attention | T | pairs | reference | step s | tokens/s | MFU (datasheet) | MFU (measured matmul) "
                  "| compile s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in dpo["results"]:
            if "step_s" in r:
                mfu = lambda x: f"{x:.1%}" if x else "n/a"  # noqa: E731
                lines.append(f"| {r['attention']} | {r['seq_len']} | {r['pairs']} | {r['reference']} | "
                             f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {mfu(r.get('mfu_datasheet'))} | "
                             f"{mfu(r.get('mfu_measured_matmul'))} | {r['compile_s']:.1f} |")
            else:
                why = r.get("skipped") or r.get("error", "")[:120]
                lines.append(f"| {r['attention']} | {r['seq_len']} | {r['pairs']} | {r['reference']} | {why} |||||")
    sc = stages.get("scoring", {})
    if sc.get("runs"):
        lines += ["", f"## Scoring {sc['model']} on {sc['data']} (max length {sc['max_length']})", ""]
        for dtype, r in sc["runs"].items():
            st = r.get("scoring") or {}
            lines.append(f"- {dtype}: R {r['R']:.4f}, R̃ {r['R_tilde']:.4f} over {r['n_pairs']} pairs; wall "
                         f"{r['wall_s']:.1f} s, compile {st.get('compile_s', float('nan')):.1f} s, steady "
                         f"{st.get('tokens_per_s', float('nan')):.0f} tokens/s")
        if "cpu_reference" in sc:
            lines.append(f"- CPU reference R {sc['cpu_reference']['R']:.4f}, R̃ {sc['cpu_reference']['R_tilde']:.4f}: "
                         f"float32 matches within 1e-3: {sc['matches_cpu_within_1e-3']}")
    gen = stages.get("generation", {})
    if "tokens_per_s" in gen:
        lines.append(f"\n- generation (bf16, greedy, batch {gen['batch']}, {gen['new_tokens']} new tokens): "
                     f"{gen['tokens_per_s']:.0f} tokens/s")
    for name, st in stages.items():
        if isinstance(st, dict) and "error" in st:
            lines.append(f"- stage {name} FAILED: {st['error'][:200]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (suite.json, suite.md)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, any platform (CPU): exercises every stage")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--model", default="gguf:smollm2-135m-instruct", help="scoring / generation model spec")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: the model's)")
    p.add_argument("--data", default=None, help=f"scoring pairs (default {HH_2K})")
    p.add_argument("--limit", type=int, default=None, help="first N scoring pairs")
    p.add_argument("--cpu-reference", default=None, help="CPU eval.ranking summary.json of the same pairs")
    p.add_argument("--score-batch", type=int, default=32, help="scoring batch (pairs)")
    p.add_argument("--dpo-preset", default="llama3_2_1b")
    p.add_argument("--dpo-backends", default=None, help="comma list (default: this platform's kernels, blocked, xla)")
    p.add_argument("--dpo-budget-s", type=float, default=200.0, help="start no new DPO configuration after this")
    p.add_argument("--dpo-warmup", type=int, default=2)
    p.add_argument("--dpo-layers", choices=("scanned", "unrolled"), default="scanned",
                   help="model.scan_layers of the DPO step (default scanned: one compiled layer, so each of the "
                        "up to 16 configurations compiles in seconds, not minutes)")
    p.add_argument("--dpo-steps", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=128)
    args = p.parse_args(argv)
    if args.dry_run:
        args.dpo_warmup, args.dpo_steps = 1, 2
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"--stages: unknown {unknown}; expected a comma list of {list(STAGES)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"suite": "accelerator_suite", "dry_run": args.dry_run, "stages": stages, "args": vars(args),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": {}, "stage_seconds": {}}
    if args.dry_run:
        from jaxpref.testing.models import fast_compile

        quick = fast_compile()  # LLVM -O0 on CPU: the dry run checks code paths, not speed
    else:
        quick = contextlib.nullcontext()
    with quick:
        _run_stages(args, stages, result, out)
    print((out / "suite.md").read_text())
    return result


def _run_stages(args, stages: list[str], result: dict, out: pathlib.Path) -> None:
    for name in stages:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            if name == "dpo":
                res = stage_dpo(args, result["results"].get("device") or stage_device(args))
            else:
                res = globals()[f"stage_{name}"](args)
        except Exception as e:  # noqa: BLE001
            res = {"error": _error(e)}
        result["results"][name] = res
        result["stage_seconds"][name] = round(time.perf_counter() - t0, 2)
        if name == "device":
            result["device"] = {k: res.get(k) for k in ("platform", "device_kind", "peak_bf16_flops_datasheet")}
        (out / "suite.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / "suite.md").write_text(markdown(result))
        print(f"   {name}: {result['stage_seconds'][name]} s{' ERROR ' + res['error'][:300] if 'error' in res else ''}",
              flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAXPREF_COMPILATION_CACHE", "off")  # measure compiles, do not load them
    main()
