"""cuDNN fused flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

cuDNN's fused kernel (FlashAttention-2 style, Dao 2023) takes the mask as *sequence lengths*
(padding), a causal flag and a local window; it has no segment ids and no logit soft-cap, and it
computes in float16 / bfloat16 only. So it serves a :class:`MaskSpec` exactly when

* the caller promised the padded layout (``spec.right_padded``: one sequence per row at slots
  and positions ``0 .. n-1``, then padding), so the lengths ``n`` describe the mask completely;
* queries and keys are the same tokens (``T == S``; no KV-cache step);
* the mask is causal, with or without a sliding window (HF Mistral ``W`` becomes cuDNN's
  ``local_window_size=(W - 1, 0)``: the query and the ``W - 1`` keys before it);
* there is no soft-cap, the inputs are float16 / bfloat16 and ``head_dim`` is a multiple of 8
  and at most 128 (cuDNN 9's limits for the fused kernel's backward pass).

Otherwise :func:`unsupported` names the reason, and :mod:`.select` falls back to a backend that
can serve the mask (logged once). Padded queries return exact zeros, as every backend's do.
Needs an NVIDIA GPU: on any other platform choosing it is a config error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.models.attention.mask import MaskSpec

PLATFORMS = ("gpu",)
DTYPES = ("bfloat16", "float16")
MAX_HEAD_DIM = 128


def unsupported(spec: MaskSpec, dtype, head_dim: int) -> str | None:
    """Why cuDNN cannot serve this mask / these inputs, or None when it can."""
    if not spec.right_padded:
        return "the mask is not the right-padded one-sequence-per-row layout (packed segments or a cache)"
    if spec.q_len != spec.kv_len:
        return f"queries ({spec.q_len}) and keys ({spec.kv_len}) differ (KV-cache step)"
    if not spec.causal:
        return "the mask is not causal"
    if spec.softcap is not None:
        return "cuDNN has no logit soft-cap"
    if jnp.dtype(dtype).name not in DTYPES:
        return f"inputs are {jnp.dtype(dtype).name}; cuDNN's fused kernel needs {' or '.join(DTYPES)}"
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not a multiple of 8 up to {MAX_HEAD_DIM}"
    return None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float) -> jax.Array:
    """cuDNN attention for a mask :func:`unsupported` accepts.

    Args:
      q: [B, T, H, hd] queries (bf16 / f16).
      k, v: [B, T, KV, hd], H % KV == 0 (cuDNN groups the heads itself).
      spec: a right-padded causal self-attention description.
      scale: score scale.

    Returns:
      [B, T, H, hd] in q's dtype; zeros for padding queries.
    """
    reason = unsupported(spec, q.dtype, q.shape[-1])
    if reason is not None:
        raise ValueError(f"cudnn attention cannot serve this mask: {reason}")
    lengths = jnp.sum(spec.kv_segment_ids != 0, axis=1, dtype=jnp.int32)  # [B]
    window = None if spec.sliding_window is None else (spec.sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, local_window_size=window,
                                       implementation="cudnn")
    return jnp.where((spec.q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
