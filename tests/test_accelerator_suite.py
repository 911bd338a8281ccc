"""``bench/accelerator_suite.py --dry-run``: every stage at tiny sizes on CPU, so the GPU command cannot rot."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import accelerator_suite  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("suite")
    accelerator_suite.main(["--out", str(out), "--dry-run"])
    return out, json.loads((out / "suite.json").read_text())


def test_dry_run_runs_every_stage_without_error(dry_run):
    out, result = dry_run
    assert result["stages"] == list(accelerator_suite.STAGES)
    for name in accelerator_suite.STAGES:
        assert "error" not in result["results"][name], (name, result["results"][name])
    checks = result["results"]["checks"]
    assert checks["failed"] == [] and checks["passed"] >= 8
    names = {r["check"] for r in checks["results"]}
    assert {"logprobs_float32", "logprobs_bfloat16", "dpo_step_float32", "dpo_step_bfloat16"} <= names
    assert any(r["check"].startswith("attention_blocked") and r["passed"] for r in checks["results"])
    mem = result["results"]["logprob_memory"]
    assert mem["chunked"]["temp_mib"] > 0 and mem["naive"]["temp_mib"] > mem["chunked"]["temp_mib"]


def test_dry_run_measures_dpo_scoring_and_generation(dry_run):
    out, result = dry_run
    dpo = result["results"]["dpo"]["results"]
    assert {r["reference"] for r in dpo} == {"live", "precomputed"} and result["results"]["dpo"]["layers"] == "scanned"
    for row in dpo:
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["compile_s"] > 0, row
        assert row["model_flops"] > 0 and all(abs(x) < 1e3 for x in row["losses"]), row
    scoring = result["results"]["scoring"]["runs"]
    for dtype in ("float32", "bfloat16"):
        run = scoring[dtype]
        assert run["n_pairs"] == 8 and 0 <= run["R"] <= 1 and run["scoring"]["compiles"] >= 1
    assert result["results"]["generation"]["tokens_per_s"] > 0
    md = (out / "suite.md").read_text()
    assert "## DPO step" in md and "| blocked | 64 |" in md and "numerical checks: " in md


def test_cpu_reference_comparison(tmp_path, dry_run):
    """``--cpu-reference``: R / R̃ of the float32 run against a CPU eval.ranking summary, within 1e-3."""
    _, result = dry_run
    run = result["results"]["scoring"]["runs"]["float32"]
    ref = tmp_path / "summary.json"
    for shift, expect in ((0.0, True), (0.002, False)):
        ref.write_text(json.dumps({"ranking_accuracy": run["R"] + shift, "n_pairs": 8,
                                   "ranking_accuracy_normalized": run["R_tilde"]}))
        assert accelerator_suite.compare_cpu(result["results"]["scoring"], ref)["matches_cpu_within_1e-3"] is expect


def test_unknown_stage_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        accelerator_suite.main(["--out", str(tmp_path), "--stages", "device,warp"])
    assert "--stages: unknown ['warp']" in capsys.readouterr().err


def test_readme_shows_the_commands_this_file_runs():
    readme = (ROOT / "README.md").read_text()
    assert "python bench/accelerator_suite.py --out DIR --dry-run" in readme
    assert "python bench/accelerator_suite.py --out DIR " in readme
    assert (ROOT / "bench" / "accelerator_suite.md").read_text().count("bench/accelerator_suite.py --out $OUT/") == 2
