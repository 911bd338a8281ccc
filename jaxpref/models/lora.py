"""LoRA adapters on the shared transformer, explicit ``nnx.LoRAParam`` leaves beside the frozen weights.

LoRA (Hu et al. 2021, eq. 3) adds a rank-``r`` update to a frozen projection ``W0``::

    h = W0 x + (alpha / r) * B (A x),   A: [in, r] ~ U(-1/sqrt(in), 1/sqrt(in)),   B: [r, out] = 0

so a fresh adapter computes exactly the base model (B = 0) and only ``A`` and ``B`` train. Here a
projection is any parameter of :data:`PROJECTIONS` (attention q/k/v/o, MLP gate/up/down); its first
``n_in`` axes (after a leading ``layers`` axis when ``scan_layers`` stacks the layers) are the inputs,
the rest the outputs, as in its einsum. :func:`attach` creates, for each projection whose dotted path
matches the ``targets`` regex (``re.search``)::

    <name>_lora_a  [(L,) *in, r]   logical axes (layers,) *in axes, lora_rank
    <name>_lora_b  [(L,) r, *out]  logical axes (layers,) lora_rank, *out axes

as attributes of the projection's module, created eagerly (no lazy creation in a traced forward) and
carrying the logical axis names of the weight they adapt (``lora_rank`` is replicated by
:data:`jaxpref.parallel.DEFAULT_RULES`). :func:`project` is the one call every projection in
:mod:`jaxpref.models.layers` goes through: ``einsum(x, W)`` plus, when the module has an adapter, the
low-rank path ``scale * (x A) B`` (never the merged ``W + scale A B``: activation memory stays ``[.., r]``),
and, when the base is quantised (:func:`quantize`), ``W`` dequantised on the fly.

"Adapters off" is the graph of the model before :func:`attach` (:func:`split` returns it as
``base_graphdef``): the DPO reference is the base parameters run through that graph, no second tree.

Why not ``qwix`` 0.1.8 (``apply_lora_to_model``): it creates adapters lazily inside a traced forward, which fails
on a fresh jaxpref model (``TraceContextError: Cannot mutate RngCount``), intercepts only einsum / dot_general
(after a plain forward it adapted q/k/v/o and the head, none of the MLP's ``x @ W``) and fails on stacked layers
(``IndexError``); its adapters carry no logical axes. ``nnx.LoRA`` wraps ``nnx.Linear`` modules, which the
shared transformer does not use, so this module puts flax's ``nnx.LoRAParam`` on the existing weights instead.

QLoRA (Dettmers et al. 2023; ``lora.quantize``): :func:`quantize` stores the frozen projection weights as int8 /
int4 with symmetric per-output-channel steps ``s_o = max_i |W[i, o]| / q_max`` (``q_max`` = 127 / 7) and
integers ``q = clip(round(W / s), -q_max, q_max)``, so each weight is off by at most half a step,
``|W - q s| <= s_o / 2`` (the bound ``tests/test_qlora.py`` checks). The integers replace the weight (same
logical axes) and the steps sit beside it as ``<name>_qscale [(L,) 1.., *out]`` float32; :func:`weight`
dequantises inside every projection, so compute runs in the model's dtype while the stored base takes 1 (int8) or
1/2 (int4, packed by accelerators; CPU stores a byte) byte per weight. Embeddings, norms and the head stay as
they are.

Adapter dropout (``lora.dropout``, PEFT's ``lora_dropout``): in training steps only, the low-rank path sees
``dropout(x)``, ``h = W0 x + scale * B A dropout(x)`` with inverted scaling (kept inputs divided by ``1 - p``);
the frozen path ``W0 x`` never drops. A step turns it on for the forwards it traces with :func:`dropout` (a
key and a rate); nothing else does, so the reference, evaluation, generation and export never drop. Each
decoder layer folds its index into the key (:func:`layer_scope`, also under ``lax.scan`` where the index is
traced) and each projection its position in :data:`PROJECTIONS`: every adapter of every layer draws its own mask
(:func:`dropout_mask`), the same for the same key.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.config import ConfigError
from jaxpref.models.layer_stack import LAYERS

# projection parameter name -> number of leading (input) axes its einsum contracts
PROJECTIONS: dict[str, int] = {"query_dnh": 1, "key_dkh": 1, "value_dkh": 1, "out_nhd": 2, "gate_df": 1,
                               "up_df": 1, "down_fd": 1}
DEFAULT_TARGETS = r"(attn\.(query_dnh|key_dkh|value_dkh|out_nhd)|mlp\.(gate_df|up_df|down_fd))$"
A_SUFFIX, B_SUFFIX, SCALE_SUFFIX = "_lora_a", "_lora_b", "_lora_scale"
QSCALE_SUFFIX = "_qscale"  # per-output-channel step of a quantised weight (:func:`quantize`)
RANK_AXIS = "lora_rank"
SITE_IDS = {name: i for i, name in enumerate(PROJECTIONS)}  # folded into the dropout key of a layer
# (key, rate) of the adapter dropout active in the forward being traced, or None (module docstring)
_DROPOUT: contextvars.ContextVar[tuple[jax.Array, float] | None] = contextvars.ContextVar("lora_dropout",
                                                                                         default=None)


@dataclasses.dataclass(frozen=True)
class Site:
    """One projection weight in a model: its dotted path, owning module and attribute name."""

    path: str
    module: nnx.Module
    name: str

    @property
    def var(self) -> nnx.Variable:
        return getattr(self.module, self.name)

    @property
    def lead(self) -> int:
        """1 for a stacked (``scan_layers``) weight whose axis 0 is ``layers``, else 0."""
        axes = self.var.get_metadata().get("out_sharding") or ()
        return int(bool(axes) and axes[0] == LAYERS)

    @property
    def n_in(self) -> int:
        return PROJECTIONS[self.name]


def sites(model: nnx.Module) -> list[Site]:
    """Every projection weight of ``model`` (:data:`PROJECTIONS`), in graph order, with its dotted path."""
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        prefix = ".".join(map(str, path))
        for name in PROJECTIONS:
            if isinstance(getattr(node, name, None), nnx.Variable):
                out.append(Site(f"{prefix}.{name}" if prefix else name, node, name))
    return out


def match_targets(model: nnx.Module, targets: str, *, field: str = "lora.targets") -> list[Site]:
    """The projections whose path matches ``targets`` (``re.search``); ConfigError when none does."""
    try:
        pattern = re.compile(targets)
    except re.error as err:
        raise ConfigError(f"{field}={targets!r}: not a valid regular expression ({err})") from None
    all_sites = sites(model)
    chosen = [s for s in all_sites if pattern.search(s.path)]
    if not chosen:
        examples = ", ".join(s.path for s in all_sites[:3])
        raise ConfigError(f"{field}={targets!r} matches no projection weight of the model (paths look like "
                          f"{examples})")
    return chosen


def check_rank(rank: int, *, field: str = "lora.rank") -> None:
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"{field}={rank!r}: expected a positive integer")


def attach(model: nnx.Module, *, rank: int, alpha: float, targets: str = DEFAULT_TARGETS, seed: int = 0,
           dtype=None) -> list[str]:
    """Adds zero-initialised LoRA adapters to ``model`` in place (module docstring); returns the adapted paths.

    Args:
      rank: r >= 1.
      alpha: the scale numerator; the update is ``alpha / rank * B A``.
      targets: regex over projection paths (``layers.0.attn.query_dnh``; ``layers.attn.query_dnh`` stacked).
      seed: seeds ``A`` (``fold_in(key(seed), i)`` for the i-th adapted projection).
      dtype: adapter dtype (default: the model's ``param_dtype``).
    """
    check_rank(rank)
    dtype = jnp.dtype(dtype or model.config.param_dtype)
    chosen = match_targets(model, targets)
    key = jax.random.key(seed)
    for i, site in enumerate(chosen):
        a, b = _adapter_arrays(site, rank, jax.random.fold_in(key, i), dtype)
        set_adapter(site, a, b, alpha / rank)
    return [s.path for s in chosen]


def _adapter_arrays(site: Site, rank: int, key, dtype) -> tuple[jax.Array, jax.Array]:
    shape, lead, n_in = site.var.get_value().shape, site.lead, site.n_in
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT's kaiming_uniform(a=sqrt(5)) of lora_A
    a = jax.random.uniform(key, (*shape[:lead], *in_shape, rank), jnp.float32, -bound, bound).astype(dtype)
    b = jnp.zeros((*shape[:lead], rank, *out_shape), dtype)
    return a, b


def adapter_axes(site: Site) -> tuple[tuple, tuple]:
    """Logical axes of ``(A, B)`` at ``site``, from the axes of the weight they adapt."""
    axes = tuple(site.var.get_metadata().get("out_sharding") or (None,) * site.var.get_value().ndim)
    cut = site.lead + site.n_in
    return (*axes[:cut], RANK_AXIS), (*axes[:site.lead], RANK_AXIS, *axes[cut:])


def set_adapter(site: Site, a, b, scale: float) -> None:
    """Sets the adapter of ``site`` to ``(A, B)`` with update scale ``scale`` (``alpha / r``)."""
    a_axes, b_axes = adapter_axes(site)
    setattr(site.module, site.name + A_SUFFIX, nnx.LoRAParam(jnp.asarray(a), out_sharding=a_axes,
                                                             eager_sharding=False))
    setattr(site.module, site.name + B_SUFFIX, nnx.LoRAParam(jnp.asarray(b), out_sharding=b_axes,
                                                             eager_sharding=False))
    setattr(site.module, site.name + SCALE_SUFFIX, float(scale))


def has_adapter(site: Site) -> bool:
    return hasattr(site.module, site.name + A_SUFFIX)


def adapted_sites(model: nnx.Module) -> list[Site]:
    return [s for s in sites(model) if has_adapter(s)]


def has_adapters(model: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


# ----------------------------------------------------------------------------------- forward


@contextlib.contextmanager
def dropout(key: jax.Array, rate: float):
    """Adapter dropout of rate ``rate`` (PEFT's ``lora_dropout``) in the forwards traced inside, keyed by ``key``
    (a typed PRNG key); ``rate == 0`` changes nothing (the traced program is the dropout-free one)."""
    if not rate:
        yield
        return
    token = _DROPOUT.set((key, float(rate)))
    try:
        yield
    finally:
        _DROPOUT.reset(token)


@contextlib.contextmanager
def layer_scope(layer):
    """Folds decoder layer ``layer`` (an int or a traced int scalar) into the active dropout key, if any."""
    active = _DROPOUT.get()
    if active is None:
        yield
        return
    token = _DROPOUT.set((jax.random.fold_in(active[0], layer), active[1]))
    try:
        yield
    finally:
        _DROPOUT.reset(token)


def dropout_mask(key: jax.Array, name: str, shape: tuple[int, ...], rate: float) -> jax.Array:
    """``shape`` bool, True where projection ``name``'s adapter keeps its input (probability ``1 - rate``);
    ``key`` is the layer's key (:func:`layer_scope`)."""
    return jax.random.bernoulli(jax.random.fold_in(key, SITE_IDS[name]), 1.0 - rate, shape)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """The weight ``name`` of ``module`` in ``dtype``, dequantised when the base is quantised."""
    w = getattr(module, name)[...]
    qscale = getattr(module, name + QSCALE_SUFFIX, None)
    if qscale is None:
        return w.astype(dtype)
    return (w.astype(jnp.float32) * qscale[...]).astype(dtype)


def project(module: nnx.Module, name: str, eq: str, x: jax.Array, dtype) -> jax.Array:
    """``einsum(eq, x, W)`` for the projection ``name`` of ``module``, plus its LoRA update when it has one.

    The update is ``scale * tensordot(tensordot(x, A, n_in), B, 1)``: ``x``'s trailing ``n_in`` axes are
    the weight's input axes (true of every einsum in :mod:`jaxpref.models.layers`). Inside :func:`dropout`
    the update's ``x`` is ``where(mask, x / (1 - p), 0)`` (:func:`dropout_mask`); ``W0 x`` never drops.
    """
    y = jnp.einsum(eq, x, weight(module, name, dtype))
    a = getattr(module, name + A_SUFFIX, None)
    if a is None:
        return y
    b = getattr(module, name + B_SUFFIX)
    if (active := _DROPOUT.get()) is not None:
        key, rate = active
        x = jnp.where(dropout_mask(key, name, x.shape, rate), x / jnp.asarray(1.0 - rate, x.dtype),
                      jnp.zeros((), x.dtype))
    xa = jnp.tensordot(x, a[...].astype(dtype), axes=PROJECTIONS[name])
    return y + getattr(module, name + SCALE_SUFFIX) * jnp.tensordot(xa, b[...].astype(dtype), axes=1)


# ----------------------------------------------------------------------------------- states


def split(model: nnx.Module, base_graphdef=None) -> dict[str, Any]:
    """``{graphdef, adapters, base, rest}`` of a model with adapters: ``nnx.split(model, LoRAParam, Param, ...)``.

    ``nnx.merge(graphdef, adapters, base, rest)`` is the LoRA model; ``nnx.merge(base_graphdef, base, rest)``,
    with ``base_graphdef`` the graph before :func:`attach`, the base with the adapters off.
    """
    graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    return {"graphdef": graphdef, "adapters": adapters, "base": base, "rest": rest, "base_graphdef": base_graphdef}


def delta(site: Site, dtype=jnp.float32) -> jax.Array:
    """``scale * A B`` of ``site`` in the weight's shape ``[(L,) *in, *out]`` (float32 products)."""
    a = getattr(site.module, site.name + A_SUFFIX)[...].astype(jnp.float32)
    b = getattr(site.module, site.name + B_SUFFIX)[...].astype(jnp.float32)
    prod = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1)) if site.lead else \
        (lambda x, y: jnp.tensordot(x, y, axes=1))
    return (getattr(site.module, site.name + SCALE_SUFFIX) * prod(a, b)).astype(dtype)


