"""Pure-JAX flash attention: tiled online softmax with a recomputing ``custom_vjp`` backward.

Forward (FlashAttention, Dao et al. 2022, Alg. 1; FlashAttention-2, Dao 2023, Alg. 1): for each
query tile, loop over key tiles keeping the running row maximum ``m``, the running sum
``l = sum exp(s - m)`` and the unnormalised output ``acc``; a new tile rescales both by
``exp(m_old - m_new)``. The result is ``acc / l`` and the saved statistic is the log-sum-exp
``L = m + log l`` per query.

Backward (FlashAttention-2, Alg. 2): recompute each tile's probabilities from the saved ``L``
(``P = exp(S - L)``), with ``D = rowsum(dO * O)``::

    dV += P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ += dS K * scale,   dK += dS^T Q * scale

(with soft-capping ``S = c tanh(S_raw / c)``, ``dS_raw = dS * (1 - tanh^2)``). The outer loop
runs over key tiles (``dK``, ``dV`` tiles live in the loop carry); ``dQ`` is one float32 buffer
updated in place.

Memory is O(B * H * block_q * block_kv) for the scores plus O(T) for inputs, output and ``L``:
no ``[T, S]`` array exists in either pass. Scores, softmax statistics and all gradient
accumulators are float32 for any input dtype; probabilities are cast to the input dtype for the
``P V`` product (as the XLA backend does), accumulated in float32.

Tile skipping: a ``[num_q_tiles, num_kv_tiles]`` table of live tiles is computed from the mask
description (per-tile lexicographic min / max of ``(segment, position)`` over non-padding
tokens, reduced over the batch). A tile is dead when it provably has no visible pair:

* causal: every key is lexicographically after every query (later segment, or same segment
  and later position);
* window: every query is at least W positions after every key of its segment;
* segments: the tiles' segment ranges do not overlap; or one side is all padding;
* branches (shared-prompt pairs): the key tile holds no shared-prompt token (branch 0) and the
  branch ranges of its keys and of the query tile's response tokens (branch > 0) do not overlap.

Each query tile loops only between its first and last live key tile (causal and window
skipping by index bounds) and a ``lax.cond`` skips dead tiles in between (packing). Skipping is
an optimisation only: inside a live tile the exact mask is applied.

Grouped-query attention (H = G * KV) reshapes queries to ``[.., KV, G, ..]``; K and V are never
repeated. Queries that see no key return exact zeros, with zero gradients.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxpref.models.attention.mask import MaskSpec

F32 = jnp.float32
_BIG = 2**30

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


class _Static(NamedTuple):
    """Hashable settings of one kernel instance (``custom_vjp`` non-differentiable argument)."""

    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    block_q: int
    block_kv: int


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def attend(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, *, scale: float,
           block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """Blocked attention with the semantics of :func:`jaxpref.models.attention.xla.attend`.

    Args:
      q: [B, T, H, hd] queries.
      k, v: [B, S, KV, hd] keys / values, H % KV == 0.
      spec: the mask description.
      scale: multiplies the scores.
      block_q, block_kv: tile sizes, default :data:`DEFAULT_BLOCK_Q` / :data:`DEFAULT_BLOCK_KV`
        (read at call time), clipped to the lengths rounded up to 8. T and S need not be
        multiples: they are padded with segment id 0, which masks the padding exactly.

    Returns:
      [B, T, H, hd] in q's dtype.
    """
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    block_q, block_kv = block_q or DEFAULT_BLOCK_Q, block_kv or DEFAULT_BLOCK_KV
    bq, bk = min(block_q, _round_up(t, 8)), min(block_kv, _round_up(s, 8))
    tp, sp = _round_up(t, bq), _round_up(s, bk)

    def pad(x, n):
        return x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    qg = pad(q, tp).reshape(b, tp, kvh, h // kvh, hd)
    masks = tuple(jnp.asarray(pad(x, n), jnp.int32) for x, n in (
        (spec.q_segment_ids, tp), (spec.q_positions, tp), (spec.kv_segment_ids, sp), (spec.kv_positions, sp)))
    branches = (None, None)
    if spec.has_branches:
        branches = (jnp.asarray(pad(spec.q_branch_ids, tp), jnp.int32),
                    jnp.asarray(pad(spec.kv_branch_ids, sp), jnp.int32))
    static = _Static(bool(spec.causal), spec.sliding_window, spec.softcap, float(scale), bq, bk)
    out = _flash(static, qg, pad(k, sp), pad(v, sp), *masks, *branches)
    return out[:, :t].reshape(b, t, h, hd)


# ----------------------------------------------------------------------------------- tile table


def _lex_stats(seg: jax.Array, pos: jax.Array, block: int):
    """Per tile over non-padding tokens: (any, seg_min, pos_min at seg_min, seg_max, pos_max at seg_max), [B, n]."""
    b, n = seg.shape[0], seg.shape[1] // block
    seg, pos = seg.reshape(b, n, block), pos.reshape(b, n, block)
    valid = seg != 0
    smin = jnp.min(jnp.where(valid, seg, _BIG), -1)
    smax = jnp.max(jnp.where(valid, seg, -_BIG), -1)
    pmin = jnp.min(jnp.where(valid & (seg == smin[..., None]), pos, _BIG), -1)
    pmax = jnp.max(jnp.where(valid & (seg == smax[..., None]), pos, -_BIG), -1)
    return jnp.any(valid, -1), smin, pmin, smax, pmax


def _branch_stats(seg: jax.Array, branch: jax.Array, block: int):
    """Per tile: (any shared-prompt token, min and max branch of the response tokens), [B, n]."""
    b, n = seg.shape[0], seg.shape[1] // block
    seg, branch = seg.reshape(b, n, block), branch.reshape(b, n, block)
    resp = (seg != 0) & (branch != 0)
    return (jnp.any((seg != 0) & (branch == 0), -1), jnp.min(jnp.where(resp, branch, _BIG), -1),
            jnp.max(jnp.where(resp, branch, -_BIG), -1))


def live_tiles(static: _Static, qseg, qpos, kseg, kpos, qbr=None, kbr=None) -> jax.Array:
    """[num_q_tiles, num_kv_tiles] bool: False only where no batch row has a visible pair."""
    qa, qsmin, qpmin, qsmax, qpmax = (x[:, :, None] for x in _lex_stats(qseg, qpos, static.block_q))
    ka, ksmin, kpmin, ksmax, kpmax = (x[:, None, :] for x in _lex_stats(kseg, kpos, static.block_kv))
    live = qa & ka & (qsmin <= ksmax) & (ksmin <= qsmax)
    if static.causal:  # some key (seg, pos) <= some query (seg, pos), lexicographically
        live &= (ksmin < qsmax) | ((ksmin == qsmax) & (kpmin <= qpmax))
    if static.window is not None:  # some query (seg, pos) < some key (seg, pos + W)
        live &= (qsmin < ksmax) | ((qsmin == ksmax) & (qpmin < kpmax + static.window))
    if qbr is not None:  # a visible pair needs a branch-0 key, or a key of the query's own branch (> 0)
        _, qbmin, qbmax = (x[:, :, None] for x in _branch_stats(qseg, qbr, static.block_q))
        kzero, kbmin, kbmax = (x[:, None, :] for x in _branch_stats(kseg, kbr, static.block_kv))
        live &= kzero | ((qbmin <= kbmax) & (kbmin <= qbmax))
    return jnp.any(live, axis=0)


def _bounds(row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last True index of a bool vector ((0, 0) when none)."""
    n, any_ = row.shape[0], jnp.any(row)
    lo = jnp.where(any_, jnp.argmax(row), 0)
    hi = jnp.where(any_, n - jnp.argmax(row[::-1]), 0)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


