"""LoRA / QLoRA runs (``lora:`` section): what the training loop and ``run:`` loading add for adapters.

A LoRA run trains the adapters alone (:mod:`jaxpref.models.lora`): ``TrainState.params`` and the optimizer
state hold only ``nnx.LoRAParam`` leaves, so checkpoints hold only them too. The frozen base is rebuilt from
the source ``model.json`` records under ``lora`` (source spec, seed, overrides, quantisation), never written
again at a save, and passed to the step as its non-donated ``ref_params`` argument; a ``live`` or
``precomputed`` reference is the base with the adapters off, so there is no second parameter tree, unless
``reference.source`` names another model (then that model, run with its own graph). TR-DPO
(``reference.sync_every``) keeps one adapter tree more: the reference is the base plus a copy of the policy's
adapters taken at each sync (hard updates only).
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from typing import Any

import jax
from flax import nnx

from jaxpref.config import RunConfig
from jaxpref.models import lora

log = logging.getLogger(__name__)


def check_supported(cfg: RunConfig, kind: str, run_error: type[Exception]) -> None:
    """``run_error`` naming the setting when a LoRA run asks for what is not implemented with adapters yet."""
    if cfg.lora is None and cfg.model.adapter is None:
        return
    refusals = [
        (kind not in ("preference", "sft", "reward"),
         f"lora is supported by train.preference, train.sft and train.reward_model, not {kind} runs"),
        (cfg.model.adapter is not None and cfg.lora is None,
         "model.adapter without a lora section: set lora={} to train the adapter (the base stays frozen)"),
        (cfg.reference.sync_every > 0 and cfg.reference.sync_alpha < 1,
         f"lora with reference.sync_alpha={cfg.reference.sync_alpha} < 1: mixing the adapter factors A and B is not "
         "mixing the weights (B A is bilinear); use reference.sync_alpha=1 (TR-DPO's hard update)"),
        (cfg.reference.sync_every > 0 and cfg.reference.source is not None,
         "lora with reference.sync_every > 0 makes the reference the base plus synced copies of the policy's "
         "adapters, not reference.source: drop one of them"),
    ]
    for bad, message in refusals:
        if bad:
            raise run_error(message)


def base_record(cfg: RunConfig, loaded) -> dict[str, Any]:
    """How to rebuild the frozen base (``model.json``'s ``lora.base``): spec, seed, overrides and dtypes."""
    spec = f"hf:{pathlib.Path(loaded.hf_dir).resolve()}" if loaded.hf_dir is not None else loaded.spec
    if spec.startswith("run:"):  # run:DIR@STEP from wherever the run is read later
        path, _, step = spec.removeprefix("run:").partition("@")
        spec = f"run:{pathlib.Path(path).expanduser().resolve()}" + (f"@{step}" if step else "")
    m = cfg.model
    return {"source": spec, "seed": cfg.train.seed, "overrides": {**m.model_overrides(), "scan_layers": m.scan_layers},
            "dtype": m.compute_dtype, "param_dtype": m.param_dtype,
            "adapter": None if m.adapter is None else str(pathlib.Path(m.adapter).expanduser().resolve())}


def attach_for_run(cfg: RunConfig, setup, mesh) -> dict[str, Any]:
    """Quantises the loaded base (``lora.quantize``), attaches the adapters, records both in ``model.json``.

    A ``model.adapter`` already loaded onto the model (PEFT) is the adapter that trains (its own rank and
    targets); otherwise fresh zero-B adapters of ``lora.rank`` on ``lora.targets``. Adapters of a LoRA run named
    by ``model.source`` (``run:``) are folded into the base first: that run's policy is the base and the reference.

    Returns:
      :func:`jaxpref.models.lora.split` of the model: ``graphdef``, ``adapters``, ``base``, ``rest`` and
      ``base_graphdef`` (the graph with the adapters off), adapters and base placed on ``mesh``.
    """
    from jaxpref import parallel

    lc = cfg.lora
    if cfg.model.adapter is None and lora.has_adapters(setup.loaded.model):
        # a LoRA run as the source (e.g. a LoRA SFT run): its policy, adapters folded in, is this run's base
        setup.loaded.model = lora.merged(setup.loaded.model)
    model = setup.loaded.model
    trained = lora.has_adapters(model)  # model.adapter (PEFT) loaded onto the model: train that adapter
    if lc.quantize:
        lora.quantize(model, lc.quantize)
    if trained:
        log.info("lora: training the adapter of model.adapter=%s (lora.rank / lora.targets unused)",
                 cfg.model.adapter)
        base_graphdef = _graph_without_adapters(model)
    else:
        base_graphdef = nnx.graphdef(model)
        lora.attach(model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, seed=lc.seed)
    sites = lora.adapted_sites(model)
    record = {"base": base_record(cfg, setup.loaded), "quantize": lc.quantize,
              "adapters": {s.path: {"rank": int(getattr(s.module, s.name + lora.A_SUFFIX).shape[-1]),
                                    "scale": getattr(s.module, s.name + lora.SCALE_SUFFIX)} for s in sites}}
    setup.model_json["lora"] = record
    if jax.process_index() == 0:
        (setup.run_dir / "model.json").write_text(json.dumps(setup.model_json, indent=2))
    parts = lora.split(model, base_graphdef)
    parts["adapters"] = parallel.place_params(parts["adapters"], mesh)
    parts["base"] = parallel.place_params(parts["base"], mesh)
    n_adapter = sum(x.size for x in jax.tree.leaves(parts["adapters"]))
    n_base = sum(x.size for x in jax.tree.leaves(parts["base"]))
    log.info("lora: %d adapters, %d trainable parameters over a frozen base of %d%s", len(sites), n_adapter, n_base,
             f" ({lc.quantize})" if lc.quantize else "")
    return parts


def load_reference(cfg: RunConfig, mesh, vocab_size: int, run_error: type[Exception]) -> tuple[Any, Any]:
    """``(graphdef, params)`` of ``reference.source`` in the policy's layer layout: a LoRA run's reference other
    than its base (the step runs it with its own graph, so a quantised base does not quantise it).
    ``run_error`` when its vocabulary is smaller than the policy's ``vocab_size`` (token ids would overflow it)."""
    from jaxpref.loading import load_model

    ref = load_model(cfg.reference.source, seed=cfg.train.seed, mesh=mesh, dtype=cfg.model.compute_dtype,
                     param_dtype=cfg.model.param_dtype, overrides={"scan_layers": cfg.model.scan_layers})
    if ref.model.config.vocab_size < vocab_size:
        raise run_error(f"reference.source={cfg.reference.source}: vocab_size {ref.model.config.vocab_size} is "
                        f"smaller than the policy's {vocab_size} (model.source={cfg.model.source})")
    graphdef, params, _ = nnx.split(ref.model, nnx.Param, ...)
    return graphdef, params


def _graph_without_adapters(model: nnx.Module):
    """The graph of ``model`` with its adapters removed (a copy; ``model`` keeps them)."""
    bare = nnx.clone(model)
    for site in lora.adapted_sites(bare):
        for suffix in (lora.A_SUFFIX, lora.B_SUFFIX, lora.SCALE_SUFFIX):
            delattr(site.module, site.name + suffix)
    return nnx.graphdef(bare)


def targets_regex(paths) -> str:
    """A regex matching exactly ``paths`` (re-attaching recorded adapters)."""
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def rebuild(record: dict[str, Any], *, mesh=None, runtime: dict[str, Any] | None = None):
    """The LoRA model of a run's ``model.json`` ``lora`` record with fresh adapters (restore target).

    ``runtime``: :data:`jaxpref.loading.RUNTIME_FIELDS` overrides (dtypes, remat, layer layout).
    """
    from jaxpref.loading import load_model

    base = record["base"]
    runtime = dict(runtime or {})
    dtype, param_dtype = runtime.pop("dtype", base["dtype"]), runtime.pop("param_dtype", base["param_dtype"])
    loaded = load_model(base["source"], overrides={**base["overrides"], **runtime}, seed=base["seed"], mesh=mesh,
                        dtype=dtype, param_dtype=param_dtype)
    if lora.has_adapters(loaded.model):  # a LoRA run as the base source: folded in, as attach_for_run did
        loaded.model = lora.merged(loaded.model)
    model = loaded.model
    if record.get("quantize"):
        lora.quantize(model, record["quantize"])
    by_rank: dict[tuple[int, float], list[str]] = {}
    for path, info in record["adapters"].items():
        by_rank.setdefault((info["rank"], info["scale"]), []).append(path)
    for (rank, scale), paths in by_rank.items():
        layout_paths = _in_layout(paths, model)
        lora.attach(model, rank=rank, alpha=scale * rank, targets=targets_regex(layout_paths))
    return loaded


def _in_layout(paths: list[str], model) -> list[str]:
    """Recorded adapter paths in ``model``'s layer layout (``layers.3.attn.x`` <-> ``layers.attn.x``)."""
    have = {s.path for s in lora.sites(model)}
    out = set()
    for p in paths:
        if p in have:
            out.add(p)
            continue
        stacked = re.sub(r"^layers\.\d+\.", "layers.", p)
        if stacked in have:
            out.add(stacked)
        else:
            out.update(h for h in have if re.sub(r"^layers\.\d+\.", "layers.", h) == p)
    return sorted(out)
