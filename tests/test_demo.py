"""The embedded-default demo (README command 1) end to end on a shortened config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from jaxpref.demo import DEFAULT_CONFIG, run_demo

REPORT_FILES = ("metrics.json", "report.md", "loss_curves.png", "win_rate.png", "ranking_vs_idealized.png",
                "ches_hist.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["testbed"]["num_prompts"] = 4
    cfg["data"] = {"sft_examples": 256, "train_pairs": 128, "eval_pairs": 64, "votes": 3}
    for section in ("sft", "preference"):
        cfg[section]["train"]["steps"] = 10
        cfg[section]["train"]["batch_size"] = 16
    cfg["preference"]["checkpoint"]["every"] = 5
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp / "out", run_demo(tmp / "out", config=path, progress=False), cfg


@pytest.mark.slow
def test_demo_writes_the_report(demo):
    out, result, cfg = demo
    for name in REPORT_FILES:
        assert (out / "report" / name).is_file(), name
    on_disk = json.loads((out / "report" / "metrics.json").read_text())
    assert set(on_disk["methods"]) == set(cfg["methods"])
    for name in cfg["methods"]:
        assert (out / "runs" / name / "metrics.jsonl").is_file()
        assert (out / "eval" / name / "ranking.json").is_file()


@pytest.mark.slow
def test_demo_numbers_are_consistent(demo):
    _, result, cfg = demo
    for name, m in result["methods"].items():
        traj = m["trajectory"]
        assert traj["step"] == [0, 5, 10]  # every checkpoint evaluated exactly
        assert traj["win_rate"][0] == 0.5 and traj["kl"][0] == 0.0
        assert all(0.0 <= w <= 1.0 for w in traj["win_rate"]) and all(k >= 0.0 for k in traj["kl"][1:])
        assert traj["kl"][-1] > 0.0  # training moved the policy
        # the eval script's ranking accuracy (real pipeline) equals the exact one from enumeration
        assert m["ranking"]["matches_exact"], (name, m["ranking"])
        assert 0.0 <= m["ranking"]["ranking_accuracy"] <= 1.0
    assert result["timings_s"]["total_s"] > 0


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_key_the_demo_and_report_read_is_written(demo):
    """The keys jaxpref.demo and eval.report read exist in the files this demo run's scripts wrote."""
    from eval import report
    from jaxpref import demo as demo_mod

    out, result, cfg = demo
    runs = [out / "runs" / "sft", *(out / "runs" / name for name in cfg["methods"])]
    rows = [r for run in runs for r in _jsonl(run / "metrics.jsonl")]
    assert all(set(demo_mod.METRICS_ROW_KEYS) <= set(r) and report.STEP_KEY in r for r in rows)
    written = {k for r in rows for k in r}
    assert set(report.NOT_PLOTTED) <= written, set(report.NOT_PLOTTED) - written
    for name in cfg["methods"]:
        ranking = json.loads((out / "eval" / name / "ranking.json").read_text())
        assert set(demo_mod.RANKING_KEYS) <= set(ranking) and "R_star" in ranking["idealized"]
        assert all(set(demo_mod.RANKING_ROW_KEYS) <= set(r) for r in _jsonl(out / "eval" / name / "per_example.jsonl"))
    ches = json.loads((out / "eval" / "ches" / "summary.json").read_text())
    assert set(demo_mod.CHES_KEYS) <= set(ches)
    ches_rows = _jsonl(out / "eval" / "ches" / "ches.jsonl")
    assert all(set(demo_mod.CHES_ROW_KEYS) <= set(r) for r in ches_rows)
    # Nothing dropped on the way into metrics.json (the share of positive CHES used to be lost).
    on_disk = json.loads((out / "report" / "metrics.json").read_text())
    assert set(on_disk["ches"]) == set(demo_mod.CHES_KEYS)
    assert on_disk["ches"]["fraction_ches_positive"] == np.mean([r["ches"] > 0 for r in ches_rows])
