"""``train.reproduce`` / :mod:`jaxpref.experiments.runner`: config loading, overrides, summaries."""

from __future__ import annotations

import importlib
import json
import pathlib
import sys
import types

import pytest

from jaxpref.config import ConfigError
from jaxpref.experiments import runner

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "reproductions"
BEGIN, END = runner.README_BEGIN, runner.README_END


@pytest.fixture
def fake_experiment(monkeypatch):
    calls = []

    def run(params, seeds, out_dir, progress=True):
        calls.append((params, seeds))
        (out_dir / "results.json").write_text(json.dumps({"seeds": seeds}))
        return {"claim": "x beats y", "reproduced": params["effect"] > 0, "criterion": "effect > 0",
                "numbers": {"effect": float(params["effect"]), "per_seed": [1.0, 2.0]}}

    monkeypatch.setitem(sys.modules, "jaxpref.experiments.fake_exp", types.SimpleNamespace(run=run))
    return calls


def _write(tmp_path, text):
    path = tmp_path / "fake.yaml"
    path.write_text(text)
    return path


def test_load_merges_ci_and_overrides(tmp_path):
    path = _write(tmp_path, "experiment: fake_exp\nseeds: [0, 1, 2]\nparams: {effect: 1, steps: 100}\n"
                            "ci: {seeds: [0], params: {steps: 5}}\n")
    full = runner.load_experiment(path)
    assert full.seeds == (0, 1, 2) and full.params == {"effect": 1, "steps": 100}
    ci = runner.load_experiment(path, ["params.effect=-2"], ci=True)
    assert ci.seeds == (0,) and ci.params == {"effect": -2, "steps": 5}
    assert runner.load_experiment(path, seeds=[7]).seeds == (7,)


@pytest.mark.parametrize("text, override, match", [
    ("params: {}\n", (), "'experiment' key"),
    ("experiment: fake_exp\nsteps: 3\n", (), "unknown keys"),
    ("experiment: fake_exp\n", ("steps=3",), "'seeds' or 'params"),
    ("experiment: fake_exp\n", ("params.steps",), "KEY=VALUE"),
    ("experiment: fake_exp\nseeds: []\n", (), "at least one seed"),
])
def test_bad_experiment_files(tmp_path, text, override, match):
    with pytest.raises(ConfigError, match=match):
        runner.load_experiment(_write(tmp_path, text), override)


def test_run_writes_summary_and_table(tmp_path, fake_experiment):
    exp = runner.load_experiment(_write(tmp_path, "experiment: fake_exp\nseeds: [3]\nparams: {effect: -1}\n"))
    s = runner.run_experiment(exp, tmp_path / "out", progress=False)
    assert fake_experiment == [({"effect": -1}, [3])]
    assert s["reproduced"] is False and s["seeds"] == [3] and s["runtime_s"] >= 0
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["claim"] == "x beats y" and on_disk["numbers"]["effect"] == -1.0
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fake.yaml").write_text((tmp_path / "fake.yaml").read_text())
    (tmp_path / "configs" / "later.yaml").write_text("experiment: fake_exp\npaper: Later et al.\n"
                                                     "description: not run yet\nseeds: [0, 1]\n")
    table = runner.summary_table(tmp_path / "out_all", tmp_path / "configs", write=False)
    assert not (tmp_path / "out_all" / "summary.md").exists()
    (tmp_path / "out_all").mkdir()
    (tmp_path / "out").rename(tmp_path / "out_all" / "fake")
    table = runner.summary_table(tmp_path / "out_all", tmp_path / "configs")
    lines = table.splitlines()
    assert lines[0].startswith("| paper (config) | claim | reproduced |") and len(lines) == 4
    assert lines[2] == "| fake_exp (`fake`) | x beats y | **no** | effect = -1; per_seed = [1, 2] | 1 | 0 s |"
    assert lines[3] == "| Later et al. (`later`) | not run yet | not run at the full settings | | 2 | |"
    assert (tmp_path / "out_all" / "summary.md").read_text().endswith("\n\n" + table)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    runner.replace_readme_table(readme, table)
    assert readme.read_text() == f"# x\n\nbefore\n{BEGIN}\n{table}{END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        runner.replace_readme_table(readme, table)


def test_unknown_module_is_a_config_error(tmp_path):
    exp = runner.load_experiment(_write(tmp_path, "experiment: no_such_experiment\n"))
    with pytest.raises(ConfigError, match="no experiment module"):
        runner.run_experiment(exp, tmp_path / "out")


# ----------------------------------------------------------------------------- the committed full-setting results


def test_readme_table_is_generated_from_the_committed_results():
    """The README's reproduction table (between the markers) and ``summary.md`` equal the table regenerated
    from ``results/reproductions/*/summary.json``."""
    readme = (REPO / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, "README needs one reproductions:begin/end pair"
    section = readme.split(BEGIN)[1].split(END)[0]
    generated = runner.summary_table(RESULTS, write=False)
    assert section.strip("\n") == generated.strip("\n"), "README table is stale: run train.reproduce --table"
    assert (RESULTS / "summary.md").read_text().endswith("\n\n" + generated)


def test_committed_results_are_of_the_current_configs_and_code():
    """Each committed summary was run with the current YAML's full settings and states the module's current
    claim (so a changed config or claim makes the committed results, and the README table, stale)."""
    summaries = sorted(RESULTS.glob("*/summary.json"))
    assert summaries, f"no committed results under {RESULTS}"
    for path in summaries:
        s = json.loads(path.read_text())
        exp = runner.load_experiment(REPO / "configs" / "experiments" / f"{path.parent.name}.yaml")
        assert (s["name"], s["experiment"], s["paper"]) == (exp.name, exp.module, exp.paper), path
        assert s["params"] == exp.params and s["seeds"] == list(exp.seeds), f"{path}: not the current full settings"
        assert s["claim"] == importlib.import_module(f"jaxpref.experiments.{exp.module}").CLAIM, path
        for png in path.parent.glob("*.png"):
            assert png.stat().st_size < 400_000, png  # committed plots stay small
        results = json.loads((path.parent / "results.json").read_text())
        assert results["seeds"] == s["seeds"], path


def test_table_command_rewrites_only_the_readme_table(tmp_path, capsys):
    """``python -m train.reproduce --table --out DIR --readme FILE`` (the README's command) on a copy of the
    committed results and a README whose table is stale: the table is replaced, the rest of the file kept."""
    import shutil

    from train import reproduce

    out = tmp_path / "reproductions"
    shutil.copytree(RESULTS, out, ignore=shutil.ignore_patterns("*.png", "results.json"))
    (out / "summary.md").unlink()
    readme = tmp_path / "README.md"
    text = (REPO / "README.md").read_text()
    stale = text.split(BEGIN)[0] + BEGIN + "\n| stale |\n" + END + text.split(END)[1]
    readme.write_text(stale)
    assert reproduce.main(["--table", "--out", str(out), "--readme", str(readme)]) == []
    assert readme.read_text() == text
    assert (out / "summary.md").read_text() == (RESULTS / "summary.md").read_text()
    assert runner.summary_table(RESULTS, write=False).strip() in capsys.readouterr().out
