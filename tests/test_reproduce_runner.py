"""``train.reproduce`` / :mod:`jaxpref.experiments.runner`: config loading, overrides, summaries."""

from __future__ import annotations

import json
import sys
import types

import pytest

from jaxpref.config import ConfigError
from jaxpref.experiments import runner


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
    table = runner.markdown_table([s])
    assert "| fake | x beats y | **no** | effect = -1; per_seed = [1, 2] |" in table


def test_unknown_module_is_a_config_error(tmp_path):
    exp = runner.load_experiment(_write(tmp_path, "experiment: no_such_experiment\n"))
    with pytest.raises(ConfigError, match="no experiment module"):
        runner.run_experiment(exp, tmp_path / "out")