# ----------------------------------------------------------------------------------- tiles


def _tile_scores(static: _Static, spec: MaskSpec, qi, kj, qseg, qpos, kseg, kpos, qbr=None, kbr=None):
    """Masked float32 scores of one tile [B, KV, G, bq, bk] and tanh(raw / cap) (for the cap's derivative)."""
    raw = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=F32) * F32(static.scale)
    tanh = None
    if static.softcap is not None:
        tanh = jnp.tanh(raw / static.softcap)
        raw = static.softcap * tanh
    branches = (None, None) if qbr is None else (qbr[:, :, None], kbr[:, None, :])
    mask = spec.visible(qseg[:, :, None], qpos[:, :, None], kseg[:, None, :], kpos[:, None, :], *branches)
    return jnp.where(mask[:, None, None], raw, -jnp.inf), tanh


def _spec(static: _Static, qseg, qpos, kseg, kpos, qbr, kbr) -> MaskSpec:
    return MaskSpec(qseg, qpos, kseg, kpos, causal=static.causal, sliding_window=static.window,
                    softcap=static.softcap, q_branch_ids=qbr, kv_branch_ids=kbr)


def _slice(x, start, size):
    return None if x is None else lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _forward(static: _Static, q, k, v, qseg, qpos, kseg, kpos, qbr=None, kbr=None):
    """(out [B, T, KV, G, hd] in q.dtype, lse [B, T, KV, G] float32, live table)."""
    b, tp, kvh, g, hd = q.shape
    bq, bk = static.block_q, static.block_kv
    spec = _spec(static, qseg, qpos, kseg, kpos, qbr, kbr)
    live = live_tiles(static, qseg, qpos, kseg, kpos, qbr, kbr)

    def q_tile(i):
        q0 = i * bq
        qi, qs, qp, qb = _slice(q, q0, bq), _slice(qseg, q0, bq), _slice(qpos, q0, bq), _slice(qbr, q0, bq)

        def update(j, carry):
            m, l, acc = carry
            k0 = j * bk
            s, _ = _tile_scores(static, spec, qi, _slice(k, k0, bk), qs, qp, _slice(kseg, k0, bk), _slice(kpos, k0, bk),
                                qb, _slice(kbr, k0, bk))
            m_new = jnp.maximum(m, jnp.max(s, -1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows with nothing visible yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _slice(v, k0, bk), preferred_element_type=F32)
            return m_new, alpha * l + jnp.sum(p, -1), alpha[..., None] * acc + pv

        def body(j, carry):
            return lax.cond(live[i, j], lambda c: update(j, c), lambda c: c, carry)

        init = (jnp.full((b, kvh, g, bq), -jnp.inf, F32), jnp.zeros((b, kvh, g, bq), F32),
                jnp.zeros((b, kvh, g, bq, hd), F32))
        lo, hi = _bounds(live[i])
        m, l, acc = lax.fori_loop(lo, hi, body, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    out, lse = lax.map(q_tile, jnp.arange(tp // bq))  # [nq, B, KV, G, bq, hd], [nq, B, KV, G, bq]
    out = jnp.moveaxis(out, 4, 1).reshape(tp // bq, bq, b, kvh, g, hd)
    out = jnp.moveaxis(out, 2, 0).reshape(b, tp, kvh, g, hd)
    lse = jnp.moveaxis(jnp.moveaxis(lse, 4, 1), 2, 0).reshape(b, tp, kvh, g)
    return out, lse, live


def _backward(static: _Static, q, k, v, qseg, qpos, kseg, kpos, qbr, kbr, out, lse, live, dout):
    """(dq, dk, dv) in the input dtypes, float32 accumulation (FlashAttention-2 Alg. 2)."""
    b, tp, kvh, g, hd = q.shape
    sp, bq, bk = k.shape[1], static.block_q, static.block_kv
    spec = _spec(static, qseg, qpos, kseg, kpos, qbr, kbr)
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), -1)  # [B, T, KV, G]

    def kv_tile(dq, j):
        k0 = j * bk
        kj, vj, ks, kp = _slice(k, k0, bk), _slice(v, k0, bk), _slice(kseg, k0, bk), _slice(kpos, k0, bk)
        kb = _slice(kbr, k0, bk)

        def update(i, carry):
            dq, dk, dv = carry
            q0 = i * bq
            qi, doi = _slice(q, q0, bq), _slice(dout, q0, bq)
            s, tanh = _tile_scores(static, spec, qi, kj, _slice(qseg, q0, bq), _slice(qpos, q0, bq), ks, kp,
                                   _slice(qbr, q0, bq), kb)
            lse_i = jnp.moveaxis(_slice(lse, q0, bq), 1, -1)  # [B, KV, G, bq]
            p = jnp.exp(s - lse_i[..., None])  # masked entries: exp(-inf) = 0
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi, preferred_element_type=F32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=F32)
            ds = p * (dp - jnp.moveaxis(_slice(delta, q0, bq), 1, -1)[..., None])
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = (ds * F32(static.scale)).astype(q.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=F32)
            dq_i = _slice(dq, q0, bq) + jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=F32)
            return lax.dynamic_update_slice_in_dim(dq, dq_i, q0, axis=1), dk, dv

        def body(i, carry):
            return lax.cond(live[i, j], lambda c: update(i, c), lambda c: c, carry)

        zeros = jnp.zeros((b, bk, kvh, hd), F32)
        lo, hi = _bounds(live[:, j])
        dq, dk, dv = lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(kv_tile, jnp.zeros(q.shape, F32), jnp.arange(sp // bk))  # dk: [nk, B, bk, KV, hd]
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, sp, kvh, hd)
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, sp, kvh, hd)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, qseg, qpos, kseg, kpos, qbr, kbr):
    """[B, T, KV, G, hd] grouped queries -> output of the same shape (differentiable in q, k, v);
    ``qbr`` / ``kbr``: branch ids or None."""
    return _forward(static, q, k, v, qseg, qpos, kseg, kpos, qbr, kbr)[0]


def _flash_fwd(static, q, k, v, qseg, qpos, kseg, kpos, qbr, kbr):
    out, lse, live = _forward(static, q, k, v, qseg, qpos, kseg, kpos, qbr, kbr)
    return out, (q, k, v, qseg, qpos, kseg, kpos, qbr, kbr, out, lse, live)


def _flash_bwd(static, residuals, dout):
    q, k, v, qseg, qpos, kseg, kpos, qbr, kbr, out, lse, live = residuals
    dq, dk, dv = _backward(static, q, k, v, qseg, qpos, kseg, kpos, qbr, kbr, out, lse, live, dout)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
