"""Prefetch of batches to the device: same batches in the same order, exact iterator states for
checkpoints, producer errors surfacing at the right step, clean shutdown, and a training run
that is identical (losses and saved iterator positions) with and without the thread."""

from __future__ import annotations

import json
import threading
import time

import jax
import numpy as np
import pytest

from jaxpref import data
from jaxpref.config import ConfigError, RunConfig, load_config
from jaxpref.testing.tokenizers import make_tokenizer
from jaxpref.training import checkpoint as ckpt
from jaxpref.training.loop import run_training
from jaxpref.training.prefetch import Prefetcher


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "fox", "dog"]
    recs = [data.PreferenceRecord(row=i, id=f"r{i}", prompt=" ".join(rng.choice(words, 4)) + "?",
                                  chosen=" " + " ".join(rng.choice(words, int(rng.integers(1, 20)))),
                                  rejected=" " + " ".join(rng.choice(words, int(rng.integers(1, 20)))))
            for i in range(21)]
    return data.tokenize_pairs(recs, make_tokenizer(template=None), data.TokenizeConfig(max_length=64))


def _iterator(pairs, state=None):
    return data.batch_iterator(pairs, global_batch_size=4, seed=3, state=state)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_match_the_plain_iterator_and_carry_their_own_state(pairs, depth):
    plain = _iterator(pairs)
    expected = []
    for _ in range(12):  # more than an epoch (6 batches): crosses the reshuffle
        batch = next(plain)
        expected.append((batch, plain.get_state()))
    with Prefetcher(_iterator(pairs), depth=depth) as feed:
        for batch, state in expected:
            item = next(feed)
            np.testing.assert_array_equal(item.host.input_ids, batch.input_ids)
            np.testing.assert_array_equal(item.host.index, batch.index)
            assert item.iterator_state == state
            assert item.placed is item.host  # no place(): the host batch itself
    # A checkpointed state resumes at the batch after the item it came from, although the
    # prefetcher's own iterator has run ahead.
    resumed = _iterator(pairs, state=expected[4][1])
    np.testing.assert_array_equal(next(resumed).index, expected[5][0].index)


def test_place_runs_ahead_in_the_background_thread(pairs):
    threads = []

    def place(batch):
        threads.append(threading.current_thread().name)
        return jax.device_put(batch.input_ids)

    with Prefetcher(_iterator(pairs), place, depth=2) as feed:
        first = next(feed)
        deadline = time.time() + 10
        while len(threads) < 3 and time.time() < deadline:  # the consumed item + 2 queued ahead
            time.sleep(0.01)
        time.sleep(0.2)
        assert 3 <= len(threads) <= 4  # + at most one more, built and waiting for a free slot: bounded
        assert isinstance(first.placed, jax.Array)
        np.testing.assert_array_equal(np.asarray(first.placed), first.host.input_ids)
    assert set(threads) == {"jaxpref-prefetch"}


class _Failing:
    """Yields 0, 1, then raises: a bad row found while building the third batch."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        if self.n == 2:
            raise ValueError("data.train row 17: 'chosen' is empty")
        self.n += 1
        return self.n - 1


@pytest.mark.parametrize("depth", [0, 2])
def test_producer_errors_surface_at_the_step_that_needs_the_batch(depth):
    feed = Prefetcher(_Failing(), depth=depth)
    time.sleep(0.2)  # with a thread, the failure is already queued behind the two good batches
    items = [next(feed), next(feed)]  # not raised early
    assert [i.host for i in items] == [0, 1] and items[0].iterator_state is None  # no get_state()
    with pytest.raises(ValueError, match="row 17: 'chosen' is empty"):
        next(feed)
    with pytest.raises(ValueError, match="row 17"):  # raises again, never hangs
        next(feed)
    feed.close()


def test_close_stops_a_thread_blocked_on_a_full_queue(pairs):
    feed = Prefetcher(_iterator(pairs), depth=1)
    time.sleep(0.3)  # the thread fills the queue and blocks on the next put
    thread = feed._thread
    feed.close()
    assert thread is not None and not thread.is_alive()
    feed.close()  # idempotent


def test_negative_depth_is_rejected():
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(iter([]), depth=-1)
    with pytest.raises(ConfigError, match=r"train.prefetch=-1: expected >= 0"):
        load_config(RunConfig, None, ["train.prefetch=-1"])


def test_training_is_identical_with_and_without_prefetch(tmp_path, shared_data):
    common = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
              f"data.train={shared_data / 'hh_rlhf_helpful_base_test_2k.jsonl'}", "data.limit=24",
              "data.max_length=64", "data.buckets=[64]", "train.batch_size=8", "train.steps=5",
              "logging.progress=false", "train.seq_chunk=32", "train.vocab_chunk=256", "optim.lr=1e-3",
              "checkpoint.every=1", "checkpoint.keep=10", "checkpoint.async_save=false",
              "loss=[{name: sigmoid, hparams: {beta: 0.1}}]"]
    runs = {}
    for depth in (0, 3):
        cfg = load_config(RunConfig, None, [f"run_dir={tmp_path / str(depth)}", f"train.prefetch={depth}", *common])
        run_training(cfg, kind="preference")
        metrics = [json.loads(x) for x in (tmp_path / str(depth) / "metrics.jsonl").read_text().splitlines()]
        mngr = ckpt.RunCheckpointer(tmp_path / str(depth) / "checkpoints", every=1, keep=10)
        states = [mngr.restore_meta(s)["data_iterator"] for s in range(1, 6)]
        mngr.close()
        runs[depth] = (metrics, states)
    (m0, s0), (m3, s3) = runs[0], runs[3]
    assert [m["loss"] for m in m3] == [m["loss"] for m in m0]
    assert s3 == s0  # step s saves the position after batch s, not the prefetcher's
    assert len({json.dumps(s, sort_keys=True) for s in s0}) == 5
    assert all(m["data_wait_s"] >= 0 for m in m3)
