"""A plain ``pip install -e .`` gives a working install (README command 1).

* Every third-party module imported by ``jaxpref/``, ``train/`` and ``eval/`` belongs to a distribution in
  ``install_requires`` (or is an optional, lazily imported extra), and so does ``jinja2``, which
  transformers needs for chat templates without declaring it.
* A tokenizer that cannot work in this environment is one :class:`TokenizerError`, not one reject per row.
* A child config's free-form mapping (``model.overrides: {}``) replaces its base's instead of merging.

``.ci/run`` also installs the package without extras in a fresh venv and trains / evaluates there.
"""

from __future__ import annotations

import ast
import configparser
import functools
import importlib.metadata
import pathlib
import re
import sys

import pytest

from jaxpref import data
from jaxpref.config import RunConfig, load_config
from jaxpref.data.tokenize import ENV_CHECK_ROWS, TokenizerError
from jaxpref.testing.tokenizers import make_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = {"jaxpref", "train", "eval"}
# Imported only inside functions, for features that say what to install when missing.
OPTIONAL = {"torch": "eval.crosscheck and jaxpref.testing (test extras)", "wandb": "logging.wandb_project"}
RUNTIME_ONLY = {"jinja2"}  # never imported by jaxpref, but transformers' apply_chat_template needs it


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _install_requires() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [x.strip() for x in cfg["options"]["install_requires"].splitlines()]
    return {_norm(re.split(r"[<>=!~;\[ ]", x, maxsplit=1)[0]) for x in lines if x and not x.startswith("#")}


@functools.cache
def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Top-level module -> [(file:line, imported at module level?)] over the installed packages' sources."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for folder in sorted(FIRST_PARTY):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            top_level = {id(n) for n in tree.body}
            for parent in ast.walk(tree):  # module-level also means inside a top-level try / if
                if isinstance(parent, ast.If | ast.Try) and id(parent) in top_level:
                    top_level |= {id(n) for n in ast.walk(parent)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in FIRST_PARTY and top not in sys.stdlib_module_names and top != "__future__":
                        where = f"{path.relative_to(REPO)}:{node.lineno}"
                        found.setdefault(top, []).append((where, id(node) in top_level))
    return found


def test_every_import_is_declared():
    declared = _install_requires()
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, sites in sorted(_imports().items()):
        if module in OPTIONAL:
            eager = [w for w, top in sites if top]
            assert not eager, f"optional {module} ({OPTIONAL[module]}) imported at module level: {eager}"
            continue
        owners = {_norm(d) for d in dists.get(module, [])}
        if not owners:
            missing[module] = f"not installed here and not optional ({sites[0][0]})"
        elif not owners & declared:
            missing[module] = f"distribution {sorted(owners)} not in install_requires ({sites[0][0]})"
    assert not missing, f"undeclared runtime imports: {missing}"
    assert {_norm(m) for m in RUNTIME_ONLY} <= declared


def test_audit_sees_the_imports_it_checks():
    """The scan finds known imports (module-level and lazy), so the audit above cannot pass vacuously."""
    found = _imports()
    assert any(top for _, top in found["yaml"]) and any(w.startswith("jaxpref/config.py") for w, _ in found["yaml"])
    assert found["gguf"] and not any(top for _, top in found["gguf"])  # lazy, inside gguf_io functions
    assert {"jax", "flax", "numpy", "scipy", "transformers", "orbax"} <= set(found)


def _hh(n: int):
    return [data.PreferenceRecord(row=i, id=f"r{i}", prompt=f"\n\nHuman: question {i}?\n\nAssistant:",
                                  chosen=f" answer {i}", rejected=f" no {i}") for i in range(n)]


def test_template_missing_its_package_is_one_error(monkeypatch):
    """transformers raises ImportError from apply_chat_template without jinja2 (fresh venv, no torch): one
    TokenizerError naming the package, and no per-row rejects."""
    from transformers.utils import chat_template_utils

    monkeypatch.setattr(chat_template_utils, "is_jinja_available", lambda: False)
    chat_template_utils._compile_jinja_template.cache_clear()
    rejects = data.RejectLog()
    try:
        with pytest.raises(TokenizerError, match="chat template cannot run here: ImportError: .*requires jinja2"):
            data.tokenize_pairs(_hh(40), make_tokenizer(), rejects=rejects)
    finally:
        chat_template_utils._compile_jinja_template.cache_clear()
    assert len(rejects) == 0


@pytest.mark.parametrize("n", [3, 40])
def test_template_failing_identically_on_every_row_is_one_error(n):
    tok = make_tokenizer()
    tok.chat_template = "{{ raise_exception('this template needs a tools list') }}"
    with pytest.raises(TokenizerError, match=rf"first {min(n, ENV_CHECK_ROWS)} records \(TemplateError: .*tools"):
        data.tokenize_pairs(_hh(n), tok)


def test_row_failures_are_still_rejects_when_the_template_works():
    """Failures that differ per row, or follow a rendered row, stay row rejects (the data's fault)."""
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if 'bad' in m['content'] %}{{ raise_exception(m['content']) }}"
                         "{% endif %}{{ m['content'] }}{% endfor %}")
    recs = _hh(ENV_CHECK_ROWS + 4)
    for i in range(ENV_CHECK_ROWS):  # every leading row fails, each with its own message
        recs[i] = data.PreferenceRecord(row=i, id=f"r{i}", prompt=f"bad {i}", chosen="a", rejected="b")
    rejects = data.RejectLog()
    pairs = data.tokenize_pairs(recs, tok, rejects=rejects)
    assert len(pairs) == 4 and [r.row for r in rejects] == list(range(ENV_CHECK_ROWS))
    same = [data.PreferenceRecord(row=0, id="ok", prompt="fine", chosen="a", rejected="b"),
            *[data.PreferenceRecord(row=i, id=f"r{i}", prompt="bad", chosen="a", rejected="b") for i in range(1, 30)]]
    assert len(data.tokenize_pairs(same, tok)) == 1  # identical failures after a rendered row: rejects


def test_child_mapping_replaces_the_base_mapping(tmp_path):
    """``overrides: {}`` in a child clears base.yaml's ``{vocab_size: 512}`` (it merged before, so SmolLM2 was
    built with a 512-token vocabulary); sections still merge; a dotted key sets one entry."""
    cfg = load_config(RunConfig, REPO / "configs" / "smollm2_dpo.yaml")
    assert cfg.model.overrides == {} and cfg.model.source == "gguf:smollm2-135m-instruct"
    assert cfg.optim.name == "adamw" and cfg.optim.schedule == "cosine"  # from base.yaml: sections merge
    (tmp_path / "base.yaml").write_text("model: {overrides: {vocab_size: 512, num_layers: 2}}\n"
                                        "data: {fields: {prompt: q, chosen: good}}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {overrides: {hidden_size: 32}}\n"
                                         "data: {fields: {rejected: bad}}\n")
    child = load_config(RunConfig, tmp_path / "child.yaml")
    assert child.model.overrides == {"hidden_size": 32} and child.data.fields == {"rejected": "bad"}
    over = load_config(RunConfig, tmp_path / "base.yaml", ["model.overrides={hidden_size: 8}"])
    assert over.model.overrides == {"hidden_size": 8}
    dotted = load_config(RunConfig, tmp_path / "base.yaml", ["model.overrides.vocab_size=49152"])
    assert dotted.model.overrides == {"vocab_size": 49152, "num_layers": 2}
    nested = load_config(RunConfig, tmp_path / "base.yaml", ["model={overrides: {}}"])
    assert nested.model.overrides == {} and nested.data.fields == {"prompt": "q", "chosen": "good"}