def merged(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its weight (``W + scale A B``, float32 sums, cast to
    ``param_dtype``), quantised weights dequantised, and no adapter left: a plain model (HF export)."""
    out = nnx.clone(model)
    dtype = jnp.dtype(out.config.param_dtype)
    for site in sites(out):
        w = weight(site.module, site.name, jnp.float32)
        if has_adapter(site):
            w = w + delta(site)
            for suffix in (A_SUFFIX, B_SUFFIX, SCALE_SUFFIX):
                delattr(site.module, site.name + suffix)
        if hasattr(site.module, site.name + QSCALE_SUFFIX):
            delattr(site.module, site.name + QSCALE_SUFFIX)
        axes = site.var.get_metadata().get("out_sharding")
        setattr(site.module, site.name, nnx.Param(w.astype(dtype), out_sharding=axes, eager_sharding=False))
    return out


def adapter_arrays(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{weight path: (A, B, scale)}`` as host arrays (adapter export)."""
    return {s.path: (np.asarray(jax.device_get(getattr(s.module, s.name + A_SUFFIX)[...])),
                     np.asarray(jax.device_get(getattr(s.module, s.name + B_SUFFIX)[...])),
                     getattr(s.module, s.name + SCALE_SUFFIX)) for s in adapted_sites(model)}


# ----------------------------------------------------------------------------------- QLoRA base


BITS = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}


