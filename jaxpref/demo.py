"""The embedded-default demo: SFT → DPO / RPO / TYPO → evaluation on the exact-oracle testbed.

``python -m train.demo [--out DIR]`` runs the whole product on data it generates itself (no download),
through the same entry points a user calls on real data:

1. **Testbed** (:mod:`jaxpref.data.synthetic`): K prompts, all N = A^L responses, a true reward r* and
   Bradley–Terry preferences; the tiny Llama's vocabulary *is* the alphabet, so its distribution over
   the N responses is exact.
2. **SFT** (``run_training(kind="sft")``) on demonstrations sampled from softmax(r*/T): the reference.
3. **Preference data**: pairs sampled from the SFT policy, each judged by several simulated annotators
   (vote shares α), written as a JSON Lines file the ordinary data loader reads.
4. **DPO, RPO, TYPO** (``run_training(kind="preference")``), live frozen reference, checkpoints every
   few steps.
5. **Evaluation**: every checkpoint's exact distribution gives the exact win rate against the reference
   under the true preference and the exact KL; ``eval.ranking`` (ranking accuracy vs idealized ranking
   accuracy, alignment gap) and ``eval.ches`` (CHES histogram) run as scripts on the held-out pairs, and the
   ranking accuracy they compute is checked against the exact one.

The report directory holds ``metrics.json`` (every number), ``report.md`` and ``loss_curves.png``,
``win_rate.png``, ``ranking_vs_idealized.png``, ``ches_hist.png``; the runs and eval outputs sit
beside it. Settings come from ``configs/demo/demo.yaml``.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import numpy as np
import yaml

from jaxpref.data import synthetic as sb

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "demo" / "demo.yaml"


WHOLE_SECTIONS = {"reference.samples"}  # None by default: set as one mapping, not key by key


def _overrides(prefix: str, tree: dict) -> list[str]:
    """Flattens a nested mapping into dotted ``key=value`` overrides."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in WHOLE_SECTIONS:
            out += _overrides(f"{prefix}{key}.", value)
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML flow syntax
    return out


def _model_overrides(tb: sb.Testbed, model: dict) -> dict:
    cfg = tb.model_config(**model)
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": False}


def write_sft_data(tb: sb.Testbed, reward: np.ndarray, n: int, temperature: float, path: pathlib.Path,
                   seed: int) -> pathlib.Path:
    """``n`` demonstrations ``{prompt, response}`` with prompts uniform and responses ~ softmax(r*/T)."""
    rng = np.random.default_rng([seed, 5])
    logits = reward / temperature
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    prompts = rng.integers(0, tb.num_prompts, size=n)
    with path.open("w") as fh:
        for k in prompts:
            y = rng.choice(tb.num_responses, p=probs[k])
            fh.write(json.dumps({"prompt": tb.to_text(tb.prompts[k]), "response": tb.to_text(tb.responses[y])}) + "\n")
    return path


def _run_config(base: list[str], section: dict):
    from jaxpref.config import RunConfig, load_config

    return load_config(RunConfig, None, [*base, *_overrides("", section)])


# Keys the demo reads from what the training and eval scripts write; tests/test_demo.py checks each one
# against the files a real demo run wrote, so a rename fails a test instead of dropping a number.
METRICS_ROW_KEYS = ("step", "loss")  # runs/NAME/metrics.jsonl rows (run_training)
RANKING_KEYS = ("ranking_accuracy", "ranking_accuracy_normalized", "alignment_gap", "alignment_gap_normalized",
                "n_evaluated", "idealized")  # eval.ranking's ranking.json (with --reference)
RANKING_ROW_KEYS = ("row", "evaluated")  # eval.ranking's per_example.jsonl rows
CHES_KEYS = ("n_pairs", "ches", "ln_ches", "fraction_ches_positive")  # eval.ches's summary.json
CHES_ROW_KEYS = ("ches",)  # eval.ches's ches.jsonl rows

REWARD_KEYS = ("reward_scale", "demonstrator_temperature", "reward_kind")  # testbed keys that are not TestbedConfig
DEMO_KEYS = {"testbed", "model", "data", "sft", "preference", "methods", "method_overrides", "eval"}


