"""Chunked log-probs equal a naive full-logits reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref import logprobs
from jaxpref.testing.tolerances import log_softmax_tols, relative_tol


def naive_sequence_logprobs(hidden, w_dv, input_ids, loss_mask):
    """Reference: materialise [N, T, V] float32 logits (tests only)."""
    logits = jnp.einsum("ntd,dv->ntv", hidden.astype(jnp.float32), w_dv.astype(jnp.float32))
    logp_all = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tgt = input_ids[:, 1:]
    logp = jnp.take_along_axis(logp_all, tgt[..., None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logp = logp * mask
    sums = logp.sum(-1)
    counts = mask.sum(-1)
    return jnp.concatenate([jnp.zeros_like(logp[:, :1]), logp], 1), sums, counts, sums / jnp.maximum(counts, 1)


def _inputs(seed, n, t, d, v, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (n, t, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    ids = jax.random.randint(k3, (n, t), 0, v)
    # prompt of random length, response, then right padding
    prompt_len = jax.random.randint(k4, (n,), 1, t // 2)
    resp_end = jnp.minimum(prompt_len + 1 + jnp.arange(n) * 3 % (t // 2), t)
    pos = jnp.arange(t)[None]
    mask = ((pos >= prompt_len[:, None]) & (pos < resp_end[:, None])).astype(jnp.int32)
    return hidden, w, ids, mask


CASES = [
    # n, t, d, v, seq_chunk, vocab_chunk   (odd sizes: T, V not multiples of the chunks)
    (3, 17, 8, 37, 4, 10),
    (2, 9, 16, 64, 8, 64),
    (4, 13, 8, 50, 128, 7),
    (1, 2, 4, 5, 3, 2),
]


@pytest.mark.parametrize("n,t,d,v,sc,vc", CASES)
def test_values_match_naive(n, t, d, v, sc, vc):
    hidden, w, ids, mask = _inputs(n + t, n, t, d, v)
    out = logprobs.sequence_logprobs(hidden, w, ids, mask, seq_chunk=sc, vocab_chunk=vc)
    ref = naive_sequence_logprobs(hidden, w, ids, mask)
    tok_tol, sum_tol = log_softmax_tols(hidden, w, ids, mask)  # chunked vs full: reassociation bounds
    counts = np.maximum(np.asarray(ref[2]), 1)
    mean_tol = sum_tol / counts + relative_tol(1) * np.abs(np.asarray(ref[3]))  # one more rounding: the division
    for got, want, tol in zip((out.token_logps, out.sums, out.means), (ref[0], ref[1], ref[3]),
                              (tok_tol, sum_tol, mean_tol)):
        assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) <= tol)
    np.testing.assert_array_equal(out.counts, ref[2])  # integer counts: exact


@pytest.mark.parametrize("n,t,d,v,sc,vc", CASES[:3])
def test_gradients_match_naive(n, t, d, v, sc, vc):
    hidden, w, ids, mask = _inputs(n * t, n, t, d, v)
    coef = jax.random.normal(jax.random.key(7), (n,))

    def f_chunked(h, w):
        out = logprobs.sequence_logprobs(h, w, ids, mask, seq_chunk=sc, vocab_chunk=vc)
        return (coef * out.sums).sum() + (out.means**2).sum()

    def f_naive(h, w):
        _, sums, _, means = naive_sequence_logprobs(h, w, ids, mask)
        return (coef * sums).sum() + (means**2).sum()

    g1 = jax.jit(jax.grad(f_chunked, argnums=(0, 1)))(hidden, w)
    g2 = jax.jit(jax.grad(f_naive, argnums=(0, 1)))(hidden, w)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_tied_embedding_layout():
    hidden, w, ids, mask = _inputs(0, 2, 11, 8, 30)
    a = logprobs.sequence_logprobs(hidden, w, ids, mask, seq_chunk=4, vocab_chunk=8)
    b = logprobs.sequence_logprobs(hidden, w.T, ids, mask, layout="vd", seq_chunk=4, vocab_chunk=8)
    assert np.all(np.abs(np.asarray(a.sums) - np.asarray(b.sums)) <= log_softmax_tols(hidden, w, ids, mask)[1])
    gw = jax.jit(jax.grad(lambda e: logprobs.sequence_logprobs(hidden, e, ids, mask, layout="vd", seq_chunk=4,
                                                       vocab_chunk=8).sums.sum()))(w.T)
    gw_ref = jax.jit(jax.grad(lambda w: naive_sequence_logprobs(hidden, w, ids, mask)[1].sum()))(w)
    np.testing.assert_allclose(gw, gw_ref.T, atol=1e-5)


def test_bf16_hidden_states():
    hidden, w, ids, mask = _inputs(3, 2, 12, 16, 40, dtype=jnp.bfloat16)
    out = logprobs.sequence_logprobs(hidden, w, ids, mask, seq_chunk=5, vocab_chunk=16)
    ref = naive_sequence_logprobs(hidden, w, ids, mask)  # f32 math on the same bf16 values
    np.testing.assert_allclose(out.sums, ref[1], atol=1e-4, rtol=1e-5)
    gh, gw = jax.jit(jax.grad(lambda h, w: logprobs.sequence_logprobs(h, w, ids, mask, seq_chunk=5,
                                                              vocab_chunk=16).sums.sum(), argnums=(0, 1)))(hidden, w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    gh_ref, gw_ref = jax.jit(jax.grad(lambda h, w: naive_sequence_logprobs(h, w, ids, mask)[1].sum(),
                                      argnums=(0, 1)))(hidden.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(gh.astype(jnp.float32), gh_ref, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(gw.astype(jnp.float32), gw_ref, atol=2e-2, rtol=2e-2)


def test_padding_rows_and_empty_masks_are_finite():
    hidden, w, ids, mask = _inputs(5, 3, 10, 8, 20)
    mask = mask.at[1].set(0)  # a fully padded row
    out = logprobs.sequence_logprobs(hidden, w, ids, mask, seq_chunk=3, vocab_chunk=6)
    assert float(out.counts[1]) == 0 and float(out.sums[1]) == 0 and float(out.means[1]) == 0
    g = jax.jit(jax.grad(lambda h: logprobs.sequence_logprobs(h, w, ids, mask, seq_chunk=3,
                                                             vocab_chunk=6).sums.sum()))(hidden)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g[1]).max()) == 0.0


def test_pair_layout_and_hidden_sums():
    b, t, d, v = 2, 9, 8, 25
    hidden, w, ids, mask = _inputs(11, 2 * b, t, d, v)
    pair = logprobs.pair_logprobs(hidden.reshape(b, 2, t, d), w, ids.reshape(b, 2, t), mask.reshape(b, 2, t),
                                  seq_chunk=4, vocab_chunk=8)
    flat = logprobs.sequence_logprobs(hidden, w, ids, mask, seq_chunk=4, vocab_chunk=8)
    assert np.all(np.abs(np.asarray(pair.sums).reshape(-1) - np.asarray(flat.sums))
                  <= log_softmax_tols(hidden, w, ids, mask)[1])
    sums, counts = logprobs.masked_hidden_sums(hidden, mask)
    h, m = np.asarray(hidden), np.asarray(mask)
    want = np.stack([sum(h[i, t_ - 1] for t_ in range(1, t) if m[i, t_]) for i in range(2 * b)])
    np.testing.assert_allclose(sums, want, atol=1e-5)
    np.testing.assert_allclose(counts, m[:, 1:].sum(-1))


def test_bad_shapes_raise():
    hidden, w, ids, mask = _inputs(0, 2, 8, 8, 20)
    with pytest.raises(ValueError, match="layout"):
        logprobs.sequence_logprobs(hidden, w, ids, mask, layout="xx")
    with pytest.raises(ValueError, match="hidden size"):
        logprobs.sequence_logprobs(hidden, w.T, ids, mask)
    with pytest.raises(ValueError, match="expected hidden"):
        logprobs.sequence_logprobs(hidden, w, ids[:, :4], mask)


def _temp_bytes(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_path_never_allocates_full_logits():
    """Compiled memory analysis: loss+grad temp memory stays far below one [N, T, V] f32 buffer."""
    n, t, d, v = 4, 256, 32, 4096
    hidden, w, ids, mask = _inputs(1, n, t, d, v)
    full_logits_bytes = n * t * v * 4

    def chunked(h, w):
        return logprobs.sequence_logprobs(h, w, ids, mask, seq_chunk=32, vocab_chunk=512).sums.sum()

    def naive(h, w):
        return naive_sequence_logprobs(h, w, ids, mask)[1].sum()

    chunked_temp = _temp_bytes(jax.value_and_grad(chunked, argnums=(0, 1)), hidden, w)
    naive_temp = _temp_bytes(jax.value_and_grad(naive, argnums=(0, 1)), hidden, w)
    assert naive_temp >= full_logits_bytes  # the reference really does materialise [N, T, V]
    assert chunked_temp < full_logits_bytes / 4, (chunked_temp, full_logits_bytes)
    assert chunked_temp * 4 < naive_temp


@pytest.mark.parametrize("layout,v", [("dv", 32768), ("vd", 32000)])
def test_backward_temporaries_hold_one_f32_unembedding_not_several(layout, v):
    """Compiled temp memory of loss + grad at D 256: the float32 ``dW`` accumulator plus chunk-sized
    buffers. The former backward held padded / transposed ``[nV, D, Vc]`` copies of W and of its
    gradient: 98 MiB ("dv", V 32768) and 161 MiB ("vd", V 32000) = 3.1 and 5.2 f32 [D, V]; now 15 MiB."""
    n, t, d, sc, vc = 2, 128, 256, 32, 4096
    w_shape = (d, v) if layout == "dv" else (v, d)

    def loss(h, w, ids, mask):
        return logprobs.sequence_logprobs(h, w, ids, mask, layout=layout, seq_chunk=sc, vocab_chunk=vc).sums.sum()

    args = (jax.ShapeDtypeStruct((n, t, d), jnp.float32), jax.ShapeDtypeStruct(w_shape, jnp.float32),
            jax.ShapeDtypeStruct((n, t), jnp.int32), jax.ShapeDtypeStruct((n, t), jnp.int32))
    temp = _temp_bytes(jax.value_and_grad(loss, argnums=(0, 1)), *args)
    w_f32 = d * v * 4
    chunk_f32 = n * sc * vc * 4  # one [N, seq_chunk, vocab_chunk] float32 tile (1 MiB)
    assert temp < w_f32 + 8 * chunk_f32, (temp / 2**20, w_f32 / 2**20)


def test_segment_logprobs_equal_unpacked_rows():
    """Two sequences packed in one row (own segment ids) give the sums, counts and gradients of the
    same sequences in separate rows; the first token of a segment is never a target."""
    n, t, d, v = 3, 7, 8, 23
    hidden, w, ids, mask = _inputs(21, n, t, d, v)
    mask = mask.at[:, 0].set(1)  # position 0 (and so a segment's first token) must be ignored
    lengths = [7, 5, 6]
    # row 0: seq 0 then seq 1 (12 tokens); row 1: seq 2 then padding; T_pack 12
    t_pack = 12

    def pack(x):
        row0 = jnp.concatenate([x[0, :lengths[0]], x[1, :lengths[1]]])
        row1 = jnp.concatenate([x[2, :lengths[2]], jnp.zeros((t_pack - lengths[2], *x.shape[2:]), x.dtype)])
        return jnp.stack([row0, row1])

    seg = jnp.array([[1] * 7 + [2] * 5, [3] * 6 + [0] * 6], jnp.int32)
    cut = (jnp.arange(t)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)

    def unpacked(h, w):
        return logprobs.sequence_logprobs(h, w, ids, mask * cut, seq_chunk=4, vocab_chunk=8)

    def packed(h, w):
        return logprobs.segment_logprobs(pack(h), w, pack(ids), pack(mask), seg, num_segments=4, seq_chunk=4,
                                         vocab_chunk=8)

    ref, got = unpacked(hidden, w), jax.jit(packed)(hidden, w)
    np.testing.assert_allclose(got.sums[1:], ref.sums, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got.counts[1:], ref.counts)
    assert float(got.sums[0]) == 0.0 and float(got.counts[0]) == 0.0
    coef = jnp.array([0.5, -1.0, 2.0])
    g_ref = jax.jit(jax.grad(lambda h, w: (coef * unpacked(h, w).sums).sum(), argnums=(0, 1)))(hidden, w)
    g_got = jax.jit(jax.grad(lambda h, w: (coef * packed(h, w).sums[1:]).sum(), argnums=(0, 1)))(hidden, w)
    np.testing.assert_allclose(g_got[0] * cut[..., None], g_ref[0], atol=1e-5)
    np.testing.assert_allclose(g_got[1], g_ref[1], atol=1e-5)