def quantize_array(w: jax.Array, *, lead: int, n_in: int, kind: str) -> tuple[jax.Array, jax.Array]:
    """``(q, s)`` of ``w [(L,) *in, *out]``: integers of ``w``'s shape and float32 steps ``[(L,) 1.., *out]``."""
    dtype, q_max = BITS[kind]
    w32 = w.astype(jnp.float32)
    in_axes = tuple(range(lead, lead + n_in))
    absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
    step = jnp.where(absmax > 0, absmax / q_max, 1.0)
    q = jnp.clip(jnp.round(w32 / step), -q_max, q_max).astype(dtype)
    return q, step


def quantize(model: nnx.Module, kind: str) -> list[str]:
    """Quantises every projection weight of ``model`` in place (module docstring); returns their paths."""
    if kind not in BITS:
        raise ConfigError(f"lora.quantize={kind!r}: expected one of {list(BITS)} (or null)")
    done = []
    for site in sites(model):
        if hasattr(site.module, site.name + QSCALE_SUFFIX):
            continue
        axes = site.var.get_metadata().get("out_sharding")
        q, step = _quantize_jit(site.var.get_value(), site.lead, site.n_in, kind)
        scale_axes = None if axes is None else tuple(
            None if site.lead <= i < site.lead + site.n_in else a for i, a in enumerate(axes))
        setattr(site.module, site.name, nnx.Param(q, out_sharding=axes, eager_sharding=False))
        setattr(site.module, site.name + QSCALE_SUFFIX, nnx.Param(step, out_sharding=scale_axes,
                                                                      eager_sharding=False))
        done.append(site.path)
    return done


def _quantize_jit(w, lead: int, n_in: int, kind: str):
    return jax.jit(quantize_array, static_argnames=("lead", "n_in", "kind"))(w, lead=lead, n_in=n_in, kind=kind)


def is_quantized(model: nnx.Module) -> bool:
    return any(hasattr(s.module, s.name + QSCALE_SUFFIX) for s in sites(model))
