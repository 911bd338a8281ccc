"""Sweeps: parsing, expansion counts and names, deterministic random draws, command printing, the
results table from fake run directories, failures recorded without stopping, resuming, and one real
two-run local sweep (one run trains a step, the other fails on a missing data file)."""

import csv
import json
import pathlib
import random
import shlex
import subprocess
import sys

import pytest
import yaml

from jaxpref import sweep
from jaxpref.config import ConfigError, RunConfig, load_config
from train import sweep as sweep_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_sweep(tmp: pathlib.Path, body: dict, name: str = "s.yaml") -> pathlib.Path:
    (tmp / "run.yaml").write_text("run_dir: runs/x\nloss: [{name: sigmoid, hparams: {beta: 0.1}}]\n")
    path = tmp / name
    path.write_text(yaml.safe_dump({"base": "run.yaml", **body}, sort_keys=False))
    return path


GRID = {"loss.0.name": ["sigmoid", "ipo"], "loss.0.hparams.beta": [0.05, 0.1, 0.5]}


def test_grid_times_seeds_counts_names_and_overrides(tmp_path):
    spec = sweep.load_sweep(write_sweep(tmp_path, {"grid": GRID, "seeds": [0, 1]}))
    assert spec.name == "s" and spec.kind == "preference"
    runs = sweep.expand(spec, tmp_path / "out")
    assert len(runs) == 2 * 3 * 2
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].name == "name=sigmoid,beta=0.05,seed=0"
    assert runs[-1].name == "name=ipo,beta=0.5,seed=1"
    assert runs[0].run_dir == tmp_path / "out" / runs[0].name
    sweep.validate(spec, runs)
    cfg = load_config(RunConfig, spec.base, runs[7].overrides)
    assert (cfg.loss[0].name, cfg.loss[0].hparams["beta"], cfg.train.seed) == ("ipo", 0.05, 1)
    assert cfg.run_dir == str(runs[7].run_dir)
    # Stable: the same file expands to the same names.
    assert [r.name for r in sweep.expand(sweep.load_sweep(spec.path), tmp_path / "out")] == [r.name for r in runs]


def test_random_draws_are_deterministic_and_in_range(tmp_path):
    body = {"grid": {"loss.0.name": ["sigmoid", "ipo"]}, "seeds": [0, 1, 2], "num_random": 4,
            "random": {"optim.lr": {"distribution": "log_uniform", "low": 1e-6, "high": 1e-3},
                       "optim.b1": {"distribution": "uniform", "low": 0.8, "high": 0.95},
                       "train.batch_size": {"distribution": "choice", "values": [4, 8]}}}
    spec = sweep.load_sweep(write_sweep(tmp_path, body))
    runs = sweep.expand(spec, tmp_path / "out")
    assert len(runs) == 2 * 4 * 3
    draws = sweep.draws(spec)
    assert draws == sweep.draws(sweep.load_sweep(spec.path))  # same seed, same draws
    assert draws != sweep.draws(sweep.load_sweep(write_sweep(tmp_path, {**body, "random_seed": 1}, "t.yaml")))
    for d in draws:
        assert 1e-6 <= d["optim.lr"] <= 1e-3 and 0.8 <= d["optim.b1"] <= 0.95 and d["train.batch_size"] in (4, 8)
    # Only rng.random() is used, whose sequence Python guarantees: the first lr draw is pinned.
    u = random.Random(0).random()
    assert draws[0]["optim.lr"] == float(f"{1e-6 * 1000 ** u:.4g}")
    # A draw is shared by every grid point and seed.
    assert {r.values["optim.lr"] for r in runs} == {d["optim.lr"] for d in draws}
    sweep.validate(spec, runs)


