"""Batches ([B, 2, T], buckets, masks aligned with tokens) and the checkpointable iterator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxpref import data
from jaxpref.testing.tokenizers import make_tokenizer
from jaxpref.types import PairBatch, SFTBatch


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "quick", "fox", "lazy", "dog", "Paris"]

    def text(k):
        return " ".join(rng.choice(words, size=k))

    return [data.PreferenceRecord(row=10 + i, id=f"r{i}", prompt=text(int(rng.integers(1, 30))) + "?",
                                  chosen=" " + text(int(rng.integers(1, 40))),
                                  rejected=" " + text(int(rng.integers(1, 40))), alpha=None if i % 3 else 0.75)
            for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(template=None)


@pytest.fixture(scope="module")
def pairs(tok):
    out = data.tokenize_pairs(_records(53), tok, data.TokenizeConfig(max_length=200))
    assert len(out) == 53
    return out


def test_bucket_lengths():
    assert data.bucket_lengths(1000) == (16, 32, 64, 128, 256, 512, 1000)
    assert data.bucket_lengths(512) == (16, 32, 64, 128, 256, 512)
    assert data.choose_bucket(33, (16, 32, 64)) == 64 and data.choose_bucket(32, (64, 16, 32)) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        data.choose_bucket(65, (16, 32, 64))


def test_pair_batch_shapes_and_masks(pairs, tok):
    idx = [3, 0, 7, 12, 40]
    batch = data.pair_batch(pairs, idx, batch_size=8, buckets=(32, 64, 128, 256))
    assert isinstance(batch, PairBatch)
    b, two, t = batch.input_ids.shape
    assert (b, two) == (8, 2) and t in (32, 64, 128, 256)
    assert t >= pairs.lengths()[idx].max() and (t == 32 or t // 2 < pairs.lengths()[idx].max())
    for name in ("input_ids", "loss_mask", "segment_ids", "positions"):
        arr = getattr(batch, name)
        assert arr.shape == (8, 2, t) and arr.dtype == np.int32, name
    assert batch.example_mask.tolist() == [True] * 5 + [False] * 3
    assert batch.index.tolist() == [pairs.row[i] for i in idx] + [-1] * 3
    assert batch.votes.dtype == np.float32 and batch.votes.shape == (8,)
    np.testing.assert_array_equal(batch.lengths[:5], pairs.lengths()[idx])
    for row, i in enumerate(idx):
        for s, resp in enumerate((pairs.chosen[i], pairs.rejected[i])):  # chosen is index 0
            p = pairs.prompt[i]
            n = len(p) + len(resp)
            ids, mask = batch.input_ids[row, s], batch.loss_mask[row, s]
            np.testing.assert_array_equal(ids[:n], np.concatenate([p, resp]))
            np.testing.assert_array_equal(ids[n:], pairs.pad_id)  # right padding
            np.testing.assert_array_equal(ids[mask == 1], resp)  # targets = response tokens
            assert ids[mask == 1][-1] == tok.eos_token_id  # EOS is a target
            assert mask[:len(p)].sum() == 0 and mask[n:].sum() == 0
            np.testing.assert_array_equal(batch.segment_ids[row, s], (np.arange(t) < n).astype(np.int32))
            np.testing.assert_array_equal(batch.positions[row, s], np.where(np.arange(t) < n, np.arange(t), 0))
    assert batch.input_ids[5:].max() == pairs.pad_id and batch.segment_ids[5:].sum() == 0
    assert batch.loss_mask[5:].sum() == 0


def test_pair_batch_is_a_pytree(pairs):
    import jax

    batch = data.pair_batch(pairs, range(4), seq_len=256)
    leaves = jax.tree.leaves(batch)
    assert len(leaves) == 7 and batch.input_ids.shape == (4, 2, 256)
    moved = jax.tree.map(jax.numpy.asarray, batch)
    assert moved.input_ids.shape == (4, 2, 256)
    with pytest.raises(ValueError, match="does not fit seq_len"):
        data.pair_batch(pairs, range(4), seq_len=8)


def test_sft_batch(tok):
    examples = data.tokenize_sft(_records(9), tok, data.TokenizeConfig(max_length=200))
    batch = data.sft_batch(examples, [0, 1, 2], batch_size=4, buckets=(64, 128, 256))
    assert isinstance(batch, SFTBatch) and batch.input_ids.shape[:1] == (4,) and batch.input_ids.ndim == 2
    n = len(examples.prompt[1]) + len(examples.response[1])
    np.testing.assert_array_equal(batch.input_ids[1, :n], np.concatenate([examples.prompt[1], examples.response[1]]))
    np.testing.assert_array_equal(batch.input_ids[1][batch.loss_mask[1] == 1], examples.response[1])
    assert batch.example_mask.tolist() == [True, True, True, False]
    it = data.batch_iterator(examples, global_batch_size=4, seed=0, process_index=0, process_count=1)
    first = next(it)
    assert isinstance(first, SFTBatch) and first.input_ids.shape[0] == 4 and first.example_mask.all()


def _it(pairs, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return data.batch_iterator(pairs, **kw)


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a.__dict__.values(), b.__dict__.values()))


def test_iterator_deterministic_and_epochs_cover_all(pairs):
    a = [next(_it(pairs, global_batch_size=8, seed=3)) for _ in range(1)]
    it1, it2 = _it(pairs, global_batch_size=8, seed=3), _it(pairs, global_batch_size=8, seed=3)
    first = [next(it1) for _ in range(14)]
    assert all(_same(x, next(it2)) for x in first) and _same(a[0], first[0])
    assert not _same(first[0], next(_it(pairs, global_batch_size=8, seed=4)))
    steps = 53 // 8  # drop_remainder: 6 steps per epoch
    for epoch in range(2):
        rows = np.concatenate([b.index for b in first[epoch * steps:(epoch + 1) * steps]])
        assert len(set(rows.tolist())) == 48 and set(rows.tolist()) <= set(pairs.row.tolist())
    assert not np.array_equal(np.concatenate([b.index for b in first[:steps]]),
                              np.concatenate([b.index for b in first[steps:2 * steps]]))  # reshuffled


def test_iterator_resume(pairs):
    kw = dict(global_batch_size=8, seed=0, buckets=(32, 64, 128, 256), length_grouping=3)
    it = _it(pairs, **kw)
    for _ in range(9):  # crosses the epoch boundary (6 steps per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = [next(it) for _ in range(5)]
    resumed = _it(pairs, **kw, state=state)
    assert all(_same(e, next(resumed)) for e in expected)
    with pytest.raises(ValueError, match="different data or settings"):
        _it(pairs, **{**kw, "seed": 1}, state=state)


def test_process_sharding(pairs):
    kw = dict(global_batch_size=8, seed=5, buckets=(32, 64, 128, 256), length_grouping=2)
    whole = _it(pairs, **kw)
    shards = [_it(pairs, **kw, process_index=p, process_count=2) for p in range(2)]
    for _ in range(8):
        g = next(whole)
        parts = [next(s) for s in shards]
        assert all(p.input_ids.shape == (4, 2, g.input_ids.shape[-1]) for p in parts)  # same T everywhere
        for name in ("input_ids", "loss_mask", "segment_ids", "index", "votes"):
            np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(g, name))
        assert not set(parts[0].index.tolist()) & set(parts[1].index.tolist())
    # a state saved with one process resumes on two (same global batches)
    assert whole.get_state()["fingerprint"] == shards[0].get_state()["fingerprint"]
    with pytest.raises(ValueError, match="multiple of process_count"):
        _it(pairs, global_batch_size=6, process_index=0, process_count=4)


def test_length_grouping_reduces_padding(pairs):
    def padded(grouping):
        it = _it(pairs, global_batch_size=4, seed=0, buckets=(16, 32, 48, 64, 96, 128, 192, 256),
                 length_grouping=grouping)
        return sum(next(it).input_ids.shape[-1] for _ in range(13))

    assert padded(13) < padded(0)
    ds = data.BatchDataset(pairs, global_batch_size=4, seed=0, length_grouping=13, process_index=0, process_count=1)
    plan = ds.epoch_plan(0)
    assert sorted(plan.ravel().tolist()) == sorted(np.random.default_rng([0, 0]).permutation(53)[:52].tolist())


def test_padded_last_batch_and_finite_epochs(pairs):
    it = _it(pairs, global_batch_size=8, seed=0, drop_remainder=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == 7
    assert batches[-1].example_mask.tolist() == [True] * 5 + [False] * 3
    assert batches[-1].index[5:].tolist() == [-1] * 3
    rows = np.concatenate([b.index[b.example_mask] for b in batches])
    assert sorted(rows.tolist()) == sorted(pairs.row.tolist())
    assert {b.input_ids.shape[0] for b in batches} == {8}
