"""Pallas splash attention for TPUs (``jax.experimental.pallas.ops.tpu.splash_attention``), as MaxText uses it.

Splash ("sparse flash") attention (the JAX team's TPU kernel; FlashAttention-2's online softmax with a
block-sparse mask) takes the mask as a *static* per-head mask object (causal, local window, full) that it
turns into a table of live blocks at trace time, plus runtime segment ids (``SegmentIds(q, kv)``), plus an
optional logit soft-cap ``c·tanh(s / c)`` on the scaled scores. That serves a :class:`MaskSpec` exactly when

* queries and keys are the same tokens (``T == S``: training and scoring rows, packed or padded);
* positions grow with the slot inside each segment (packed and padded rows), so causal and window
  masks by slot equal the mask by position within a segment.

Everything else (sliding window: ``LocalMask((T, T), (W - 1, 0))``; soft-cap; padding as segment 0,
whose rows are zeroed afterwards) is native. Grouped-query attention runs the multi-query kernel
(``make_splash_mqa``) once per KV head over its ``H / KV`` query heads (K / V are not repeated). Rows are
padded to a multiple of :data:`BLOCK` (the kernel's block) with segment 0 and cut back after. Needs a TPU;
``interpret=True`` runs the same kernel in Pallas' TPU interpreter on any platform (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpref.models.attention.mask import MaskSpec

PLATFORMS = ("tpu",)
BLOCK = 128


def unsupported(spec: MaskSpec, dtype, head_dim: int) -> str | None:
    """Why splash cannot serve this mask, or None when it can."""
    del dtype, head_dim
    if spec.q_len != spec.kv_len:
        return f"queries ({spec.q_len}) and keys ({spec.kv_len}) differ (KV-cache step)"
    if spec.has_branches:
        return "shared-prompt branch ids (a response sees the prompt and itself only) are not a splash mask"
    return None


@functools.lru_cache(maxsize=64)
def _kernel(length: int, group: int, causal: bool, window: int | None, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    if window is not None:
        one = masks.LocalMask(shape, window_size=(window - 1, 0 if causal else window - 1), offset=0)
    elif causal:
        one = masks.CausalMask(shape)
    else:
        one = masks.FullMask(shape)
    block = min(BLOCK, length)
    sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernels.make_splash_mqa_single_device(masks.MultiHeadMask([one] * group), block_sizes=sizes,
                                                 attn_logits_soft_cap=softcap, interpret=interpret)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float,
           interpret: bool = False) -> jax.Array:
    """Splash attention for a mask :func:`unsupported` accepts.

    Args:
      q: [B, T, H, hd] queries.
      k, v: [B, T, KV, hd], H % KV == 0.
      spec: a self-attention description (segments, causal, window, soft-cap).
      scale: score scale (applied to ``q``; the kernel does not scale).
      interpret: run in Pallas' TPU interpreter (any platform; slow).

    Returns:
      [B, T, H, hd] in q's dtype; zeros for padding queries.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels

    reason = unsupported(spec, q.dtype, q.shape[-1])
    if reason is not None:
        raise ValueError(f"splash attention cannot serve this mask: {reason}")
    b, t, h, hd = q.shape
    kv = k.shape[2]
    pad = (-t) % BLOCK
    seg = spec.q_segment_ids
    if pad:
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
        q, k, v, seg = widen(q), widen(k), widen(v), widen(seg)
    n = t + pad
    kernel = _kernel(n, h // kv, spec.causal, spec.sliding_window, spec.softcap, interpret)
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, n, kv, h // kv, hd).transpose(0, 2, 3, 1, 4)  # [B,KV,G,T,hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]

    def one(q_g, k_1, v_1, seg_1):  # [G, T, hd], [T, hd], [T, hd], [T]
        return kernel(q_g, k_1, v_1, segment_ids=kernels.SegmentIds(q=seg_1, kv=seg_1))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over KV heads
    out = jax.vmap(per_head)(qg, kt, vt, seg.astype(jnp.int32))  # [B, KV, G, T, hd]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, n, h, hd)[:, :t]
    return jnp.where((spec.q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
