"""The reference backend: dense scores and a dense mask, left to XLA.

It materialises ``[B, H, T, S]`` float32 scores (and XLA keeps a few such buffers for the
backward pass), so its memory grows as ``T * S``: right for short sequences and for one-token
decoding (``T = 1``), wrong at T = 8k. It is the oracle the other backends are tested against.

This is the only module in which a dense ``[B, 1, T, S]`` mask exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.models.attention.mask import MaskSpec, soft_cap

F32 = jnp.float32


def dense_mask(spec: MaskSpec) -> jax.Array:
    """The mask a :class:`MaskSpec` describes, as ``[B, 1, T, S]`` bool."""
    branches = ((spec.q_branch_ids[:, :, None], spec.kv_branch_ids[:, None, :]) if spec.has_branches
                else (None, None))
    visible = spec.visible(spec.q_segment_ids[:, :, None], spec.q_positions[:, :, None],
                           spec.kv_segment_ids[:, None, :], spec.kv_positions[:, None, :], *branches)
    return visible[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float) -> jax.Array:
    """Softmax attention with float32 scores and softmax (``jax.nn.dot_product_attention``'s XLA math).

    Args:
      q: [B, T, H, hd] queries.
      k, v: [B, S, KV, hd] keys and values, H % KV == 0 (grouped without repeating K/V).
      spec: the mask description.
      scale: multiplies the scores (``hd ** -0.5``).

    Returns:
      [B, T, H, hd] in q's dtype; exact zeros for queries that see no key.
    """
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=F32) * F32(scale)
    scores = soft_cap(scores, spec.softcap)
    mask = dense_mask(spec)[:, :, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(F32).min), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=F32)
    seen = jnp.any(mask, axis=-1)[:, 0, 0, :, None, None, None]  # [B, T, 1, 1, 1]
    return jnp.where(seen, out, 0.0).astype(q.dtype).reshape(b, t, h, hd)