def test_names_short_keys_and_values():
    assert sweep.short_keys(["loss.0.hparams.beta", "loss.0.name", "train.seed"]) == {
        "loss.0.hparams.beta": "beta", "loss.0.name": "name", "train.seed": "seed"}
    assert sweep.short_keys(["optim.lr", "reference.lr", "data.limit"]) == {
        "optim.lr": "optim.lr", "reference.lr": "reference.lr", "data.limit": "limit"}
    assert sweep.run_name({}) == "run"
    assert sweep.run_name({"data.train": "/a b/c.jsonl", "optim.lr": 1e-05, "x.flag": True}) == \
        "train=a_b_c.jsonl,lr=1e-05,flag=true"
    long = sweep.run_name({"loss": [{"name": "ipo", "hparams": {"beta": 0.1 * i}} for i in range(20)]})
    assert len(long) <= sweep.MAX_NAME and "~" in long
    assert sweep.unique_names([{"a": 1}, {"a": 1}, {"a": 2}]) == ["a=1", "a=1~2", "a=2"]


@pytest.mark.parametrize("value", [0.1, 1e-05, "1e-5", "ipo", True, None, 3, [128, 256], {"beta": 0.1},
                                   "null", "a: b", "runs/s/name=ipo,beta=0.1,seed=0", "[x]"])
def test_override_values_round_trip_through_yaml(value):
    assert yaml.safe_load(sweep.yaml_value(value)) == value


