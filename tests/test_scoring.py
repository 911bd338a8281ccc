"""Packed scoring (``jaxpref.evaluation.score_pairs``): per-example equality with the padded layout, the
packer's invariants, the shape ladder and its compile accounting, and the real-token fraction on HH-RLHF."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpref import evaluation as ev
from jaxpref.data.packing import pack_sequences, shared_lengths
from jaxpref.models import presets
from jaxpref.testing.models import random_model
from jaxpref.testing.tokenizers import make_tokenizer


@pytest.fixture(scope="module")
def hh_pairs(shared_data):
    tok = make_tokenizer()
    data = ev.load_eval_pairs(shared_data / "hh_rlhf_helpful_base_test_2k.jsonl", tok, limit=48,
                              tokenize=ev.TokenizeConfig(max_length=200))
    return data.pairs


@pytest.fixture(scope="module")
def model():
    return random_model(presets.tiny_llama(vocab_size=512), seed=3)


def test_pack_sequences_places_every_token_once(hh_pairs):
    packed = pack_sequences(hh_pairs, 256, 3)
    lengths = hh_pairs.lengths()
    for i in range(len(hh_pairs)):
        for s in (0, 1):
            k, seg = packed.batch_of[i, s], packed.segment_of[i, s]
            ids, mask, segments, positions = packed.batch(k)
            where = segments == seg
            assert where.sum() == lengths[i, s] and where.any(1).sum() == 1  # one row, contiguous count
            row = np.flatnonzero(where.any(1))[0]
            cols = np.flatnonzero(where[row])
            assert cols.tolist() == list(range(cols[0], cols[0] + len(cols)))
            want = np.concatenate([hh_pairs.prompt[i], hh_pairs.responses[s][i]])
            np.testing.assert_array_equal(ids[row, cols], want)
            np.testing.assert_array_equal(positions[row, cols], np.arange(len(cols)))
            n_p = len(hh_pairs.prompt[i])
            assert mask[row, cols].tolist() == [0] * n_p + [1] * (len(cols) - n_p)
    # segment ids are unique within a batch and every batch but the last is full size
    for k in range(packed.num_batches):
        seg = packed.batch(k)[2]
        assert len(seg) == (3 if k < packed.num_batches - 1 else packed.batch_rows(k))
    keys = set(zip(packed.batch_of.ravel().tolist(), packed.segment_of.ravel().tolist()))
    assert len(keys) == 2 * len(hh_pairs)
    assert packed.efficiency() == lengths.sum() / packed.computed_tokens()


def test_packed_scores_equal_padded_scores_per_example(model, hh_pairs, monkeypatch):
    """Packed (separate sequences) and packed shared-prompt rows (the default) both equal the padded layout,
    all three with the LM head on the predicting positions only, and those equal the padded layout with the
    head on every position."""
    padded = ev.score_pairs(model, hh_pairs, batch_size=8, packing=False, progress=False)
    packed = ev.score_pairs(model, hh_pairs, batch_size=8, share_prompt=False, progress=False)
    shared = ev.score_pairs(model, hh_pairs, batch_size=8, progress=False)
    with monkeypatch.context() as m:
        m.setattr(ev, "_row_gather", lambda batch: None)  # the full-position head (sequence_logprobs)
        full = ev.score_pairs(model, hh_pairs, batch_size=8, packing=False, progress=False)
    assert full.stats.to_json()["head_tokens"] == full.stats.computed_tokens
    for got in (packed, shared, padded):
        np.testing.assert_array_equal(got.counts, full.counts)
        np.testing.assert_allclose(got.sums, full.sums, rtol=1e-5, atol=0)  # the tolerance of the next check
    for got in (packed, shared):
        np.testing.assert_array_equal(got.counts, padded.counts)
        # float32: each token's log-prob is the same sum of the same terms in every layout (masked attention
        # entries are exact zeros), up to reassociation: ~a few eps32 (1.2e-7) per token; 1e-5 relative to the
        # summed |log-prob| (all terms are negative, so |sum| = sum of |terms|) leaves ~80 eps of room.
        np.testing.assert_allclose(got.sums, padded.sums, rtol=1e-5, atol=0)
    assert packed.stats.layout == shared.stats.layout == "packed" and padded.stats.layout == "padded"
    assert shared.stats.share_prompt and not packed.stats.share_prompt
    seq_tokens = int(hh_pairs.lengths().sum())
    assert packed.stats.real_tokens == padded.stats.real_tokens == seq_tokens
    prompts = sum(len(p) for p in hh_pairs.prompt)
    assert shared.stats.real_tokens == seq_tokens - prompts and shared.stats.sequence_tokens == seq_tokens
    assert packed.stats.to_json()["real_token_fraction"] > padded.stats.to_json()["real_token_fraction"]
    assert shared.stats.computed_tokens < packed.stats.computed_tokens
    for got in (packed, shared, padded):  # the LM head ran on the predicting positions only, in whole chunks
        head = got.stats.to_json()["head_tokens"]
        assert got.counts.sum() <= head < got.stats.computed_tokens and head % 128 == 0


@pytest.mark.parametrize("share_prompt", [False, True])
def test_lm_head_on_predicting_positions_equals_every_position(hh_pairs, share_prompt):
    """``gathered_target_logprobs`` (the LM head on the predicting positions only, host gather indices) equals
    ``segment_logprobs`` (every position) per sequence, on real packed rows of both layouts."""
    import jax
    import jax.numpy as jnp

    from jaxpref import logprobs

    packed = pack_sequences(hh_pairs, 512, 3, share_prompt=share_prompt)
    ids, mask, seg, _ = packed.batch(0)
    br = packed.branches(0)
    r, t = ids.shape
    kh, kw = jax.random.split(jax.random.key(7))
    hidden = jax.random.normal(kh, (r, t, 32))
    w = jax.random.normal(kw, (32, 512)) * 0.3
    full = logprobs.segment_logprobs(hidden, w, ids, mask, seg, br, num_segments=packed.num_segments,
                                     seq_chunk=64, vocab_chunk=128)
    want_mask = np.asarray(logprobs.segment_target_mask(jnp.asarray(mask), jnp.asarray(seg),
                                                        None if br is None else jnp.asarray(br)))
    n = int(want_mask.sum())
    assert 0 < n < (seg != 0).sum()
    gather = logprobs.predictor_index(ids, mask, seg, br, size=n + (-n) % 64 + 128)  # 2 chunks past the last
    assert gather[3].sum() == n and (gather[3][n:] == 0).all() and (gather[0][n:] == 0).all()
    np.testing.assert_array_equal(gather[1][:n], ids[want_mask])  # targets in row-major order
    sums, counts = logprobs.gathered_target_logprobs(hidden, w, *gather, num_segments=packed.num_segments,
                                                     seq_chunk=64, vocab_chunk=128)
    np.testing.assert_array_equal(counts, full.counts)
    # float32: each target's log-prob is the same chunked expression on the same state (a [K, D] gather of it),
    # so only the matmul blocking and the sum order differ: a few eps32 (1.2e-7) per token relative to its
    # |log-prob| ~ log V; all terms are negative, so 1e-5 of |sum| leaves ~80 eps of room.
    np.testing.assert_allclose(sums, full.sums, rtol=1e-5, atol=0)
    assert np.abs(np.asarray(full.sums)).sum() > 0
    with pytest.raises(ValueError, match="do not fit"):
        logprobs.predictor_index(ids, mask, seg, br, size=n - 1)


def test_packed_scoring_is_sharded_over_the_mesh(model, hh_pairs):
    from flax import nnx

    from jaxpref.parallel import MeshConfig, make_mesh, place_params

    mesh = make_mesh(MeshConfig(data=-1))  # 8 fake CPU devices (conftest): rows a multiple of 8
    plain = ev.score_pairs(model, hh_pairs, batch_size=8, progress=False)
    graphdef, state = nnx.split(model)
    placed = nnx.merge(graphdef, place_params(state, mesh))
    sharded = ev.score_pairs(placed, hh_pairs, batch_size=8, mesh=mesh, progress=False)
    assert all(rows % 8 == 0 for rows, _ in sharded.stats.shapes)
    np.testing.assert_allclose(sharded.sums, plain.sums, rtol=1e-5, atol=0)


def test_shape_ladder_bounds_the_compilations(shared_data):
    """A mixed-length set (8 to 256 tokens, shared-prompt rows to ~500) compiles at most two shapes, and a
    second call none."""
    tok = make_tokenizer()
    data = ev.load_eval_pairs(shared_data / "hh_rlhf_helpful_base_test_2k.jsonl", tok, limit=64,
                              tokenize=ev.TokenizeConfig(max_length=256))
    lengths = data.pairs.lengths()
    assert lengths.min() < 64 and lengths.max() > 200
    fresh = random_model(presets.tiny_llama(vocab_size=512, hidden_size=48), seed=0)  # a structure no test jitted
    first = ev.score_pairs(fresh, data.pairs, batch_size=8, progress=False).stats
    longest = int(shared_lengths(data.pairs).max())  # shared-prompt rows (the default): prompt + chosen + rejected
    ladder = ev.ladder_length(longest)  # its rows, or twice as long when that fills them better
    assert len(first.shapes) <= 2 and len({t for _, t in first.shapes}) == 1
    assert first.shapes[0][1] in (ladder, 2 * ladder)
    assert 1 <= first.compiles + first.cache_loads <= len(first.shapes)
    second = ev.score_pairs(fresh, data.pairs, batch_size=8, progress=False).stats
    assert second.shapes == first.shapes and second.compiles == 0 and second.cache_loads == 0
    assert first.to_json()["real_token_fraction"] >= 0.9


def test_ladder_length():
    assert [ev.ladder_length(n) for n in (1, 128, 129, 1000, 1024, 1025)] == [128, 128, 256, 1024, 1024, 2048]
    with pytest.raises(ValueError, match="longer than"):
        ev.ladder_length(10**7)


def test_with_hidden_refuses_packing(model, hh_pairs):
    with pytest.raises(ValueError, match="padded layout"):
        ev.score_pairs(model, hh_pairs, with_hidden=True, packing=True, progress=False)
