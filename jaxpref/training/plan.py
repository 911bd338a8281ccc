"""Compile-only memory planner: will a run fit, and is everything sharded?

:func:`plan` lowers and compiles the train step a run would execute (the step of
:func:`jaxpref.training.loop.make_train_step`, jitted by :func:`~jaxpref.training.loop.jit_train_step`
with the shardings of :func:`jaxpref.training.step.state_shardings`, exactly as the trainers do) for
*abstract* inputs: ``jax.ShapeDtypeStruct`` parameters from ``nnx.eval_shape``, optimizer state from
``jax.eval_shape``, reference parameters or precomputed reference log-probs, and a ``[B, 2, T]`` batch.
Nothing is allocated, so an 8B or 70B run is planned on a laptop with fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), or on the real devices when there are some.

Per device it reports the bytes of parameters, optimizer state, reference parameters and batch (exact:
shard shapes of the shardings the step is compiled with), XLA's compiled argument / output / temp memory
and the peak ``argument + output - aliased + temp`` (``Compiled.memory_analysis``), the largest
micro-batch and sequence length whose peak fits a memory budget (found by recompiling, a bounded
bracketing search), and a **sharding audit**: every input array over 1 MiB per device that is replicated
along a mesh axis one of its dimensions could be split over.

Temp memory from a CPU compile is an *estimate* for GPU/TPU: XLA:CPU fuses and schedules differently
(attention kernels such as cuDNN or splash do not exist on CPU, so ``attention=auto`` plans XLA attention).
The parameter, optimizer, reference and batch bytes do not depend on the backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref import models, parallel
from jaxpref.config import RunConfig
from jaxpref.training import loop, optim
from jaxpref.training import step as steplib
from jaxpref.types import PackedPairBatch, PairBatch, SFTBatch

MiB, GiB = 2 ** 20, 2 ** 30
AUDIT_MIN_BYTES = MiB
KINDS = ("preference", "sft", "reward")
UNROLLED_HINT = ("layers unrolled: XLA:CPU then keeps every layer's gathered weights and recomputed activations "
                 "alive at once, so remat barely lowers this peak; model.scan_layers=true plans the layout that "
                 "large models train in (results/plan/dpo_memory_unrolled.json vs dpo_memory.json)")
CPU_NOTE = ("compiled temp memory (and so the peak) comes from an XLA:CPU compile: an estimate for GPU/TPU, "
            "whose compilers fuse and schedule differently; parameter, optimizer, reference and batch bytes are "
            "exact")


class PlanError(loop.RunError):
    """A setting the planner cannot plan (unknown preset, no mesh fits, T over the model's maximum, ...);
    printed as one line by :func:`jaxpref.cli.fail`."""


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """``"80GiB"`` / ``"141GB"`` / ``"1.5e9"`` -> bytes; PlanError naming ``--hbm`` otherwise."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    try:
        value = float(m.group(1)) * unit if unit else None
    except ValueError:
        value = None
    if not value or value <= 0:
        raise PlanError(f"--hbm {text!r}: expected a positive size such as 80GiB, 141GB or 16e9")
    return int(value)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ model


def model_config(source: str, overrides: dict[str, Any]) -> models.ModelConfig:
    """The :class:`~jaxpref.models.ModelConfig` of a ``preset:NAME`` or ``hf:DIR`` source (no weights read)."""
    kind, _, rest = source.partition(":")
    if kind == "preset":
        if rest not in models.presets.PRESETS:
            raise PlanError(f"model.source={source}: unknown preset {rest!r}; available: "
                            f"{', '.join(sorted(models.presets.PRESETS))}")
        try:
            return models.get_preset(rest, **overrides)
        except (TypeError, ValueError) as err:
            raise PlanError(f"model.overrides for {source}: {err}") from None
    if kind == "hf":
        path = pathlib.Path(rest).expanduser() / "config.json"
        if not path.is_file():
            raise PlanError(f"model.source={source}: {path} not found (expected a Hugging Face directory)")
        return models.ModelConfig.from_hf_config(json.loads(path.read_text()), **overrides)
    raise PlanError(f"model.source={source}: the planner takes preset:NAME or hf:DIR (a config, no weights)")


def _runtime(cfg: RunConfig, *, reference: bool = False) -> dict[str, Any]:
    """The ModelConfig fields a trainer's model loading applies (:func:`jaxpref.loading.load_model`); a
    reference ``source`` gets only the dtypes (``loop._reference_params``)."""
    m = cfg.model
    base = {} if reference else m.model_overrides()
    return {**base, "dtype": m.compute_dtype, "param_dtype": m.param_dtype}


def abstract_model(config: models.ModelConfig, kind: str) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` leaves (a reward model for ``kind='reward'``)."""
    if kind == "reward":
        from jaxpref.models.registry import model_class
        from jaxpref.reward_model import RewardModel

        return nnx.eval_shape(lambda: RewardModel(model_class(config.family)(config, rngs=nnx.Rngs(0))))
    return models.registry.abstract_model(config)


def abstract_lora_model(config: models.ModelConfig, lc) -> tuple[nnx.Module, Any]:
    """``(model, base_graphdef)`` of a LoRA run (``lora`` section): the abstract base, quantised when
    ``lora.quantize`` says so, with its adapters attached, and the graph without them (no allocation)."""
    from jaxpref.models import lora

    def build(with_adapters: bool):
        model = models.registry.model_class(config.family)(config, rngs=nnx.Rngs(0))
        if lc.quantize:
            lora.quantize(model, lc.quantize)
        if with_adapters:
            lora.attach(model, rank=lc.rank, alpha=lc.alpha, targets=lc.targets, seed=lc.seed)
        return model

    return nnx.eval_shape(lambda: build(True)), nnx.graphdef(nnx.eval_shape(lambda: build(False)))


def _sharded(state, mesh):
    """``state``'s leaves as ShapeDtypeStructs with the shardings their logical axes give on ``mesh``."""
    flat = jax.tree.leaves(parallel.state_shardings(state, mesh))
    return _with_shardings(state, jax.tree.unflatten(jax.tree.structure(state), flat))


def _with_shardings(tree, shardings):
    """ShapeDtypeStructs of ``tree``'s leaves carrying the matching ``shardings`` leaves."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def abstract_params(model: nnx.Module, mesh):
    """``(graphdef, params, rest)`` of an abstract model; params carry the shardings their logical axes
    give on ``mesh`` (what :func:`jaxpref.parallel.place_params` gives real ones)."""
    graphdef, params, rest = steplib.split_model(model)
    return graphdef, _sharded(params, mesh), rest


# ------------------------------------------------------------------------------------------ inputs


def seq_len(cfg: RunConfig) -> int:
    """T of the run's longest batch: the smallest bucket >= ``data.max_length`` (``max_length`` when packing)."""
    if cfg.data.packing:
        return cfg.data.max_length
    return min(b for b in cfg.data.buckets if b >= cfg.data.max_length)


def abstract_batch(kind: str, cfg: RunConfig, batch_size: int, t: int, mesh):
    """The batch pytree of ShapeDtypeStructs the data pipeline would hand the step (dtypes of
    :mod:`jaxpref.data.batching`), split over the mesh's batch axes."""
    def a(shape, dtype):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=parallel.batch_sharding(mesh, len(shape)))

    b = batch_size
    if kind == "sft":
        seq = (b, t)
        return SFTBatch(a(seq, "int32"), a(seq, "int32"), a(seq, "int32"), a(seq, "int32"), a((b,), "bool"),
                        a((b,), "int32"))
    if cfg.data.packing:
        rows = cfg.data.pack_rows
        seq = (rows, t)
        return PackedPairBatch(a(seq, "int32"), a(seq, "int32"), a(seq, "int32"), a(seq, "int32"),
                               a((b, 2), "int32"), a((b,), "bool"), a((b,), "float32"), a((b,), "int32"),
                               groups=cfg.train.micro_batches)
    seq = (b, 2, t)
    return PairBatch(a(seq, "int32"), a(seq, "int32"), a(seq, "int32"), a(seq, "int32"), a((b,), "bool"),
                     a((b,), "float32"), a((b,), "int32"))


@dataclasses.dataclass
class Setup:
    """Everything but the batch: built once per plan, reused by every compile of the searches."""

    cfg: RunConfig
    kind: str
    mesh: Any
    config: models.ModelConfig
    fn: Callable
    state: Any  # TrainState of ShapeDtypeStruct (with shardings)
    ref_params: Any  # None or params-like ShapeDtypeStructs (LoRA: the frozen base, whatever the reference)
    reference: str  # live / precomputed / none (preference), none otherwise
    lora: bool = False

    @property
    def batch_devices(self) -> int:
        axes = dict(parallel.DEFAULT_RULES)["batch"]
        axes = (axes,) if isinstance(axes, str) else axes
        return math.prod(self.mesh.shape[a] for a in axes)


def make_mesh(cfg: RunConfig, devices):
    try:
        return parallel.make_mesh(cfg.mesh, devices)
    except ValueError as err:
        raise PlanError(f"{err} (planning on {len(devices)} {devices[0].platform} devices: set --devices or "
                        "mesh.data / mesh.fsdp / mesh.tensor)") from None


def setup(cfg: RunConfig, kind: str, devices) -> Setup:
    """Mesh, abstract model, optimizer, train state and reference of a run (no allocation)."""
    if kind not in KINDS:
        raise PlanError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    mesh = make_mesh(cfg, devices)
    config = model_config(cfg.model.source, _runtime(cfg))
    base_graphdef = base = None
    if cfg.lora is not None:  # the adapters train; the frozen (quantised) base is the step's ref_params
        from jaxpref.training.adapters import check_supported

        check_supported(cfg, kind, PlanError)
        if kind == "reward":
            raise PlanError("train.plan does not model LoRA reward models yet (the adapters plus the reward head)")
        model, base_graphdef = abstract_lora_model(config, cfg.lora)
        graphdef, params, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
        params, base = _sharded(params, mesh), _sharded(base, mesh)
    else:
        graphdef, params, rest = abstract_params(abstract_model(config, kind), mesh)
    optimizer, _ = optim.make_optimizer(cfg.optim, max(cfg.train.steps, 1))
    state = jax.eval_shape(lambda p: steplib.init_state(p, optimizer, cfg.train.seed), params)
    state = _with_shardings(state, steplib.state_shardings(state, jax.tree.map(lambda x: x.sharding, params), mesh))
    comp, reference, ref_params, ref_graphdef = None, "none", None, None
    if kind == "preference":
        comp = loop._composition(cfg)
        loop.check_reference(cfg, comp)
        from jaxpref.training.reference_samples import needs_reference_samples

        if needs_reference_samples(comp):
            raise PlanError(f"loss terms {list(needs_reference_samples(comp))} score reference samples: the planner "
                            "does not model them yet")
        reference = cfg.reference.strategy
        if reference == "live":
            ref_params = params
            if cfg.reference.source is not None:
                ref_cfg = model_config(cfg.reference.source, _runtime(cfg, reference=True))
                ref_graphdef, ref_params, _ = abstract_params(abstract_model(ref_cfg, kind), mesh)
        if base is not None:  # LoRA: the frozen base, paired with a reference of its own or synced adapters
            ref_params = (base, ref_params) if ref_graphdef is not None or cfg.reference.sync_every else base
    elif base is not None:  # LoRA SFT: the step takes the frozen base
        ref_params = base
    fn = loop.make_train_step(cfg, kind, graphdef, rest, optimizer, comp, base_graphdef=base_graphdef,
                              reference_graphdef=ref_graphdef if base is not None else None)
    return Setup(cfg, kind, mesh, config, fn, state, ref_params, reference, lora=base is not None)


def check_shape(s: Setup, batch_size: int, t: int) -> None:
    """PlanError naming the setting when the batch or length cannot run on this model and mesh."""
    cfg, limit = s.cfg, s.config.max_position_embeddings
    if t > limit:
        raise PlanError(f"data.max_length: T={t} exceeds the model's maximum max_position_embeddings={limit} "
                        f"({cfg.model.source})")
    if batch_size % cfg.train.micro_batches:
        raise PlanError(f"train.batch_size={batch_size} is not divisible by train.micro_batches="
                        f"{cfg.train.micro_batches}")
    if batch_size % s.batch_devices:
        raise PlanError(f"train.batch_size={batch_size} is not a multiple of the {s.batch_devices} devices of the "
                        f"mesh's data x fsdp axes (the batch is split over them)")
    if cfg.data.packing and (not cfg.data.pack_rows or cfg.data.pack_rows % s.batch_devices):
        raise PlanError(f"data.pack_rows={cfg.data.pack_rows}: a packed plan needs a fixed number of rows, a "
                        f"multiple of the {s.batch_devices} data x fsdp devices (0 = automatic depends on the data)")


# ------------------------------------------------------------------------------------------ compile


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard per leaf); 4-bit
    integers (a QLoRA int4 base) count half a byte, as accelerators store them packed."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * _itemsize(x.dtype) for x in jax.tree.leaves(tree)))


def _itemsize(dtype) -> float:
    return 0.5 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else jnp.dtype(dtype).itemsize


def step_inputs(s: Setup, batch_size: int, t: int) -> tuple:
    """``(args, jitted)``: the abstract arguments of the step and the step jitted as the trainers jit it."""
    batch = abstract_batch(s.kind, s.cfg, batch_size, t, s.mesh)
    if s.kind != "preference":
        if s.lora:  # LoRA SFT: step(state, base, batch)
            return (s.state, s.ref_params, batch), loop.jit_train_step(s.fn, s.kind, s.mesh, _shardings(s.state),
                                                                        batch, ref_sh=_shardings(s.ref_params))
        return (s.state, batch), loop.jit_train_step(s.fn, s.kind, s.mesh, _shardings(s.state), batch)
    rl = None
    if s.reference == "precomputed":
        rl = jax.ShapeDtypeStruct((batch_size, 2), jnp.float32, sharding=parallel.batch_sharding(s.mesh, 2))
    ref_sh = None if s.ref_params is None else _shardings(s.ref_params)
    jitted = loop.jit_train_step(s.fn, s.kind, s.mesh, _shardings(s.state), batch, ref_sh=ref_sh,
                                 ref_logps=rl is not None)
    return (s.state, s.ref_params, batch, rl), jitted


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def memory_stats(compiled) -> dict[str, int]:
    """Per-device compiled memory (``Compiled.memory_analysis``) and the peak it implies."""
    m = compiled.memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "generated_code": int(m.generated_code_size_in_bytes)}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def compile_step(s: Setup, batch_size: int, t: int) -> tuple[dict[str, int], float]:
    """``(memory_stats, seconds)`` of compiling the step for a ``[batch_size, ..., t]`` batch."""
    check_shape(s, batch_size, t)
    args, jitted = step_inputs(s, batch_size, t)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return memory_stats(compiled), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ audit


def sharding_audit(named_trees: dict[str, Any], mesh, min_bytes: int = AUDIT_MIN_BYTES) -> list[dict[str, Any]]:
    """Every array over ``min_bytes`` per device that is replicated along a mesh axis (of size > 1) it
    could be sharded on: a dimension whose size is divisible by that axis' size times the axes already
    splitting it.

    Args:
      named_trees: ``{group: pytree of sharded ShapeDtypeStruct}`` (params, optimizer, reference, batch).

    Returns:
      One record per (array, axis): group, path, shape, dtype, spec, per-device bytes and the axis.
    """
    findings = []
    for group, tree in named_trees.items():
        if tree is None:
            continue
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            nbytes = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            if nbytes <= min_bytes:
                continue
            spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
            per_dim = [() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in spec]
            used = {a for axes in per_dim for a in axes}
            for axis, size in mesh.shape.items():
                if size == 1 or axis in used:
                    continue
                if any(dim % (size * math.prod(mesh.shape[a] for a in axes)) == 0
                       for dim, axes in zip(x.shape, per_dim, strict=True)):
                    findings.append({"group": group, "path": jax.tree_util.keystr(path), "shape": list(x.shape),
                                     "dtype": str(x.dtype), "spec": str(x.sharding.spec), "bytes": int(nbytes),
                                     "replicated_along": axis})
    return findings


# ------------------------------------------------------------------------------------------ search


def largest_fitting(peak_at: Callable[[int], int], start: int, budget: int, *, unit: int, upper: int,
                    max_compiles: int) -> dict[str, Any]:
    """The largest multiple of ``unit`` (<= ``upper``) whose ``peak_at(value)`` is <= ``budget``.

    A bracketing search: from ``start``, double (or halve) until the budget is crossed, then interpolate
    linearly between the last fitting and the first failing value (peak memory is close to affine in the
    batch, and smooth in T), at most ``max_compiles`` compiles in all.

    Returns:
      ``{"value": largest known fit or None, "exact": the next unit up is known not to fit (or is over
      upper), "compiles": n, "tried": {value: peak}}``.
    """
    tried: dict[int, int] = {}

    def peak(v):
        if v not in tried:
            tried[v] = peak_at(v)
        return tried[v]

    lo = hi = None  # largest known fit, smallest known failure
    v = max(unit, start - start % unit)
    while len(tried) < max_compiles:
        if peak(v) <= budget:
            lo = v
            if v >= upper:
                break
            nxt = min(v * 2, upper)
        else:
            hi = v
            if v <= unit:
                break
            nxt = max(unit, (v // 2) // unit * unit)
        if lo is not None and hi is not None:
            break
        v = nxt
    while lo is not None and hi is not None and hi - lo > unit and len(tried) < max_compiles:
        p_lo, p_hi = tried[lo], tried[hi]
        guess = lo + (budget - p_lo) * (hi - lo) / max(p_hi - p_lo, 1)
        v = int(min(max(guess // unit * unit, lo + unit), hi - unit))
        if peak(v) <= budget:
            lo = v
        else:
            hi = v
    exact = lo is not None and (lo >= upper or (hi is not None and hi - lo <= unit))
    exact = exact or (lo is None and hi is not None and hi <= unit)
    return {"value": lo, "exact": bool(exact), "compiles": len(tried), "tried": {str(k): v for k, v in tried.items()}}


# ------------------------------------------------------------------------------------------ plan


def plan(cfg: RunConfig, *, kind: str = "preference", devices=None, hbm: int | None = None, t: int | None = None,
         search: tuple[str, ...] = ("micro_batch", "seq_len"), max_compiles: int = 6) -> dict[str, Any]:
    """Plans one run: per-device memory, compiled memory, fits and the sharding audit (module docstring).

    Args:
      cfg: the run config (model, mesh, batch, dtypes, remat, attention, reference, optimizer).
      kind: ``preference``, ``sft`` or ``reward``.
      devices: the devices of the mesh (default ``jax.devices()``).
      hbm: per-device memory budget in bytes for the fit search (None: no search).
      t: sequence length (default :func:`seq_len` of the config).
      search: with ``hbm``, search the largest micro-batch (``micro_batch``) and T (``seq_len``) that fit.
      max_compiles: compiles per search.

    Returns:
      The JSON-ready plan (see :func:`format_plan` for the table).
    """
    devices = list(devices if devices is not None else jax.devices())
    t0 = time.perf_counter()
    s = setup(cfg, kind, devices)
    t = t or seq_len(cfg)
    b = cfg.train.batch_size
    check_shape(s, b, t)
    args, _ = step_inputs(s, b, t)
    batch = args[2] if kind == "preference" or s.lora else args[1]
    bytes_ = {"params": per_device_bytes(s.state.params), "optimizer": per_device_bytes(s.state.opt_state),
              "reference": per_device_bytes(s.ref_params) if s.ref_params is not None else 0,
              "batch": per_device_bytes(batch) + (per_device_bytes(args[3]) if kind == "preference" and
                                                  args[3] is not None else 0),
              "state_other": per_device_bytes((s.state.step, s.state.rng, s.state.bco_delta, s.state.skipped))}
    compiled, seconds = compile_step(s, b, t)
    k, dp = cfg.train.micro_batches, s.batch_devices
    out: dict[str, Any] = {
        "kind": kind, "model": cfg.model.source, "num_params": s.config.num_params(),
        "param_dtype": s.config.param_dtype, "compute_dtype": s.config.dtype,
        "optimizer": cfg.optim.name, "remat": s.config.remat and s.config.remat_policy,
        "attention": s.config.attention, "scan_layers": s.config.scan_layers, "reference": s.reference,
        **({"lora": {"rank": cfg.lora.rank, "quantize": cfg.lora.quantize, "targets": cfg.lora.targets,
                     "trainable_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(s.state.params)))}}
           if s.lora else {}),
        "platform": devices[0].platform, "devices": len(devices), "mesh": dict(s.mesh.shape),
        "batch_size": b, "micro_batches": k, "micro_batch_per_device": b // k // dp, "seq_len": t,
        "bytes_per_device": bytes_, "compiled": compiled, "compile_s": round(seconds, 2),
        "audit": sharding_audit({"params": s.state.params, "optimizer": s.state.opt_state,
                                 "reference": s.ref_params, "batch": batch}, s.mesh),
    }
    if devices[0].platform == "cpu":
        out["note"] = CPU_NOTE
        if s.config.remat and not s.config.scan_layers and s.config.num_layers > 1:
            out["hint"] = UNROLLED_HINT
    if hbm is not None:
        out["hbm"] = hbm
        out["fits"] = compiled["peak"] <= hbm
        if "micro_batch" in search:  # the configured point is known: the searches start there
            out["max_micro_batch_per_device"] = _search(
                lambda m: compile_step(s, m * k * dp, t)[0]["peak"], b // k // dp, compiled["peak"], hbm, unit=1,
                upper=1024, max_compiles=max_compiles)
        if "seq_len" in search:
            unit = 128 if t >= 128 else t
            out["max_seq_len"] = _search(lambda n: compile_step(s, b, n)[0]["peak"], t, compiled["peak"], hbm,
                                         unit=unit, upper=s.config.max_position_embeddings // unit * unit,
                                         max_compiles=max_compiles)
    out["plan_s"] = round(time.perf_counter() - t0, 2)
    return out


def _search(peak_at, start, start_peak, budget, **kw):
    known = {start: start_peak}
    return largest_fitting(lambda v: known[v] if v in known else peak_at(v), start, budget, **kw)


# ------------------------------------------------------------------------------------------ report


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a human-readable table."""
    b, c = p["bytes_per_device"], p["compiled"]
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    rows = [
        f"plan: {p['kind']} step of {p['model']} ({p['num_params']:,} parameters), {p['param_dtype']} params, "
        f"{p['compute_dtype']} compute, remat={p['remat'] or 'off'}, attention={p['attention']}, "
        f"layers {'scanned' if p.get('scan_layers') else 'unrolled'}, "
        f"reference={p['reference']}, optimizer={p['optimizer']}" + (
            f", LoRA r={p['lora']['rank']} ({p['lora']['trainable_params']:,} trainable"
            f"{', base ' + p['lora']['quantize'] if p['lora']['quantize'] else ''})" if "lora" in p else ""),
        f"mesh: {mesh} on {p['devices']} {p['platform']} devices; batch {p['batch_size']} in {p['micro_batches']} "
        f"micro-batches ({p['micro_batch_per_device']} rows per device), T={p['seq_len']}",
        "",
        f"{'per device':<42}{'bytes':>14}",
    ]
    lora_run = "lora" in p
    for label, value in (("adapters (trained)" if lora_run else "parameters", b["params"]),
                         ("optimizer state", b["optimizer"]),
                         ("frozen base (= reference)" if lora_run else "reference parameters", b["reference"]),
                         ("batch", b["batch"]),
                         ("compiled arguments", c["argument"]), ("compiled outputs (donated: aliased)", c["output"]),
                         ("compiled temp", c["temp"]), ("peak (args + outputs - aliased + temp)", c["peak"])):
        rows.append(f"  {label:<40}{fmt_bytes(value):>14}")
    if "hbm" in p:
        rows.append(f"  {'budget (--hbm)':<32}{fmt_bytes(p['hbm']):>14}  fits: {'yes' if p['fits'] else 'NO'}")
        for key, label in (("max_micro_batch_per_device", "largest micro-batch per device"),
                           ("max_seq_len", "largest T")):
            if key in p:
                r = p[key]
                value = "none fits" if r["value"] is None else f"{r['value']}{'' if r['exact'] else ' (at least)'}"
                rows.append(f"  {label:<40}{value:>14}  ({r['compiles']} compiles)")
    audit = p["audit"]
    rows += ["", f"sharding audit: {len(audit)} array(s) over 1 MiB per device replicated along a mesh axis they "
                 "could be split on" + (":" if audit else "")]
    rows += [f"  {f['group']}{f['path']} {f['dtype']}{f['shape']} spec {f['spec']}: {fmt_bytes(f['bytes'])} "
             f"replicated along {f['replicated_along']}" for f in audit]
    rows.append(f"\ncompile {p['compile_s']:.1f} s, plan {p['plan_s']:.1f} s")
    if "note" in p:
        rows.append(f"note: {p['note']}")
    if "hint" in p:
        rows.append(f"hint: {p['hint']}")
    return "\n".join(rows) + "\n"
