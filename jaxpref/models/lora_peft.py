"""PEFT LoRA adapter directories <-> jaxpref adapters (:mod:`jaxpref.models.lora`).

A PEFT (``peft`` 0.21) LoRA adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, ``base_model_name_or_path``, ...) and ``adapter_model.safetensors`` with, for every adapted
``torch.nn.Linear`` of the base model::

    base_model.model.<module>.lora_A.weight   (r, in_features)
    base_model.model.<module>.lora_B.weight   (out_features, r)

and the update ``lora_alpha / r * B A`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). The module names come
from each family's Hugging Face key table (:mod:`jaxpref.models.hf_keys`): a projection whose rule is a plain
``Linear(n_in)`` (``model.layers.{i}.self_attn.q_proj.weight`` <-> ``layers.{i}.attn.query_dnh``) maps one to
one, ``A [*in, r] <-> lora_A.T``, ``B [r, *out] <-> lora_B.T``, with the same flattening of the multi-axis
input / output dims as the weight itself. Projections stored fused on the Hugging Face side (Phi-3
``qkv_proj``, GPT-NeoX ``query_key_value``, GPT-2 ``c_attn``) have no PEFT counterpart and are refused.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxpref.config import ConfigError
from jaxpref.models import lora
from jaxpref.models.hf_keys import Linear
from jaxpref.models.layer_stack import LAYERS

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNROLLED = re.compile(rf"^{LAYERS}\.(\d+)\.(.*)$")


def module_map(model) -> dict[str, str]:
    """``{unrolled jaxpref projection path: HF module name}`` for every projection with a plain Linear rule."""
    table, n = type(model).HF_KEYS, model.config.num_layers
    out = {}
    for rule in table.all_rules(model.config.tie_word_embeddings):
        if len(rule.params) != 1 or not isinstance(rule.transform, Linear):
            continue
        if rule.params[0].rsplit(".", 1)[-1] not in lora.PROJECTIONS or not rule.hf[0].endswith(".weight"):
            continue
        for hf, params in rule.expand(n):
            out[params[0]] = hf[0].removesuffix(".weight")
    return out


def _unrolled(site: lora.Site, num_layers: int) -> list[tuple[str, int | None]]:
    """``[(unrolled path, layer index into the stacked arrays or None)]`` of a site."""
    if not site.lead:
        return [(site.path, None)]
    rest = site.path.removeprefix(LAYERS + ".")
    return [(f"{LAYERS}.{i}.{rest}", i) for i in range(num_layers)]


# ----------------------------------------------------------------------------------- export


def save_adapter(model, out: str | pathlib.Path, *, base_name: str | None = None) -> pathlib.Path:
    """Writes ``model``'s adapters as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads
    onto the Hugging Face export of the base.

    Raises:
      ConfigError: no adapters, adapters of several ranks / scales, or on a projection PEFT cannot name.
    """
    sites = lora.adapted_sites(model)
    if not sites:
        raise ConfigError("--adapter: the model has no LoRA adapters (a run trained without a lora section?)")
    names = module_map(model)
    tensors, modules, ranks, scales = {}, [], set(), set()
    for site in sites:
        a, b = (np.asarray(getattr(site.module, site.name + s)[...], np.float32) for s in (lora.A_SUFFIX,
                                                                                          lora.B_SUFFIX))
        rank = a.shape[-1]
        ranks.add(rank)
        scales.add(getattr(site.module, site.name + lora.SCALE_SUFFIX))
        for path, i in _unrolled(site, model.config.num_layers):
            if path not in names:
                raise ConfigError(f"--adapter: {model.config.family.value} stores {path} fused with other "
                                  "projections on the Hugging Face side; PEFT cannot name its adapter "
                                  "(export with --merge, or target other projections)")
            ai, bi = (a, b) if i is None else (a[i], b[i])
            mod = names[path]
            modules.append(mod)
            tensors[f"{PREFIX}{mod}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, rank).T)
            tensors[f"{PREFIX}{mod}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(rank, -1).T)
    if len(ranks) > 1 or len(scales) > 1:
        raise ConfigError(f"--adapter: adapters of ranks {sorted(ranks)} / scales {sorted(scales)}; a PEFT "
                          "directory here holds one rank and one lora_alpha")
    rank, scale = ranks.pop(), scales.pop()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(scale * rank),
              "lora_dropout": 0.0, "target_modules": _target_modules(modules, names), "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_name}
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _target_modules(modules: list[str], names: dict[str, str]) -> list[str] | str:
    """Leaf names (``["q_proj", "v_proj"]``) when every module of those names is adapted, else an exact regex."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = {m for m in names.values() if m.rsplit(".", 1)[-1] in leaves}
    if every == set(modules):
        return leaves
    return "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"


# ----------------------------------------------------------------------------------- import


