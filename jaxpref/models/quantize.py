"""QLoRA's frozen base (Dettmers et al. 2023): projection weights stored as int8 / int4, dequantised on use.

Symmetric per-output-channel quantisation: for a projection ``W [(L,) *in, *out]`` (see
:data:`jaxpref.models.lora.PROJECTIONS`) every output channel ``o`` gets the step
``s_o = max_i |W[i, o]| / q_max`` (``q_max`` = 127 for int8, 7 for int4) and the integers
``q = clip(round(W / s), -q_max, q_max)``. Dequantisation is ``q * s``, so each weight is off by at most
half a step, ``|W - q s| <= s_o / 2`` (the bound ``tests/test_lora.py`` checks). The integers replace the
weight in place (``nnx.Param`` of dtype ``int8`` / ``int4``, same logical axes) and the steps sit beside it as
``<name>_qscale [(L,) 1.., *out]`` float32; :func:`jaxpref.models.lora.weight` dequantises inside every
projection, so compute runs in the model's dtype while the stored base takes 1 (int8) or 1/2 (int4, where
XLA packs it; CPU stores a byte) byte per weight. Embeddings, norms and the output head stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.config import ConfigError
from jaxpref.models import lora

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
    for site in lora.sites(model):
        if hasattr(site.module, site.name + lora.QSCALE_SUFFIX):
            continue
        axes = site.var.get_metadata().get("out_sharding")
        q, step = _quantize_jit(site.var.get_value(), site.lead, site.n_in, kind)
        scale_axes = None if axes is None else tuple(
            None if site.lead <= i < site.lead + site.n_in else a for i, a in enumerate(axes))
        setattr(site.module, site.name, nnx.Param(q, out_sharding=axes, eager_sharding=False))
        setattr(site.module, site.name + lora.QSCALE_SUFFIX, nnx.Param(step, out_sharding=scale_axes,
                                                                      eager_sharding=False))
        done.append(site.path)
    return done


def _quantize_jit(w, lead: int, n_in: int, kind: str):
    return jax.jit(quantize_array, static_argnames=("lead", "n_in", "kind"))(w, lead=lead, n_in=n_in, kind=kind)


def is_quantized(model: nnx.Module) -> bool:
    return any(hasattr(s.module, s.name + lora.QSCALE_SUFFIX) for s in lora.sites(model))
