"""Every checked-in YAML under ``configs/`` parses (run configs through ``load_config``, sweeps through
``jaxpref.sweep``, with every sweep run validated), and config errors name the file and the key (R16)."""

import importlib.util
import pathlib

import pytest
import yaml

from jaxpref import losses, sweep
from jaxpref.config import ConfigError, RunConfig, load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))


def _id(path: pathlib.Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_configs_are_found():
    names = {_id(p) for p in ALL_YAML}
    assert {"base.yaml", "hh_dpo.yaml", "sweeps/beta_grid.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=_id)
def test_checked_in_config_parses(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    if "experiment" in raw:  # a reproduction (train.reproduce): its module exists and the settings load
        from jaxpref.experiments import runner

        exp = runner.load_experiment(path, ci=True)
        assert importlib.util.find_spec(f"jaxpref.experiments.{exp.module}") is not None, exp.module
        return
    if sweep.is_sweep_file(path):
        spec = sweep.load_sweep(path)
        runs = sweep.expand(spec, tmp_path)
        assert runs and len({r.name for r in runs}) == len(runs)
        sweep.validate(spec, runs)  # every run's config and loss composition
        return
    if path.parent.name == "demo":  # train.demo settings: every run section is a valid RunConfig
        from jaxpref.demo import check_config

        check_config(raw)
        return
    cfg = load_config(RunConfig, path)
    assert cfg.run_dir
    losses.compose([{"name": t.name, "weight": t.weight, **t.hparams} for t in cfg.loss])


def test_beta_grid_sweep_is_the_documented_grid(tmp_path):
    spec = sweep.load_sweep(CONFIGS / "sweeps" / "beta_grid.yaml")
    assert spec.base == (CONFIGS / "hh_dpo.yaml").resolve() and spec.kind == "preference"
    runs = sweep.expand(spec, tmp_path)
    assert len(runs) == 2 * 3 * 2
    cfg = load_config(RunConfig, spec.base, runs[-1].overrides)
    assert (cfg.loss[0].name, cfg.loss[0].hparams["beta"], cfg.train.seed) == ("ipo", 0.5, 1)
    assert cfg.model.source == "run:runs/hh_sft" and cfg.optim.lr == 5e-5  # the rest comes from hh_dpo.yaml


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body, key, match", [
    ("train: {stepz: 3}\n", "train.stepz", "Key 'stepz' not in 'TrainLoopConfig'"),
    ("train: {steps: many}\n", "train.steps", "could not be converted to Integer"),
    ("optim: {name: lion}\n", "optim.name", "expected one of"),
    ("reference: {strategy: cached}\n", "reference.strategy", "expected one of"),
    ("loss: [{name: ipo, wieght: 2.0}]\n", "loss.0", "Key 'wieght' not in 'LossTermConfig'"),
    ("loss: [{name: ipo}, {name: sft, weight: heavy}]\n", "loss.1", "could not be converted to Float"),
    ("modle: {source: preset:tiny_llama}\n", "modle", "Key 'modle' not in 'RunConfig'"),
])
def test_bad_config_file_names_file_and_key(tmp_path, body, key, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(RunConfig, path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_error_in_base_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {schedule: exponential}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match="optim.schedule='exponential'") as info:
        load_config(RunConfig, tmp_path / "child.yaml")
    assert str(tmp_path / "base.yaml") in str(info.value)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'optim.name=lion': optim.name='lion'"):
        load_config(RunConfig, None, ["optim.name=lion"])
    with pytest.raises(ConfigError, match=r"override 'loss.1.weight=0.5': index 1 is out of range"):
        load_config(RunConfig, None, ["loss.1.weight=0.5"])
    with pytest.raises(ConfigError, match=r"'loss.0.nme=x'.*full_key: loss\[0\].nme"):
        load_config(RunConfig, None, ["loss.0.nme=x"])


def test_dotted_overrides_into_lists():
    cfg = load_config(RunConfig, CONFIGS / "hh_dpo.yaml", ["loss.0.weight=0.5", "loss.0.hparams.beta=0.2"])
    assert (cfg.loss[0].name, cfg.loss[0].weight, cfg.loss[0].hparams) == ("sigmoid", 0.5, {"beta": 0.2})
    cfg = load_config(RunConfig, CONFIGS / "hh_dpo.yaml", ["loss=[{name: ipo}]"])
    assert [(t.name, t.weight, t.hparams) for t in cfg.loss] == [("ipo", 1.0, {})]
    cfg = load_config(RunConfig, None, ["loss=[{name: sigmoid}, {name: sft, weight: 0.1}]", "loss.1.weight=0.2",
                                        "data.buckets.0=64"])
    assert [(t.name, t.weight) for t in cfg.loss] == [("sigmoid", 1.0), ("sft", 0.2)]
    assert cfg.data.buckets[0] == 64


def test_model_remat_settings_reach_model_loading(monkeypatch, tmp_path):
    """``model.remat`` / ``model.remat_policy`` are applied by the trainers (they once were dead fields)."""
    from jaxpref.training import loop

    cfg = load_config(RunConfig, None, [f"run_dir={tmp_path / 'r'}", "model.remat=true",
                                        "model.remat_policy=dots_no_batch", "model.overrides={num_layers: 1}"])
    assert cfg.model.model_overrides() == {"num_layers": 1, "remat": True, "remat_policy": "dots_no_batch"}
    assert load_config(RunConfig, None, []).model.model_overrides() == {}
    seen = {}

    class Stop(Exception):
        pass

    def fake_load_model(spec, **kw):
        seen.update(kw["overrides"])
        raise Stop

    monkeypatch.setattr(loop, "load_model", fake_load_model)
    with pytest.raises(Stop):
        loop.run_training(cfg, kind="sft")
    assert {k: v for k, v in seen.items() if k != "scan_layers"} == {"num_layers": 1, "remat": True,
                                                                     "remat_policy": "dots_no_batch"}
    assert not seen.get("scan_layers", False)  # the run's layout (model.scan_layers, default unrolled)
    with pytest.raises(ConfigError, match="model.remat_policy"):
        load_config(RunConfig, None, ["model.remat_policy=most"])
