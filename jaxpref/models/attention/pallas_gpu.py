"""Pallas flash attention for GPUs (the Triton-lowered ``jax.experimental.pallas.ops.gpu.attention.mha``).

The kernel (FlashAttention-2, Dao 2023, Alg. 1 forward and Alg. 2 backward, both in Pallas)
masks by *one* ``[B, T]`` segment-id array shared by queries and keys, plus a causal flag by
slot index. That serves a :class:`MaskSpec` exactly when

* queries and keys are the same tokens (``T == S``: training and scoring rows, packed or
  padded; every ``T == S`` description the model builds has equal query and key fields);
* positions grow with the slot inside each segment (true for packed and padded rows, so causal
  by slot equals causal by position within a segment);
* there is no sliding window and no soft-cap (the kernel has neither).

Padding (segment 0) is handled by the segment rule: a real query (segment >= 1) never sees a
padding key; padding queries see only padding and their rows are zeroed afterwards, so every
backend returns the same exact zeros for them. The kernel needs ``T`` to be a multiple of its
forward and backward blocks, so rows are padded to a multiple of :data:`BLOCK` with segment 0
and cut back after.
Grouped-query attention repeats K / V up to ``H`` heads (the kernel has no head groups).
Needs a GPU; ``interpret=True`` runs the same kernel body on any platform (the CPU tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.models.attention.mask import MaskSpec

PLATFORMS = ("gpu",)
BLOCK = 128


def unsupported(spec: MaskSpec, dtype, head_dim: int) -> str | None:
    """Why the Pallas kernel cannot serve this mask, or None when it can."""
    del dtype, head_dim  # any float dtype; head_dim is padded to a power of two by the kernel
    if spec.q_len != spec.kv_len:
        return f"queries ({spec.q_len}) and keys ({spec.kv_len}) differ (KV-cache step)"
    if spec.has_branches:
        return "shared-prompt branch ids are not a Pallas GPU kernel mask"
    if spec.sliding_window is not None:
        return "the Pallas GPU kernel has no sliding window"
    if spec.softcap is not None:
        return "the Pallas GPU kernel has no logit soft-cap"
    return None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float,
           interpret: bool = False) -> jax.Array:
    """Pallas GPU attention for a mask :func:`unsupported` accepts.

    Args:
      q: [B, T, H, hd] queries.
      k, v: [B, T, KV, hd], H % KV == 0.
      spec: a self-attention description without window or soft-cap.
      scale: score scale.
      interpret: run the kernel in Pallas' interpreter (any platform; slow).

    Returns:
      [B, T, H, hd] in q's dtype; zeros for padding queries.
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    reason = unsupported(spec, q.dtype, q.shape[-1])
    if reason is not None:
        raise ValueError(f"pallas_gpu attention cannot serve this mask: {reason}")
    b, t, h, _ = q.shape
    groups = h // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    seg = spec.q_segment_ids
    pad = (-t) % BLOCK
    if pad:
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
        q, k, v, seg = widen(q), widen(k), widen(v), widen(seg)
    out = pallas_attention.mha(q, k, v, seg.astype(jnp.int32), sm_scale=scale, causal=spec.causal,
                               interpret=interpret)[:, :t]
    return jnp.where((spec.q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
