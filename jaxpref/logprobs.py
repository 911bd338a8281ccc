"""Per-token and per-sequence log-probabilities from final hidden states, chunked.

This is the only module in jaxpref that touches vocabulary-sized arrays. Logits are never
materialised as ``[N, T, V]``: the sequence is processed in chunks of ``seq_chunk`` positions
and, inside each chunk, the vocabulary in chunks of ``vocab_chunk`` columns with an online
(streaming) log-sum-exp accumulated in float32. The backward pass is a hand-written
``jax.custom_vjp`` that recomputes each chunk's logits once more (the same trade as
``jax.checkpoint`` per chunk, without storing any per-chunk residual), accumulates the
unembedding gradient in float32, and returns cotangents in the input dtypes. Each vocabulary
chunk of the unembedding is read in place with ``dynamic_slice`` in its own layout (``[D, V]``
head or tied ``[V, D]`` embedding: never padded, transposed or copied whole), and the gradient
is accumulated block by block into one float32 buffer of W's shape with
``dynamic_update_slice``. Temporary memory is therefore ``O(N * seq_chunk * vocab_chunk)``
plus ``O(N * T * D)`` plus that single float32 ``dW`` (see ``tests/test_logprobs.py`` and
``bench/chunked_logprobs_memory.py`` for the compiled numbers).

Packed rows (several sequences per row, told apart by segment ids) use
:func:`segment_logprobs`: the same chunked pass over ``[R, T]``, then a segment sum.

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
import numpy as np

Array = jax.Array


@flax.struct.dataclass
class SequenceLogProbs:
    """Log-probabilities of the masked target tokens.

    Attributes:
      token_logps: [N, T] float32 log p of each token given its prefix (0 where not a target).
      sums: [N] float32 summed response log-prob.
      counts: [N] float32 number of response (target) tokens.
      means: [N] float32 ``sums / max(counts, 1)``.

    For packed rows (:func:`segment_logprobs`) ``sums``, ``counts`` and ``means`` are per
    segment id, ``[S]``, while ``token_logps`` stays ``[R, T]``.
    """

    token_logps: Array
    sums: Array
    counts: Array
    means: Array


_EQ = {  # einsum equations per unembedding layout: logits, dh from d logits, dW from d logits
    "dv": ("ncd,dv->ncv", "ncv,dv->ncd", "ncd,ncv->dv"),
    "vd": ("ncd,vd->ncv", "ncv,vd->ncd", "ncd,ncv->vd"),
}


def _check_layout(layout: str) -> None:
    if layout not in _EQ:
        raise ValueError(f"unembedding layout must be 'dv' ([D, V]) or 'vd' ([V, D] tied embedding), got {layout!r}")


def _vocab_axis(layout: str) -> int:
    return 1 if layout == "dv" else 0


def _pad_to(x: Array, axis: int, multiple: int, value=0) -> Array:
    size = x.shape[axis]
    pad = (-size) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _vocab_chunk_at(w: Array, layout: str, i: Array, vocab_chunk: int) -> tuple[Array, Array, Array, Array]:
    """Vocabulary chunk ``i`` of the unembedding, sliced in place (no padded or transposed copy of W).

    The last chunk's start is clamped to ``V - Vc`` so the slice stays in bounds; its columns that
    an earlier chunk already covered are marked invalid.

    Returns:
      (w_c [D, Vc] or [Vc, D] in ``layout``, start [] int32, cols [Vc] int32 vocabulary ids,
      valid [Vc] bool).
    """
    axis = _vocab_axis(layout)
    v, vc = w.shape[axis], min(vocab_chunk, w.shape[axis])
    first = i * vc
    start = jnp.minimum(first, v - vc)
    cols = start + jnp.arange(vc, dtype=jnp.int32)
    return jax.lax.dynamic_slice_in_dim(w, start, vc, axis), start, cols, cols >= first


def _num_vocab_chunks(w: Array, layout: str, vocab_chunk: int) -> int:
    v = w.shape[_vocab_axis(layout)]
    return -(-v // min(vocab_chunk, v))


def _chunk_logits(h: Array, w_c: Array, layout: str, valid_c: Array, softcap: float | None = None) -> Array:
    """[N, C, D] x chunk -> [N, C, Vc] float32 logits, soft-capped ``c * tanh(z / c)`` when ``softcap``
    (Gemma 2's final-logit cap), invalid (already covered) columns at -inf."""
    logits = jnp.einsum(_EQ[layout][0], h, w_c, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return jnp.where(valid_c[None, None, :], logits, -jnp.inf)


def _lse_and_target(h: Array, w: Array, layout: str, targets: Array, vocab_chunk: int,
                    softcap: float | None = None) -> tuple[Array, Array]:
    """Streaming log-sum-exp over the vocabulary and the target logit, both [N, C] float32."""
    n, c = targets.shape

    def body(carry, i):
        m, s, tgt_logit = carry
        w_c, _, cols, valid_c = _vocab_chunk_at(w, layout, i, vocab_chunk)
        logits = _chunk_logits(h, w_c, layout, valid_c, softcap)  # [N, C, Vc]
        m_new = jnp.maximum(m, logits.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(-1)
        hit = (cols == targets[..., None]) & valid_c  # [N, C, Vc], one True per position overall
        tgt_logit = tgt_logit + jnp.where(hit, logits, 0.0).sum(-1)
        return (m_new, s, tgt_logit), None

    zeros = jnp.zeros((n, c), jnp.float32)
    init = (jnp.full((n, c), -jnp.inf, jnp.float32), zeros, zeros)
    (m, s, tgt_logit), _ = jax.lax.scan(body, init, jnp.arange(_num_vocab_chunks(w, layout, vocab_chunk)))
    return m + jnp.log(s), tgt_logit


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _target_logps(h: Array, w: Array, targets: Array, layout: str, seq_chunk: int, vocab_chunk: int,
                  softcap: float | None = None) -> Array:
    """log softmax(cap(h @ W))[targets], [N, T'] float32, never materialising [N, T', V]."""
    return _target_logps_fwd(h, w, targets, layout, seq_chunk, vocab_chunk, softcap)[0]


def _target_logps_fwd(h, w, targets, layout, seq_chunk, vocab_chunk, softcap=None):
    t = h.shape[1]
    h_c, tgt_c = _seq_chunks(h, seq_chunk), _seq_chunks(targets, seq_chunk)

    def body(_, xs):
        lse, tgt_logit = _lse_and_target(xs[0], w, layout, xs[1], vocab_chunk, softcap)
        return None, (tgt_logit - lse, lse)

    _, (logp, lse) = jax.lax.scan(body, None, (h_c, tgt_c))
    return _unchunk(logp, t), (h, w, targets, _unchunk(lse, t))


def _target_logps_bwd(layout, seq_chunk, vocab_chunk, softcap, res, g):
    """d logp_t / d logits_t = onehot(y_t) - p_t, so dh = (g (onehot - p)) W^T and dW = h^T (g (onehot - p)).

    With a soft-cap ``z = c tanh(u / c)`` of the raw logits ``u``, ``dz/du = 1 - (z / c)^2`` multiplies
    ``g (onehot - p)`` before the two matmuls.

    Vocabulary chunks are the outer loop: each slices its ``Vc`` columns of W in place, scans the
    sequence chunks (accumulating its ``[D, Vc]`` gradient block and emitting that block's share
    of ``dh``), then adds the block into the single float32 ``dW`` accumulator (kept in W's own
    layout) with ``dynamic_update_slice``. Temporaries are chunk-sized besides ``dW`` and ``dh``.
    """
    h, w, targets, lse = res
    t = h.shape[1]
    axis = _vocab_axis(layout)
    _, eq_dh, eq_dw = _EQ[layout]
    xs = tuple(_seq_chunks(a, seq_chunk) for a in (h, targets, lse, g.astype(jnp.float32)))

    def vocab_body(carry, i):
        dw, dh = carry
        w_c, start, cols, valid_c = _vocab_chunk_at(w, layout, i, vocab_chunk)

        def seq_body(dw_c, x):
            h_c, tgt_c, lse_c, g_c = x  # [N, C, D], [N, C], [N, C], [N, C]
            z = _chunk_logits(h_c, w_c, layout, valid_c, softcap)  # [N, C, Vc]
            p = jnp.exp(z - lse_c[..., None])
            hit = ((cols == tgt_c[..., None]) & valid_c).astype(jnp.float32)
            d_logits = g_c[..., None] * (hit - p)
            if softcap is not None:  # invalid columns: p = hit = 0, so the -inf there never enters
                d_logits = d_logits * jnp.where(valid_c, 1.0 - jnp.square(z / softcap), 0.0)
            dh_c = jnp.einsum(eq_dh, d_logits, w_c, preferred_element_type=jnp.float32)
            dw_c = dw_c + jnp.einsum(eq_dw, h_c, d_logits, preferred_element_type=jnp.float32)
            return dw_c, dh_c

        dw_c, dh_part = jax.lax.scan(seq_body, jnp.zeros(w_c.shape, jnp.float32), xs)
        block = jax.lax.dynamic_slice_in_dim(dw, start, w_c.shape[axis], axis) + dw_c
        return (jax.lax.dynamic_update_slice_in_dim(dw, block, start, axis), dh + dh_part), None

    init = (jnp.zeros(w.shape, jnp.float32), jnp.zeros(xs[0].shape, jnp.float32))
    (dw, dh), _ = jax.lax.scan(vocab_body, init, jnp.arange(_num_vocab_chunks(w, layout, vocab_chunk)))
    return _unchunk(dh, t).astype(h.dtype), dw.astype(w.dtype), None


_target_logps.defvjp(_target_logps_fwd, _target_logps_bwd)


@functools.partial(jax.jit, static_argnames=("layout", "seq_chunk", "vocab_chunk", "softcap"))
def sequence_logprobs(
    hidden: Array,
    unembedding: Array,
    input_ids: Array,
    loss_mask: Array,
    *,
    layout: str = "dv",
    seq_chunk: int = 128,
    vocab_chunk: int = 8192,
    softcap: float | None = None,
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
      softcap: final-logit soft-cap ``c`` (``model.config.final_logit_softcap``, Gemma 2): the
        log-probs are those of ``c * tanh(logits / c)``, as the model's own logits.

    Returns:
      :class:`SequenceLogProbs` with [N, T] token log-probs and [N] sums, counts and means.
    """
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(f"expected hidden [N, T, D], input_ids [N, T], loss_mask [N, T]; got "
                         f"{hidden.shape}, {input_ids.shape}, {loss_mask.shape}")
    _check_layout(layout)
    if unembedding.ndim != 2 or unembedding.shape[1 - _vocab_axis(layout)] != hidden.shape[-1]:
        raise ValueError(f"unembedding {unembedding.shape} (layout {layout!r}) does not match hidden size "
                         f"{hidden.shape[-1]}")
    n, t, _ = hidden.shape
    seq_chunk = max(1, min(seq_chunk, t - 1)) if t > 1 else 1
    mask = loss_mask[:, 1:].astype(jnp.float32)  # [N, T-1]
    logp = _target_logps(hidden[:, :-1], unembedding, input_ids[:, 1:].astype(jnp.int32), layout, seq_chunk,
                         vocab_chunk, softcap)
    logp = jnp.where(mask > 0, logp, 0.0)
    token_logps = jnp.concatenate([jnp.zeros((n, 1), jnp.float32), logp], axis=1)  # [N, T]
    sums = logp.sum(-1)
    counts = mask.sum(-1)
    return SequenceLogProbs(token_logps, sums, counts, sums / jnp.maximum(counts, 1.0))


@functools.partial(jax.jit, static_argnames=("layout", "seq_chunk", "vocab_chunk", "softcap"))
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


@functools.partial(jax.jit, static_argnames=("num_segments", "layout", "seq_chunk", "vocab_chunk", "softcap"))
def segment_logprobs(
    hidden: Array,
    unembedding: Array,
    input_ids: Array,
    loss_mask: Array,
    segment_ids: Array,
    branch_ids: Array | None = None,
    *,
    num_segments: int,
    layout: str = "dv",
    seq_chunk: int = 128,
    vocab_chunk: int = 8192,
    softcap: float | None = None,
) -> SequenceLogProbs:
    """Per-segment log-prob sums of packed rows: one chunked pass over ``[R, T]``, then a segment sum.

    With ``branch_ids`` (shared-prompt pairs, ``[prompt | chosen | rejected]`` per segment, see
    :func:`shared_predecessors`) the sums are per *sequence* :func:`pair_sequence_ids` (chosen of
    segment ``s`` is ``2s - 1``, rejected ``2s``), and the rejected response's first token is scored
    from the prompt's last hidden state, as in the separate layout.

    Each row holds several sequences, each with its own segment id (0 = padding) and positions
    restarting at 0 (the model's attention is block-diagonal by segment id). A token is a target
    only where ``loss_mask`` is 1 *and* its predecessor in the row belongs to the same segment,
    so the first token of a segment is never a target (its predictor is the previous segment's
    last token), exactly as position 0 of an unpacked row never is. Then
    ``sums[s] = sum_{t in segment s} token_logps[t]`` (Chen et al. 2024, App. C.1, per sequence).

    Args:
      hidden: [R, T, D] final hidden states of the packed rows.
      unembedding: [D, V] (``layout="dv"``) or tied [V, D] (``layout="vd"``).
      input_ids: [R, T] int token ids.
      loss_mask: [R, T] 1 where ``input_ids`` is a response target token.
      segment_ids: [R, T] int segment of each token, 0 = padding; ids may be shared across rows
        only by design of the caller (the sums add every token carrying the id).
      num_segments: static size of the output (segment ids >= it are dropped).
      seq_chunk, vocab_chunk, softcap: as for :func:`sequence_logprobs`.

    Returns:
      :class:`SequenceLogProbs` with ``token_logps`` [R, T] (0 where not a target) and
      ``sums``, ``counts``, ``means`` of shape [num_segments] (entry 0, padding, is 0).
    """
    if segment_ids.shape != input_ids.shape:
        raise ValueError(f"segment_ids {segment_ids.shape} must match input_ids {input_ids.shape}")
    mask = segment_target_mask(loss_mask, segment_ids, branch_ids)  # [R, T]
    if branch_ids is not None:  # hidden[:, t - 1] must be the state that predicts token t
        pred = shared_predecessors(segment_ids, branch_ids)
        src = jnp.concatenate([jnp.maximum(pred[:, 1:], 0), jnp.full_like(pred[:, :1], pred.shape[1] - 1)], axis=1)
        hidden = jnp.take_along_axis(hidden, src[..., None], axis=1)
    lp = sequence_logprobs(hidden, unembedding, input_ids, mask.astype(jnp.int32), layout=layout,
                           seq_chunk=seq_chunk, vocab_chunk=vocab_chunk, softcap=softcap)
    flat_seg = _sequence_ids(segment_ids, branch_ids).reshape(-1)
    sums = jax.ops.segment_sum(lp.token_logps.reshape(-1), flat_seg, num_segments)
    counts = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.float32), flat_seg, num_segments)
    return SequenceLogProbs(lp.token_logps, sums, counts, sums / jnp.maximum(counts, 1.0))


def _xp(x):
    """numpy for host arrays (the packer's gather indices), jax.numpy otherwise: one definition for both."""
    return np if isinstance(x, np.ndarray) else jnp


def shared_predecessors(segment_ids: Array, branch_ids: Array) -> Array:
    """[R, T] int32 row index of the token each token follows in its own sequence (-1: none in the row).

    Shared-prompt rows hold ``[prompt (branch 0) | chosen (1) | rejected (2)]`` per segment. A token's
    predecessor is the one before it in the row, except at the start of a response that directly follows
    another response: that one continues the prompt, so its predecessor is the last branch-0 token before
    it. (Callers check that the predecessor lies in the same non-zero segment.) numpy in, numpy out.
    """
    xp = _xp(segment_ids)
    seg, br = segment_ids.astype(xp.int32), branch_ids.astype(xp.int32)
    t = xp.broadcast_to(xp.arange(seg.shape[1], dtype=xp.int32)[None], seg.shape)
    last_prompt = xp.maximum.accumulate(xp.where((seg != 0) & (br == 0), t, -1), axis=1)
    prev_br = xp.concatenate([xp.zeros_like(br[:, :1]), br[:, :-1]], axis=1)
    new_response = (br > 0) & (prev_br > 0) & (prev_br != br)
    return xp.where(new_response, last_prompt, t - 1)


def pair_sequence_ids(segment_ids: Array, branch_ids: Array) -> Array:
    """[R, T] int32 sequence of each token of shared-prompt rows: chosen (branch 1) of segment ``s`` is
    ``2s - 1``, rejected (branch 2) ``2s``, prompt and padding 0 (the ``pair_segments`` convention of
    :class:`~jaxpref.types.PackedPairBatch`, slot ``p`` = segment ``p + 1``)."""
    xp = _xp(segment_ids)
    seg, br = segment_ids.astype(xp.int32), branch_ids.astype(xp.int32)
    return xp.where((seg != 0) & (br > 0), 2 * seg - 2 + br, 0)


def _sequence_ids(segment_ids: Array, branch_ids: Array | None) -> Array:
    if branch_ids is None:
        return segment_ids.astype(_xp(segment_ids).int32)
    return pair_sequence_ids(segment_ids, branch_ids)


def segment_target_mask(loss_mask: Array, segment_ids: Array, branch_ids: Array | None = None) -> Array:
    """[R, T] bool: ``loss_mask`` where the token's predecessor in its sequence (the one before it in the
    row; :func:`shared_predecessors` with ``branch_ids``) is in the same non-zero segment."""
    xp = _xp(segment_ids)
    seg = segment_ids.astype(xp.int32)
    if branch_ids is None:
        same = xp.concatenate([xp.zeros_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], axis=1)
    else:
        pred = shared_predecessors(seg, branch_ids)
        same = (pred >= 0) & (xp.take_along_axis(seg, xp.maximum(pred, 0), axis=1) == seg)
    return (loss_mask != 0) & same & (seg != 0)


def segment_counts(loss_mask: Array, segment_ids: Array, num_segments: int, branch_ids: Array | None = None) -> Array:
    """[num_segments] float32 target tokens per segment (per sequence with ``branch_ids``; the ``counts``
    of :func:`segment_logprobs`)."""
    mask = segment_target_mask(loss_mask, segment_ids, branch_ids).reshape(-1).astype(jnp.float32)
    return jax.ops.segment_sum(mask, _sequence_ids(segment_ids, branch_ids).reshape(-1), num_segments)


def predictor_index(input_ids: np.ndarray, loss_mask: np.ndarray, segment_ids: np.ndarray,
                    branch_ids: np.ndarray | None = None, *, size: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host (numpy) gather indices for :func:`gathered_target_logprobs`: one entry per target token of
    packed rows ``[R, T]`` (the tokens :func:`segment_logprobs` scores), padded to ``size`` entries.

    Returns ``(predict_index, target_ids, sequence_ids, weights)``, each ``[size]``: the flat index
    ``r * T + t'`` of the hidden state that predicts the target (``t' = t - 1``, or the
    :func:`shared_predecessors` position), its token id, its sequence id (segment id, or
    :func:`pair_sequence_ids` with ``branch_ids``) and weight 1; padding entries point at position 0
    with target 0, sequence 0 and weight 0. ``size`` defaults to the number of targets.
    """
    r, t = input_ids.shape
    mask = segment_target_mask(loss_mask, segment_ids, branch_ids)
    rows, cols = np.nonzero(mask)
    pred = cols - 1 if branch_ids is None else shared_predecessors(segment_ids, branch_ids)[rows, cols]
    n = len(rows)
    size = n if size is None else size
    if n > size:
        raise ValueError(f"predictor_index: {n} target tokens do not fit in size {size}")
    out = [np.zeros(size, np.int32) for _ in range(3)] + [np.zeros(size, np.float32)]
    out[0][:n] = rows * t + pred
    out[1][:n] = input_ids[rows, cols]
    out[2][:n] = _sequence_ids(segment_ids, branch_ids)[rows, cols]
    out[3][:n] = 1.0
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("num_segments", "layout", "seq_chunk", "vocab_chunk", "softcap"))
def gathered_target_logprobs(
    hidden: Array,
    unembedding: Array,
    predict_index: Array,
    target_ids: Array,
    sequence_ids: Array,
    weights: Array,
    *,
    num_segments: int,
    layout: str = "dv",
    seq_chunk: int = 128,
    vocab_chunk: int = 8192,
    softcap: float | None = None,
) -> tuple[Array, Array]:
    """Per-sequence ``(sums, counts)`` [num_segments] from the predicting positions only (forward only).

    :func:`segment_logprobs` runs the LM head on every position of ``[R, T]``; only the ``K`` states that
    predict a target (from :func:`predictor_index`, targets first, padding last) are needed, so they are
    gathered into ``[K, D]`` and the chunked log-prob (:func:`_lse_and_target`, the expression of
    :func:`_target_logps`) runs on chunks of ``seq_chunk`` of them. The loop stops after the last chunk
    that holds a target (a ``fori_loop`` with a traced bound), so ``K`` can be sized for the fullest
    batch (one shape) while each batch pays for its own targets only. Each target's log-prob is the same
    expression on the same state as there, so the sums agree to float32 reassociation.

    Args:
      hidden: [R, T, D] final hidden states.
      unembedding: [D, V] (``layout="dv"``) or tied [V, D] (``layout="vd"``).
      predict_index: [K] int flat index ``r * T + t`` of each predicting state.
      target_ids: [K] int token each one predicts.
      sequence_ids: [K] int output slot of each target (entries >= ``num_segments`` are dropped).
      weights: [K] float 1 for a target, 0 for padding (all padding after the last target).
      num_segments, layout, vocab_chunk, softcap: as for :func:`segment_logprobs`.
      seq_chunk: gathered positions per LM-head step (``K`` is zero-padded to a multiple).

    Returns:
      ``(sums, counts)``, each [num_segments] float32.
    """
    _check_layout(layout)
    k = predict_index.shape[0]
    chunk = max(1, min(seq_chunk, k))
    h = _pad_to(hidden.reshape(-1, hidden.shape[-1])[predict_index], 0, chunk)  # [K', D]
    targets = _pad_to(target_ids.astype(jnp.int32), 0, chunk)
    n_c = h.shape[0] // chunk
    h, targets = h.reshape(n_c, 1, chunk, -1), targets.reshape(n_c, 1, chunk)
    w = weights.astype(jnp.float32)
    last = jnp.max(jnp.where(w > 0, jnp.arange(k), -1))  # the last target's entry
    steps = (last + chunk) // chunk  # chunks up to and including it

    def body(i, out):
        lse, tgt_logit = _lse_and_target(h[i], unembedding, layout, targets[i], vocab_chunk, softcap)  # [1, C]
        return out.at[i].set(tgt_logit[0] - lse[0])

    logp = jax.lax.fori_loop(0, steps, body, jnp.zeros((n_c, chunk), jnp.float32)).reshape(-1)[:k]
    sums = jax.ops.segment_sum(jnp.where(w > 0, w * logp, 0.0), sequence_ids, num_segments)
    return sums, jax.ops.segment_sum(w, sequence_ids, num_segments)
