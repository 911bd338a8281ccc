"""Hugging Face safetensors checkpoints <-> jaxpref models, through each family's key table.

Import: ``config.json`` -> :class:`ModelConfig`; the model is built abstractly
(``nnx.eval_shape``, no random init), then every parameter is read from the (single-file or
sharded) safetensors checkpoint with ``safetensors``' NumPy backend, transformed by its
:class:`~jaxpref.models.hf_keys.KeyRule`, cast to ``param_dtype`` and placed directly with its
target ``NamedSharding`` when a mesh is given (each device only receives its slice). Every
file key must be consumed (or be a known buffer) and every shape must match, else a
``CheckpointMismatchError`` names the offending keys. Key tables name layers one by one
(``layers.{i}.*``); a model with ``scan_layers`` reads and writes layer ``i`` of its stacked
parameters through :func:`jaxpref.models.layer_stack.unrolled_paths`, so every family, and GGUF and
llama2.c (which load through here), work in both layouts with no per-family code.

Export: the same rules in reverse -> ``model.safetensors`` (metadata ``format: pt``) +
``config.json`` (+ ``generation_config.json`` and tokenizer files copied from a source dir),
which ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

PyTorch is never imported here.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpref.models.config import ModelConfig
from jaxpref.models.hf_keys import KeyTable
from jaxpref.models.layer_stack import unrolled_paths
from jaxpref.models.registry import abstract_model, model_class
from jaxpref.models.transformer import CausalLM
from jaxpref.parallel import DEFAULT_RULES, state_shardings

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Copied verbatim from a source checkpoint on export when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model its config describes."""


class SafetensorsCheckpoint(Mapping):
    """Lazy, read-only ``{HF key: np.ndarray}`` over ``model.safetensors`` or a sharded index.

    Tensors are read on access, one at a time, so peak host memory is one tensor (plus the
    OS page cache), not the checkpoint.
    """

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        if (path / INDEX_FILE).exists():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            self._files = {k: path / f for k, f in weight_map.items()}
        elif (path / SINGLE_FILE).exists():
            with safe_open(path / SINGLE_FILE, framework="np") as f:
                self._files = {k: path / SINGLE_FILE for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
        self._handles: dict[pathlib.Path, object] = {}

    def _open(self, key: str):
        file = self._files[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="np")
        return self._handles[file]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(key).get_slice(key).get_shape())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._open(key).get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _table(config: ModelConfig) -> KeyTable:
    table = model_class(config.family).HF_KEYS
    if table is None:
        raise NotImplementedError(f"{config.family.value} has no Hugging Face key table")
    return table


def _concrete_rules(config: ModelConfig, params: Mapping[str, object]):
    """Expanded ``(rule, hf names, param paths)`` for every rule whose parameters the model has.

    ``params`` is keyed by *unrolled* paths (``layers.{i}.*``), whatever the model's layout.
    """
    out = []
    for r in _table(config).all_rules(config.tie_word_embeddings):
        for hf_names, paths in r.expand(config.num_layers):
            present = [p in params for p in paths]
            if any(present) and not all(present):
                raise RuntimeError(f"key table bug: rule {hf_names[0]} -> {paths}: only some parameters exist")
            if all(present):
                out.append((r, hf_names, paths))
    return out


def _layer_view(config: ModelConfig, flat: Mapping[str, nnx.Variable]) -> dict[str, tuple[str, int | None]]:
    """Unrolled path -> (the model's parameter path, layer index in a stacked parameter or None)."""
    return unrolled_paths({p: tuple(v.get_value().shape) for p, v in flat.items()}, config.num_layers)