@pytest.mark.parametrize("body, match", [
    ({"grid": GRID, "sedes": [0]}, "sedes: unknown sweep key"),
    ({"kind": "dpo"}, "kind: 'dpo': expected one of"),
    ({"grid": {"optim.lr": []}}, "grid.optim.lr: expected a non-empty list"),
    ({"random": {"optim.lr": {"distribution": "normal"}}}, "random.optim.lr: expected {distribution"),
    ({"random": {"optim.lr": {"distribution": "log_uniform", "low": 0, "high": 1}}}, "random.optim.lr: need 0 <"),
    ({"num_random": 3}, "num_random: given without"),
    ({"seeds": [0, 0]}, "seeds: .* distinct integers"),
    ({"base": "nope.yaml"}, "base: run config .* not found"),
])
def test_bad_sweep_files_name_the_file_and_key(tmp_path, body, match):
    path = write_sweep(tmp_path, body)
    with pytest.raises(ConfigError, match=match) as info:
        sweep.load_sweep(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("grid, match", [({"optim.nme": ["adamw"]}, "Key 'nme' not in 'OptimConfig'"),
                                         ({"loss.0.name": ["bogus"]}, "bogus"),
                                         ({"optim.name": ["adamw", "lion"]}, "optim.name='lion'")])
def test_validation_names_the_bad_run_before_any_starts(tmp_path, grid, match):
    spec = sweep.load_sweep(write_sweep(tmp_path, {"grid": grid}))
    with pytest.raises(ConfigError, match=match) as info:
        sweep.validate(spec, sweep.expand(spec, tmp_path / "out"))
    assert str(spec.path) in str(info.value) and "run " in str(info.value)


def test_print_commands_one_per_run(tmp_path, capsys):
    path = write_sweep(tmp_path, {"grid": GRID, "seeds": [0, 1]})
    sweep_cli.main(["--sweep", str(path), "--print-commands", "--out", str(tmp_path / "o"), "train.steps=3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12
    argv = shlex.split(lines[0])
    assert argv[:6] == ["python", "-m", "train.preference", "--config", str(tmp_path / "run.yaml"), "--resume"]
    assert argv[6:] == ["train.steps=3", "loss.0.name=sigmoid", "loss.0.hparams.beta=0.05", "train.seed=0",
                        f"run_dir={tmp_path / 'o' / 'name=sigmoid,beta=0.05,seed=0'}"]
    assert not (tmp_path / "o").exists()  # printing runs nothing, writes nothing
    sweep_cli.main(["--sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    listed = capsys.readouterr()
    assert len(listed.out.splitlines()) == 12 and all("\tpending\t" in x for x in listed.out.splitlines())
    assert "12 runs (6 grid points x 1 draws x 2 seeds)" in listed.err and not (tmp_path / "o").exists()


def fake_runs(tmp_path):
    spec = sweep.load_sweep(write_sweep(tmp_path, {"grid": {"loss.0.hparams.beta": [0.1, 0.2, 0.3]}}))
    return spec, sweep.expand(spec, tmp_path / "out")


def test_results_table_from_fake_run_dirs(tmp_path):
    spec, runs = fake_runs(tmp_path)
    runs[0].run_dir.mkdir(parents=True)
    (runs[0].run_dir / "summary.json").write_text(json.dumps({
        "steps": 10, "tokens_per_s": 1234.5, "seconds": 2.0,
        "final_metrics": {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.125}}))
    runs[1].run_dir.mkdir(parents=True)
    (runs[1].run_dir / sweep.STATUS_FILE).write_text(json.dumps({
        "status": "failed", "returncode": 1, "stderr_tail": ["Traceback", "error: data file | missing"]}))
    rows = sweep.collect_results(runs)
    assert [r["status"] for r in rows] == ["ok", "failed", "pending"]
    assert rows[0]["loss.0.hparams.beta"] == 0.1 and rows[0]["rewards/margins"] == 0.125
    assert rows[1]["error"] == "error: data file | missing" and rows[1]["loss"] is None
    csv_path, md_path = sweep.write_results(rows, tmp_path / "out")
    table = list(csv.DictReader(csv_path.open()))
    assert [t["name"] for t in table] == [r.name for r in runs]
    assert table[0]["tokens_per_s"] == "1234.5" and table[0]["rewards/accuracies"] == "0.75"
    assert table[2]["loss"] == "" and table[2]["status"] == "pending"
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| name | loss.0.hparams.beta | status | loss | rewards/accuracies |")
    assert len(md) == 2 + 3 and "data file \\| missing" in md[3]


def test_typo_ranking_accuracy_and_dpo_reward_accuracy_get_separate_columns(tmp_path):
    """TYPO's chosen > rejected on s·log πθ is the policy's ranking accuracy (Chen Def. 2.3); DPO's
    ``rewards/accuracies`` is reward accuracy (Remark 2.5). The table takes both from the losses' own aux."""
    import jax.numpy as jnp

    from jaxpref import losses

    # The policy ranks pairs 0, 1 right; the reference log-probs change which pairs the implicit reward gets right.
    pc, pr = [-1.0, -2.0, -5.0, -3.0], [-2.0, -3.0, -4.0, -1.0]
    rc, rr = [-1.5, -1.0, -7.0, -5.0], [-2.0, -4.0, -4.0, -2.0]
    ranking_acc = 2 / 4  # pc > pr: pairs 0, 1
    reward_acc = 3 / 4  # (pc − rc) > (pr − rr): 0.5 > 0 ✓, −1 > 1 ✗, 2 > 0 ✓, 2 > 1 ✓
    inputs = losses.LossInputs(*(jnp.asarray(x) for x in (pc, pr, rc, rr)),
                               reference_sample_logps=jnp.asarray([-3.0] * 4))
    typo_aux = {k: float(jnp.mean(v)) for k, v in losses.get("typo")(inputs).aux.items()}
    dpo_aux = {k: float(jnp.mean(v)) for k, v in losses.get("sigmoid")(inputs).aux.items()}
    assert typo_aux["typo/ranking_accuracy"] == ranking_acc and "rewards/accuracies" not in typo_aux
    assert dpo_aux["rewards/accuracies"] == reward_acc and "typo/ranking_accuracy" not in dpo_aux
    spec, runs = fake_runs(tmp_path)
    for run, aux in zip(runs, (dpo_aux, typo_aux)):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "summary.json").write_text(json.dumps({"final_metrics": {"loss": 0.5, **aux}}))
    rows = sweep.collect_results(runs)
    assert [r["rewards/accuracies"] for r in rows] == [reward_acc, None, None]
    assert [r["typo/ranking_accuracy"] for r in rows] == [None, ranking_acc, None]
    # Without a TYPO run the optional column is left out.
    assert "typo/ranking_accuracy" not in sweep.collect_results(runs[:1])[0]


FAKE_TRAIN = """
import json, pathlib, sys
run_dir = pathlib.Path(next(a for a in sys.argv if a.startswith("run_dir=")).split("=", 1)[1])
beta = float(next(a for a in sys.argv if a.startswith("loss.0.hparams.beta=")).split("=", 1)[1])
if beta == 0.2:
    sys.exit("error: boom at beta 0.2")
(run_dir / "summary.json").write_text(json.dumps({"final_metrics": {"loss": beta}, "tokens_per_s": 1.0}))
"""


def test_failed_run_is_recorded_not_fatal_and_rerun_resumes(tmp_path, monkeypatch):
    spec, runs = fake_runs(tmp_path)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = []

    def fake_command(spec, run, python="python"):
        calls.append(run.name)
        return [python, str(script), *run.overrides]

    monkeypatch.setattr(sweep, "command", fake_command)
    records = sweep.run_local(spec, runs, python=sys.executable, log=lambda msg: None)
    assert [r["status"] for r in records] == ["ok", "failed", "ok"]
    assert records[1]["returncode"] == 1 and records[1]["stderr_tail"] == ["error: boom at beta 0.2"]
    assert json.loads((runs[1].run_dir / sweep.STATUS_FILE).read_text())["status"] == "failed"
    assert [r["loss"] for r in sweep.collect_results(runs)] == [0.1, None, 0.3]
    calls.clear()
    again = sweep.run_local(spec, runs, python=sys.executable, log=lambda msg: None)
    assert calls == [runs[1].name]  # done runs are skipped; only the failed one runs again
    assert [r.get("skipped", False) for r in again] == [True, False, True]


# Same as tests/test_export_hf.py's TINY (so the two share compiled programs through the cache).
TINY = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
        "data.limit=8", "data.max_length=64", "data.buckets=[64]", "train.batch_size=8", "optim.lr=1e-3",
        "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
        "loss=[{name: sigmoid}]"]


def test_lora_rank_grid_expands_to_lora_runs(tmp_path):
    spec = sweep.load_sweep(write_sweep(tmp_path, {"overrides": ["lora={}"], "grid": {"lora.rank": [2, 4]}}))
    runs = sweep.expand(spec, tmp_path / "out")
    sweep.validate(spec, runs)
    cfgs = [load_config(RunConfig, spec.base, r.overrides) for r in runs]
    assert [r.name for r in runs] == ["rank=2", "rank=4"] and [c.lora.rank for c in cfgs] == [2, 4]


def test_real_two_run_sweep(tmp_path, shared_data, subprocess_env):
    """One real LoRA run (1 step, the grid's ``lora.rank``) and one that fails fast (missing data file); the sweep
    carries on."""
    hh = shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"
    common = [*TINY, "train.steps=1", "lora={alpha: 4}"]
    (tmp_path / "run.yaml").write_text("run_dir: runs/x\n")
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump({"base": "run.yaml", "kind": "preference", "overrides": common,
                                    "grid": {"data.train": [str(hh), str(tmp_path / "missing.jsonl")],
                                             "lora.rank": [2]}}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "train.sweep", "--sweep", str(path), "--out", str(out)],
                          cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # one run failed: recorded, reported, non-zero exit
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed"], proc.stderr[-3000:]
    assert float(rows[0]["loss"]) == pytest.approx(0.6931, abs=1e-3)  # step 1: policy == reference (B = 0)
    assert rows[0]["lora.rank"] == "2"
    adapters = json.loads((out / rows[0]["name"] / "model.json").read_text())["lora"]["adapters"]
    assert adapters and {a["rank"] for a in adapters.values()} == {2}
    assert rows[0]["rewards/accuracies"] != "" and float(rows[0]["tokens_per_s"]) > 0
    assert "missing.jsonl" in rows[1]["error"]
    assert (out / "results.md").is_file() and (out / "sweep.json").is_file()
