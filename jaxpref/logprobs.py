"""Per-token and per-sequence log-probabilities from final hidden states, chunked.

This is the only module in jaxpref that touches vocabulary-sized arrays. Logits are never
materialised as ``[N, T, V]``: the sequence is processed in chunks of ``seq_chunk`` positions
and, inside each chunk, the vocabulary in chunks of ``vocab_chunk`` columns with an online
(streaming) log-sum-exp accumulated in float32. The backward pass is a hand-written
``jax.custom_vjp`` that recomputes each chunk's logits once more (the same trade as
``jax.checkpoint`` per chunk, without storing any per-chunk residual), accumulates the
unembedding gradient in float32, and returns cotangents in the input dtypes. Peak memory is
therefore ``O(N * seq_chunk * vocab_chunk)`` plus the unavoidable ``[D, V]`` gradient.

Conventions (done here once, nowhere else):
  * **Shift by one.** ``hidden[:, t]`` predicts ``input_ids[:, t + 1]``. ``token_logps[:, t]``
    is ``log p(input_ids[:, t] | input_ids[:, :t])``, aligned to the *target* position, so it
    can be multiplied by the same ``loss_mask`` as the ids. Position 0 is never a target.
  * **Prompt masking.** ``loss_mask[:, t] = 1`` marks ``input_ids[:, t]`` as a response
    (target) token, EOS included when it is part of the response; prompt and padding are 0.
    Sums are ``sum_t loss_mask * token_logps`` (Chen et al. 2024, App. C.1: the sequence
    log-likelihood is the sum of the response-token conditionals), counts are
    ``sum_t loss_mask`` and means are ``sums / counts`` (Chen eq. 15, the length-normalised
    log-likelihood).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class SequenceLogProbs:
    """Log-probabilities of the masked target tokens.

    Attributes:
      token_logps: [N, T] float32 log p of each token given its prefix (0 where not a target).
      sums: [N] float32 summed response log-prob.
      counts: [N] float32 number of response (target) tokens.
      means: [N] float32 ``sums / max(counts, 1)``.
    """

    token_logps: Array
    sums: Array
    counts: Array
    means: Array


def _as_dv(unembedding: Array, layout: str) -> Array:
    if layout == "dv":
        return unembedding
    if layout == "vd":
        return unembedding.T
    raise ValueError(f"unembedding layout must be 'dv' ([D, V]) or 'vd' ([V, D] tied embedding), got {layout!r}")


def _pad_to(x: Array, axis: int, multiple: int, value=0) -> Array:
    size = x.shape[axis]
    pad = (-size) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _vocab_chunks(w_dv: Array, vocab_chunk: int) -> tuple[Array, Array]:
    """[D, V] -> ([nV, D, Vc] chunks, [nV, Vc] validity of each column)."""
    d, v = w_dv.shape
    vc = min(vocab_chunk, v)
    w = _pad_to(w_dv, 1, vc)
    n_v = w.shape[1] // vc
    valid = (jnp.arange(n_v * vc) < v).reshape(n_v, vc)
    return w.reshape(d, n_v, vc).transpose(1, 0, 2), valid


def _chunk_logits(h: Array, w_c: Array, valid_c: Array) -> Array:
    """[N, C, D] x [D, Vc] -> [N, C, Vc] float32 logits, padded columns at -inf."""
    logits = jnp.einsum("ncd,dv->ncv", h, w_c, preferred_element_type=jnp.float32)
    return jnp.where(valid_c[None, None, :], logits, -jnp.inf)


def _lse_and_target(h: Array, w_dv: Array, targets: Array, vocab_chunk: int) -> tuple[Array, Array]:
    """Streaming log-sum-exp over the vocabulary and the target logit, both [N, C] float32."""
    w_chunks, valid = _vocab_chunks(w_dv, vocab_chunk)
    n, c = targets.shape

    def body(carry, xs):
        m, s = carry
        w_c, valid_c = xs
        logits = _chunk_logits(h, w_c, valid_c)  # [N, C, Vc]
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        return (m_new, s), None

    init = (jnp.full((n, c), -jnp.inf, jnp.float32), jnp.zeros((n, c), jnp.float32))
    (m, s), _ = jax.lax.scan(body, init, (w_chunks, valid))
    lse = m + jnp.log(s)
    w_tgt = jnp.take(w_dv, targets, axis=1)  # [D, N, C]
    tgt_logit = jnp.einsum("ncd,dnc->nc", h, w_tgt, preferred_element_type=jnp.float32)
    return lse, tgt_logit


def _seq_chunks(x: Array, seq_chunk: int) -> Array:
    """[N, T', ...] -> [nC, N, C, ...] (T' padded to a multiple of C)."""
    x = _pad_to(x, 1, seq_chunk)
    n, t = x.shape[:2]
    x = x.reshape(n, t // seq_chunk, seq_chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x: Array, length: int) -> Array:
    """[nC, N, C, ...] -> [N, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    n, n_c, c = x.shape[:3]
    return x.reshape(n, n_c * c, *x.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _target_logps(h: Array, w_dv: Array, targets: Array, seq_chunk: int, vocab_chunk: int) -> Array:
    """log softmax(h @ w)[targets], [N, T'] float32, never materialising [N, T', V]."""
    return _target_logps_fwd(h, w_dv, targets, seq_chunk, vocab_chunk)[0]


def _target_logps_fwd(h, w_dv, targets, seq_chunk, vocab_chunk):
    t = h.shape[1]
    h_c, tgt_c = _seq_chunks(h, seq_chunk), _seq_chunks(targets, seq_chunk)

    def body(_, xs):
        lse, tgt_logit = _lse_and_target(xs[0], w_dv, xs[1], vocab_chunk)
        return None, (tgt_logit - lse, lse)

    _, (logp, lse) = jax.lax.scan(body, None, (h_c, tgt_c))
    return _unchunk(logp, t), (h, w_dv, targets, _unchunk(lse, t))


def _target_logps_bwd(seq_chunk, vocab_chunk, res, g):
    """d logp / d h = W[:, y] - E_p[W];  d logp / d W[:, v] = h (1[v = y] - p_v)."""
    h, w_dv, targets, lse = res
    t = h.shape[1]
    w_chunks, valid = _vocab_chunks(w_dv, vocab_chunk)
    g = g.astype(jnp.float32)
    xs = tuple(_seq_chunks(a, seq_chunk) for a in (h, targets, lse, g))

    def seq_body(dw_chunks, xs):
        h_c, tgt_c, lse_c, g_c = xs  # [N, C, D], [N, C], [N, C], [N, C]

        def vocab_body(dh, ys):
            w_c, valid_c, dw_c = ys
            p = jnp.exp(_chunk_logits(h_c, w_c, valid_c) - lse_c[..., None])  # [N, C, Vc]
            gp = g_c[..., None] * p
            dh = dh - jnp.einsum("ncv,dv->ncd", gp, w_c, preferred_element_type=jnp.float32)
            dw_c = dw_c - jnp.einsum("ncd,ncv->dv", h_c, gp, preferred_element_type=jnp.float32)
            return dh, dw_c

        dh0 = jnp.zeros(h_c.shape, jnp.float32)
        dh, dw_chunks = jax.lax.scan(vocab_body, dh0, (w_chunks, valid, dw_chunks))
        w_tgt = jnp.take(w_dv, tgt_c, axis=1).astype(jnp.float32)  # [D, N, C]
        dh = dh + g_c[..., None] * jnp.moveaxis(w_tgt, 0, -1)
        return dw_chunks, dh

    dw0 = jnp.zeros(w_chunks.shape, jnp.float32)  # [nV, D, Vc]
    dw_chunks, dh = jax.lax.scan(seq_body, dw0, xs)
    d, v = w_dv.shape
    dw = dw_chunks.transpose(1, 0, 2).reshape(d, -1)[:, :v]
    # The target term of dW: scatter-add h * g into the target columns.
    contrib = (g[..., None] * h.astype(jnp.float32)).reshape(-1, d)  # [N*T', D]
    dw = dw.at[:, targets.reshape(-1)].add(contrib.T)
    dh = _unchunk(dh, t)
    return dh.astype(h.dtype), dw.astype(w_dv.dtype), None


_target_logps.defvjp(_target_logps_fwd, _target_logps_bwd)


@functools.partial(jax.jit, static_argnames=("layout", "seq_chunk", "vocab_chunk"))
def sequence_logprobs(
    hidden: Array,
    unembedding: Array,
    input_ids: Array,
    loss_mask: Array,
    *,
    layout: str = "dv",
    seq_chunk: int = 128,
    vocab_chunk: int = 8192,
) -> SequenceLogProbs:
    """Masked per-token and per-sequence log-probs, computed chunk by chunk.

    Args:
      hidden: [N, T, D] final hidden states (post final norm), any float dtype.
      unembedding: [D, V] output projection (``layout="dv"``) or a tied [V, D] embedding
        (``layout="vd"``).
      input_ids: [N, T] int token ids.
      loss_mask: [N, T] 1 where ``input_ids[:, t]`` is a target (response) token.
      seq_chunk: positions per chunk (memory ~ N * seq_chunk * vocab_chunk floats).
      vocab_chunk: vocabulary columns per chunk.

    Returns:
      :class:`SequenceLogProbs` with [N, T] token log-probs and [N] sums, counts and means.
    """
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(f"expected hidden [N, T, D], input_ids [N, T], loss_mask [N, T]; got "
                         f"{hidden.shape}, {input_ids.shape}, {loss_mask.shape}")
    w_dv = _as_dv(unembedding, layout)
    if w_dv.shape[0] != hidden.shape[-1]:
        raise ValueError(f"unembedding {unembedding.shape} (layout {layout!r}) does not match hidden size "
                         f"{hidden.shape[-1]}")
    n, t, _ = hidden.shape
    seq_chunk = max(1, min(seq_chunk, t - 1)) if t > 1 else 1
    mask = loss_mask[:, 1:].astype(jnp.float32)  # [N, T-1]
    logp = _target_logps(hidden[:, :-1], w_dv, input_ids[:, 1:].astype(jnp.int32), seq_chunk, vocab_chunk)
    logp = jnp.where(mask > 0, logp, 0.0)
    token_logps = jnp.concatenate([jnp.zeros((n, 1), jnp.float32), logp], axis=1)  # [N, T]
    sums = logp.sum(-1)
    counts = mask.sum(-1)
    return SequenceLogProbs(token_logps, sums, counts, sums / jnp.maximum(counts, 1.0))


@functools.partial(jax.jit, static_argnames=("layout", "seq_chunk", "vocab_chunk"))
def pair_logprobs(hidden: Array, unembedding: Array, input_ids: Array, loss_mask: Array, **kw):
    """:func:`sequence_logprobs` for pairs: ``hidden [B, 2, T, D]``, ids/mask ``[B, 2, T]``.

    Returns a :class:`SequenceLogProbs` whose fields have a leading ``[B, 2]`` (chosen first).
    """
    b, two, t = input_ids.shape
    out = sequence_logprobs(hidden.reshape(b * two, t, -1), unembedding, input_ids.reshape(b * two, t),
                            loss_mask.reshape(b * two, t), **kw)
    return jax.tree.map(lambda x: x.reshape(b, two, *x.shape[1:]), out)


@jax.jit
def masked_hidden_sums(hidden: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Sum of the hidden states that *predict* response tokens (Razin et al. 2025, Def. 2).

    The predictor of target ``t`` is position ``t - 1`` (the last prompt position predicts the
    first response token; EOS's predictor is included when EOS is a target).

    Args:
      hidden: [N, T, D] final hidden states.
      loss_mask: [N, T] target mask (as for :func:`sequence_logprobs`).

    Returns:
      ([N, D] float32 sums, [N] float32 counts).
    """
    pred_mask = loss_mask[:, 1:].astype(jnp.float32)  # [N, T-1]
    sums = jnp.einsum("nt,ntd->nd", pred_mask, hidden[:, :-1].astype(jnp.float32))
    return sums, pred_mask.sum(-1)


@jax.jit
def last_hidden(hidden: Array, segment_ids: Array) -> Array:
    """[N, D] float32 hidden state of the last non-padding position (right padding)."""
    lengths = (segment_ids != 0).sum(-1)
    idx = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