def read_config(adapter_dir: pathlib.Path, field: str) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file() or not (adapter_dir / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{field}={adapter_dir}: expected a PEFT adapter directory with {CONFIG_FILE} and "
                          f"{WEIGHTS_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{field}={adapter_dir}: {CONFIG_FILE} is not valid JSON ({err})") from None
    unsupported = {"peft_type": cfg.get("peft_type") != "LORA", "use_dora": bool(cfg.get("use_dora")),
                   "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
                   "bias": cfg.get("bias", "none") != "none", "lora_bias": bool(cfg.get("lora_bias")),
                   "rank_pattern": bool(cfg.get("rank_pattern")), "alpha_pattern": bool(cfg.get("alpha_pattern")),
                   "modules_to_save": bool(cfg.get("modules_to_save"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"{field}={adapter_dir}: {CONFIG_FILE} sets {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)}"
                          "; jaxpref loads plain LoRA adapters only")
    return cfg


def load_adapter(model, adapter_dir: str | pathlib.Path, *, base_spec: str | None = None,
                 field: str = "model.adapter") -> list[str]:
    """Attaches the PEFT adapter in ``adapter_dir`` to ``model`` in place; returns the adapted projection paths.

    Args:
      base_spec: the base model's spec; a different ``base_model_name_or_path`` in the adapter is a warning.
      field: the config key named in errors.

    Raises:
      ConfigError: not a PEFT LoRA directory, a tensor naming no projection of ``model``, or a shape that does
        not fit (an adapter made for another base).
    """
    adapter_dir = pathlib.Path(adapter_dir).expanduser()
    cfg = read_config(adapter_dir, field)
    r = int(cfg["r"])
    lora.check_rank(r, field=f"{field} r")
    scale = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    _check_base(cfg.get("base_model_name_or_path"), base_spec, adapter_dir, field)
    tensors = load_file(adapter_dir / WEIGHTS_FILE)
    by_module = {m: p for p, m in module_map(model).items()}
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None or m.group(1) not in by_module:
            raise ConfigError(f"{field}={adapter_dir}: tensor {key} names no projection of this "
                              f"{model.config.family.value} model")
        found.setdefault(by_module[m.group(1)], {})[m.group(2)] = value
    done = []
    for site in lora.sites(model):
        parts = _unrolled(site, model.config.num_layers)
        if not any(p in found for p, _ in parts):
            continue
        a, b = _site_arrays(site, parts, found, r, adapter_dir, field)
        dtype = jnp.dtype(model.config.param_dtype)
        lora.set_adapter(site, jnp.asarray(a, dtype), jnp.asarray(b, dtype), scale)
        done.append(site.path)
    log.info("%s=%s: %d adapted projections (r=%d, scale %.4g)", field, adapter_dir, len(done), r, scale)
    return done


def _site_arrays(site, parts, found, r, adapter_dir, field) -> tuple[np.ndarray, np.ndarray]:
    shape, lead, n_in = site.var.get_value().shape, site.lead, site.n_in
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    want = {"A": (r, math.prod(in_shape)), "B": (math.prod(out_shape), r)}
    a_list, b_list = [], []
    for path, _ in parts:
        got = found.get(path)
        if got is None:  # a layer the adapter leaves alone: a zero update
            a_list.append(np.zeros((*in_shape, r), np.float32))
            b_list.append(np.zeros((r, *out_shape), np.float32))
            continue
        for which in "AB":
            if which not in got:
                raise ConfigError(f"{field}={adapter_dir}: {path} has lora_{'B' if which == 'B' else 'A'} missing")
            if tuple(got[which].shape) != want[which]:
                raise ConfigError(f"{field}={adapter_dir}: lora_{which} of {path} has shape "
                                  f"{tuple(got[which].shape)}, this model needs {want[which]} (an adapter for "
                                  "another base model?)")
        a_list.append(got["A"].T.reshape(*in_shape, r))
        b_list.append(got["B"].T.reshape(r, *out_shape))
    if lead:
        return np.stack(a_list), np.stack(b_list)
    return a_list[0], b_list[0]


def _check_base(recorded: str | None, base_spec: str | None, adapter_dir: pathlib.Path, field: str) -> None:
    if not recorded or not base_spec:
        return
    name = base_spec.split(":", 1)[1] if base_spec.startswith(("hf:", "preset:", "run:")) else base_spec
    same = recorded in (base_spec, name) or (
        pathlib.Path(recorded).expanduser().exists() and pathlib.Path(name).expanduser().exists()
        and pathlib.Path(recorded).expanduser().resolve() == pathlib.Path(name).expanduser().resolve())
    if not same:
        log.warning("%s=%s: base_model_name_or_path=%s differs from the base model %s; loading anyway", field,
                    adapter_dir, recorded, base_spec)