def params_from_hf(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> CausalLM:
    """Builds a model of ``config`` whose parameters come from HF-named ``tensors``.

    Works in both layer layouts (``config.scan_layers``): the key table names layers one by one,
    and a stacked parameter is assembled on the host from its L per-layer tensors before it is
    placed (peak host memory: one stacked parameter).

    Args:
      config: the target architecture and dtypes.
      tensors: HF key -> array (a dict or a lazy :class:`SafetensorsCheckpoint`).
      mesh: place each parameter with the sharding its logical axes imply on this mesh;
        None = default device.
      rules: logical-to-mesh rules (see :mod:`jaxpref.parallel`).

    Raises:
      CheckpointMismatchError: missing / unexpected keys or wrong shapes (all listed).
    """
    graphdef, state = nnx.split(abstract_model(config))
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    view = _layer_view(config, flat)
    shardings = None
    if mesh is not None:
        shardings = {_path_str(p): s for p, s in nnx.to_flat_state(state_shardings(state, mesh, rules))}
    table, dtype = _table(config), config.jnp_param_dtype
    shape_of = tensors.shape if isinstance(tensors, SafetensorsCheckpoint) else (lambda k: tuple(tensors[k].shape))

    def place(path: str, value: np.ndarray) -> None:
        if shardings is None:
            array = jnp.asarray(value)
        else:  # each device (and host) only materialises its own slice.
            array = jax.make_array_from_callback(value.shape, shardings[path], lambda idx, v=value: v[idx])
        flat[path].set_value(array)

    def target_shape(unrolled: str) -> tuple[int, ...]:
        path, layer = view[unrolled]
        shape = tuple(flat[path].get_value().shape)
        return shape if layer is None else shape[1:]

    stacked: dict[str, np.ndarray] = {}  # stacked path -> host buffer [L, ...], placed once complete
    filled: dict[str, int] = {}
    concrete = _concrete_rules(config, view)
    uncovered = sorted(set(view) - {p for _, _, paths in concrete for p in paths})
    consumed, missing, errors = set(), [], []
    for r, hf_names, paths in concrete:
        key = next((k for k in hf_names if k in tensors), None)
        if key is None:
            missing.append(hf_names[0])
            continue
        consumed.add(key)
        targets = [target_shape(p) for p in paths]
        expected = tuple(r.transform.hf_shape(targets))
        if shape_of(key) != expected:
            errors.append(f"{key}: checkpoint shape {shape_of(key)}, expected {expected} "
                          f"(for {', '.join(paths)} of shapes {targets})")
            continue
        for unrolled, value in zip(paths, r.transform.to_jax(np.asarray(tensors[key]), targets), strict=True):
            value = value.astype(dtype, copy=False)
            path, layer = view[unrolled]
            if layer is None:
                place(path, np.ascontiguousarray(value))
                continue
            if path not in stacked:
                stacked[path] = np.empty(flat[path].get_value().shape, dtype)
            stacked[path][layer] = value
            filled[path] = filled.get(path, 0) + 1
            if filled[path] == config.num_layers:
                place(path, stacked.pop(path))

    tied_duplicates = set(table.head.hf) if config.tie_word_embeddings else set()
    unexpected = sorted(k for k in tensors if k not in consumed and k not in tied_duplicates and not table.ignored(k))
    if missing or unexpected or errors or uncovered:
        lines = [f"missing from checkpoint: {missing}"] if missing else []
        lines += [f"unexpected in checkpoint (not used by a {config.family.value} model with this config): "
                  f"{unexpected}"] if unexpected else []
        lines += [f"shape mismatch: {e}" for e in errors]
        lines += [f"parameters no key-table rule covers: {uncovered}"] if uncovered else []
        raise CheckpointMismatchError("cannot load checkpoint into " + config.family.value + ":\n  " +
                                      "\n  ".join(lines))
    return nnx.merge(graphdef, state)


def load_hf(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    rules=DEFAULT_RULES,
    **config_overrides,
) -> CausalLM:
    """Loads a Hugging Face checkpoint directory (``config.json`` + safetensors) as a jaxpref model.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``.
      mesh: shard parameters on this mesh while loading (None: one device).
      dtype: compute dtype (default: the checkpoint's dtype).
      param_dtype: storage dtype (default: the checkpoint's dtype).
      rules: logical-to-mesh rules.
      **config_overrides: further :class:`ModelConfig` fields, e.g. ``remat=True``.

    Returns:
      The model; ``model.config`` is the resolved :class:`ModelConfig`.
    """
    path = pathlib.Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    overrides = dict(config_overrides)
    overrides.update({k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None})
    config = ModelConfig.from_hf_config(hf_config, **overrides)
    return params_from_hf(config, SafetensorsCheckpoint(path), mesh=mesh, rules=rules)


def hf_tensors(model: CausalLM, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named NumPy arrays (gathered to host), via the key table."""
    config = model.config
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    view = _layer_view(config, flat)
    host: dict[str, np.ndarray] = {}  # each parameter gathered once (a stacked one serves L layers)

    def array(unrolled: str) -> np.ndarray:
        path, layer = view[unrolled]
        if path not in host:
            host[path] = np.asarray(jax.device_get(flat[path].get_value()))
        return host[path] if layer is None else host[path][layer]

    out, used = {}, set()
    for r, hf_names, paths in _concrete_rules(config, view):
        arrays = [array(p) for p in paths]
        value = r.transform.to_hf(arrays, [a.shape for a in arrays])
        out[hf_names[0]] = np.ascontiguousarray(value.astype(dtype or config.param_dtype, copy=False))
        used.update(paths)
    if set(view) - used:
        raise RuntimeError(f"key table does not export parameters {sorted(set(view) - used)}")
    return out


def save_hf(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
) -> pathlib.Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers`` can load.

    Args:
      model: a jaxpref model (any sharding; parameters are gathered to host).
      path: output directory (created).
      source_dir: a HF checkpoint dir whose ``generation_config.json``, tokenizer files and
        chat template are copied alongside.
      dtype: export dtype (default ``config.param_dtype``); also written to ``config.json``.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model, dtype=dtype)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
    hf_config = model.config.to_hf_config()
    if dtype is not None:
        hf_config["dtype"] = jnp.dtype(dtype).name
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if source_dir is not None:
        source_dir = pathlib.Path(source_dir)
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (source_dir / name).exists() and source_dir.resolve() != path.resolve():
                shutil.copy2(source_dir / name, path / name)
    log.info("saved %s (%d tensors) to %s", model.config.family.value, len(tensors), path)
    return path