def check_config(cfg: dict) -> None:
    """Validates demo settings before anything runs: known sections, a valid testbed, and every run
    section (with each method's loss) a valid :class:`jaxpref.config.RunConfig` (ConfigError otherwise)."""
    from jaxpref import losses
    from jaxpref.config import ConfigError

    unknown = set(cfg) - DEMO_KEYS
    if unknown:
        raise ConfigError(f"demo config: unknown sections {sorted(unknown)} (allowed: {sorted(DEMO_KEYS)})")
    tbc = {k: v for k, v in cfg["testbed"].items() if k not in REWARD_KEYS}
    try:
        sb.Testbed(sb.TestbedConfig(**tbc)).model_config(**cfg.get("model", {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"demo config: testbed/model: {err}") from err
    _run_config(["model.source=preset:tiny_llama"], cfg["sft"])
    for name, loss in cfg["methods"].items():
        run = _run_config([f"loss={json.dumps(loss)}",
                           *_overrides("", cfg.get("method_overrides", {}).get(name, {}))], cfg["preference"])
        losses.compose([{"name": t.name, "weight": t.weight, **t.hparams} for t in run.loss])


def _exact_trajectory(tb, run_dir: pathlib.Path, ref_logps, pref, reward) -> dict[str, list]:
    """Exact win rate vs the reference, KL and expected reward at every checkpoint of ``run_dir``."""
    from jaxpref.evaluation import run_checkpoint_steps
    from jaxpref.loading import load_model

    traj = {"step": [0], "win_rate": [0.5], "kl": [0.0], "expected_reward": [float(sb.expected_reward(ref_logps,
                                                                                                      reward).mean())]}
    for step in run_checkpoint_steps(run_dir):
        logps = sb.response_logps(load_model(f"run:{run_dir}@{step}").model, tb)
        traj["step"].append(step)
        traj["win_rate"].append(float(sb.win_rate(logps, ref_logps, pref)))
        traj["kl"].append(float(sb.mean_kl(logps, ref_logps)))
        traj["expected_reward"].append(float(sb.expected_reward(logps, reward).mean()))
    traj["final_logps"] = logps
    return traj


def run_demo(out: str | pathlib.Path = "runs/demo", *, config: str | pathlib.Path = DEFAULT_CONFIG,
             progress: bool = True, quick: bool = False) -> dict[str, Any]:
    """Runs the demo into ``out`` (``out/report`` is the report); returns ``metrics.json``'s content.

    ``quick`` divides every step count by 5 (for tests); the numbers are then not meaningful.
    """
    from eval import ches as eval_ches
    from eval import ranking as eval_ranking
    from jaxpref.loading import load_model
    from jaxpref.training.loop import run_training

    t0 = time.perf_counter()
    cfg = yaml.safe_load(pathlib.Path(config).read_text())
    check_config(cfg)
    out = pathlib.Path(out)
    data_dir, report = out / "data", out / "report"
    data_dir.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    tbc = dict(cfg["testbed"])
    reward_scale, temperature = tbc.pop("reward_scale"), tbc.pop("demonstrator_temperature")
    reward_kind = tbc.pop("reward_kind", "iid")
    tb = sb.Testbed(sb.TestbedConfig(**tbc))
    seed = tb.config.seed
    reward = sb.random_reward(tb, scale=reward_scale, seed=seed, kind=reward_kind)
    pref = sb.bt_preference(reward)
    timings = {}

    # ---- data and SFT
    tok_dir = sb.save_tokenizer(tb, data_dir / "tokenizer")
    sft_path = write_sft_data(tb, np.asarray(reward), cfg["data"]["sft_examples"], temperature,
                              data_dir / "sft.jsonl", seed)
    length = tb.config.prompt_length + tb.config.response_length
    common = [f"model.tokenizer=hf:{tok_dir}", f"data.max_length={length}", f"data.buckets=[{length}]",
              "data.chat_template=false", "data.add_eos=false", f"logging.progress={str(progress).lower()}",
              "logging.tensorboard=false", f"train.seed={seed}"]
    scale = 5 if quick else 1
    for section in ("sft", "preference"):
        cfg[section]["train"]["steps"] = max(2, cfg[section]["train"]["steps"] // scale)
    model_over = json.dumps(_model_overrides(tb, cfg.get("model", {})))
    sft_dir = out / "runs" / "sft"
    t = time.perf_counter()
    run_training(_run_config([*common, f"run_dir={sft_dir}", "model.source=preset:tiny_llama",
                              f"model.overrides={model_over}", f"data.train={sft_path}", "data.format=sft"],
                             cfg["sft"]), kind="sft")
    timings["sft_s"] = time.perf_counter() - t
    ref_logps = sb.response_logps(load_model(f"run:{sft_dir}").model, tb)

    # ---- preference data from the reference
    n_train, n_eval = cfg["data"]["train_pairs"], cfg["data"]["eval_pairs"]
    pairs = sb.sample_pairs(tb, pref, ref_logps, n_pairs=n_train + n_eval, n_votes=cfg["data"]["votes"],
                            seed=seed, distinct=True)
    train_pairs, eval_pairs = pairs.subset(np.arange(n_train)), pairs.subset(np.arange(n_train, n_train + n_eval))
    train_path = sb.write_text_dataset(tb, train_pairs, data_dir / "pairs_train.jsonl")
    eval_path = sb.write_text_dataset(tb, eval_pairs, data_dir / "pairs_eval.jsonl")

    # ---- preference runs
    methods: dict[str, dict] = {}
    final_logps = {}
    for name, loss in cfg["methods"].items():
        run_dir = out / "runs" / name
        extra = cfg.get("method_overrides", {}).get(name, {})
        if extra.get("reference", {}).get("samples") is not None:  # cache reference samples inside `out`
            samples = {"cache_dir": str(out / "cache"), **extra["reference"]["samples"]}
            extra = {**extra, "reference": {**extra["reference"], "samples": samples}}
        t = time.perf_counter()
        summary = run_training(_run_config([*common, f"run_dir={run_dir}", f"model.source=run:{sft_dir}",
                                            f"data.train={train_path}", f"loss={json.dumps(loss)}",
                                            *_overrides("", extra)], cfg["preference"]), kind="preference")
        timings[f"{name}_s"] = time.perf_counter() - t
        traj = _exact_trajectory(tb, run_dir, ref_logps, pref, reward)
        logps = final_logps[name] = traj.pop("final_logps")
        metrics_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        step_key, loss_key = METRICS_ROW_KEYS
        methods[name] = {
            "loss": loss, "final_train_loss": summary["final_metrics"].get(loss_key), "trajectory": traj,
            "loss_curve": {"step": [m[step_key] for m in metrics_rows], "loss": [m[loss_key] for m in metrics_rows]},
            "exact_win_rate_vs_reference": traj["win_rate"][-1], "exact_kl_to_reference": traj["kl"][-1],
            "exact_ranking_accuracy_eval": float(sb.exact_ranking_accuracy(logps, eval_pairs)),
            "exact_ranking_accuracy_train": float(sb.exact_ranking_accuracy(logps, train_pairs)),
        }

    # ---- eval scripts on the held-out pairs (the same code path as on real data)
    data_args = ["--data", str(eval_path), "--max-length", str(length), "--no-chat-template", "--no-eos"]
    quiet = [] if progress else ["--no-progress"]
    betas = [str(b) for b in cfg["eval"]["betas"]]
    for name, m in methods.items():
        s = eval_ranking.main(["--model", f"run:{out / 'runs' / name}", "--reference", f"run:{sft_dir}", *data_args,
                               "--out", str(out / "eval" / name), "--betas", *betas, *quiet])
        m["ranking"] = {k: s[k] for k in RANKING_KEYS if k != "idealized"}
        m["ranking"]["idealized_R_star"] = s["idealized"]["R_star"]
        m["ranking"]["exact_on_evaluated"] = _exact_on_evaluated(out / "eval" / name, final_logps[name], eval_pairs)
        m["ranking"]["matches_exact"] = bool(abs(s["ranking_accuracy"] - m["ranking"]["exact_on_evaluated"]) < 1e-6)
    ches = eval_ches.main(["--model", f"run:{sft_dir}", *data_args, "--out", str(out / "eval" / "ches"), *quiet])
    ches_rows = [json.loads(x) for x in (out / "eval" / "ches" / "ches.jsonl").read_text().splitlines()]

    timings["total_s"] = time.perf_counter() - t0
    result = {
        "testbed": repr(tb), "reward_scale": reward_scale, "reward_kind": reward_kind,
        "demonstrator_temperature": temperature,
        "reference": {"exact_win_rate_vs_uniform": float(sb.win_rate(ref_logps, sb.uniform_logps(tb), pref)),
                      "exact_ranking_accuracy_eval": float(sb.exact_ranking_accuracy(ref_logps, eval_pairs)),
                      "idealized_ranking_accuracy_eval": {
                          str(b): float(sb.exact_idealized_ranking_accuracy(ref_logps, eval_pairs, float(b)))
                          for b in cfg["eval"]["betas"]}},
        "methods": methods, "ches": {k: ches[k] for k in CHES_KEYS},
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "quick": quick,
    }
    _plots(report, methods, result, [r[CHES_ROW_KEYS[0]] for r in ches_rows])
    (report / "metrics.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (report / "report.md").write_text(_markdown(result))
    return result


def _exact_on_evaluated(eval_dir: pathlib.Path, logps, pairs) -> float:
    """The exact ranking accuracy (enumerated π) over the pairs ``eval.ranking`` evaluated (α = 0.5 ties are
    dropped there); ``row`` of its per-example file is the pair's line in the data file, i.e. its index."""
    rows = [json.loads(x) for x in (eval_dir / "per_example.jsonl").read_text().splitlines()]
    row_key, evaluated_key = RANKING_ROW_KEYS
    idx = np.array([r[row_key] for r in rows if r[evaluated_key]])
    lp = np.asarray(sb.pair_logps(logps, pairs))[idx]
    return float(np.mean(lp[:, 0] >= lp[:, 1]))


def _plots(report: pathlib.Path, methods: dict, result: dict, ches: list[float]) -> None:
    from jaxpref.evaluation import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, m in methods.items():
        ax.plot(m["loss_curve"]["step"], m["loss_curve"]["loss"], label=name)
    ax.set(xlabel="step", ylabel="training loss", title="loss curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "loss_curves.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, m in methods.items():
        ax[0].plot(m["trajectory"]["step"], m["trajectory"]["win_rate"], "o-", label=name)
        ax[1].plot(m["trajectory"]["kl"], m["trajectory"]["win_rate"], "o-", label=name)
    ax[0].axhline(0.5, color="k", lw=0.8)
    ax[0].set(xlabel="step", ylabel="exact win rate vs reference", title="exact win rate (true preference)")
    ax[1].set(xlabel="exact KL(π || π_ref)", ylabel="exact win rate vs reference", title="win rate vs KL")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(report / "win_rate.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(methods)
    r = [methods[n]["ranking"]["ranking_accuracy"] for n in names]
    r_star = [methods[n]["ranking"]["idealized_R_star"]["median"] for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, r, 0.4, label="ranking accuracy R")
    ax.bar(x + 0.2, r_star, 0.4, label="idealized R* (median over β)")
    ax.set_xticks(x, names)
    ax.set(ylim=(0, 1), ylabel="held-out pairs", title="ranking vs idealized ranking accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(report / "ranking_vs_idealized.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(ches, bins=40)
    ax.set(xlabel="CHES (reference model)", ylabel="pairs", title="CHES of held-out pairs (Razin et al.)")
    fig.tight_layout()
    fig.savefig(report / "ches_hist.png", dpi=100)
    plt.close(fig)


def _markdown(result: dict) -> str:
    lines = ["# jaxpref demo report", "", f"Testbed: `{result['testbed']}`; reference = the SFT model.", "",
             "| method | exact win rate vs ref | exact KL | R (held-out) | R* median | alignment gap (points) |",
             "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        rk = m["ranking"]
        lines.append(f"| {name} | {m['exact_win_rate_vs_reference']:.3f} | {m['exact_kl_to_reference']:.3f} | "
                     f"{rk['ranking_accuracy']:.3f} | {rk['idealized_R_star']['median']:.3f} | "
                     f"{rk['alignment_gap']:.1f} |")
    ch = result["ches"]
    lines += ["", f"CHES of the {ch['n_pairs']} held-out pairs under the reference (Razin et al.): median "
                  f"{ch['ches']['median']:.4g}, LN-CHES median {ch['ln_ches']['median']:.4g}, share with CHES > 0 "
                  f"{ch['fraction_ches_positive']:.3f}."]
    lines += ["", f"Timings (s): {result['timings_s']}", "",
              "![loss](loss_curves.png) ![win rate](win_rate.png)",
              "![ranking](ranking_vs_idealized.png) ![ches](ches_hist.png)", ""]
    return "\n".join(lines)
