"""Packed pairs (jaxpref.data.packing): packer invariants, packed == padded log-probs, losses and
gradients on a tiny random Llama, segment isolation, and a packed ``train.preference`` run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxpref import losses, models
from jaxpref.config import OptimConfig, RunConfig, load_config
from jaxpref.data import BatchDataset, TokenizedPairs, TokenizeStats, pair_batch
from jaxpref.data.packing import PackSpec, auto_rows, efficiency, first_fit_decreasing, pack_pairs, plan_groups
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tolerances import (
    assert_same_sgd_step,
    dpo_ln2_tol,
    dpo_step_bounds,
    relative_tol,
    transformer_chain_length,
)
from jaxpref.training import optim
from jaxpref.training import step as S
from jaxpref.training.loop import RunError, run_training

CHUNKS = {"seq_chunk": 8, "vocab_chunk": 48}
LLAMA = models.presets.tiny_llama(vocab_size=128, hidden_size=32, num_layers=2)


def synthetic_pairs(n: int, seed: int = 0, vocab: int = 128, max_prompt: int = 8, max_response: int = 12):
    """Random token pairs (ids >= 3) with prompt / response lengths drawn in [1, max]."""
    rng = np.random.default_rng(seed)

    def ids(hi):
        return rng.integers(3, vocab, int(rng.integers(1, hi + 1))).astype(np.int32)

    prompt = [ids(max_prompt) for _ in range(n)]
    chosen = [ids(max_response) for _ in range(n)]
    rejected = [ids(max_response) for _ in range(n)]
    return TokenizedPairs(prompt=prompt, chosen=chosen, rejected=rejected, row=np.arange(n, dtype=np.int64) + 100,
                          ids=[f"p{i}" for i in range(n)], votes=rng.uniform(0.5, 1.0, n).astype(np.float32),
                          tie=np.zeros(n, bool), pad_id=0, stats=TokenizeStats(n_input=n, n_kept=n))


# ------------------------------------------------------------------------------ packer, no model


def test_first_fit_decreasing_is_ffd_and_respects_capacity():
    sizes = [4, 8, 1, 4, 2, 1, 7]
    bins = first_fit_decreasing(sizes, 10)
    # decreasing: 8 -> b0, 7 -> b1, 4 -> b2, 4 -> b2, 2 -> b0, 1 -> b1, 1 -> b1
    assert bins.tolist() == [2, 0, 1, 2, 0, 1, 1]
    assert all(np.bincount(bins, weights=sizes) <= 10)
    assert first_fit_decreasing(sizes, 10, max_bins=2) is None
    assert first_fit_decreasing(sizes, 10, max_bins=3).tolist() == bins.tolist()
    with pytest.raises(ValueError, match="must lie in"):
        first_fit_decreasing([11], 10)


def test_plan_groups_places_every_pair_once_within_capacity():
    pairs = synthetic_pairs(200, seed=1)
    lengths = pairs.lengths()
    spec = PackSpec(seq_len=40, rows=3)
    order = np.random.default_rng(0).permutation(len(pairs))
    plan, left = plan_groups(lengths, order, spec, pairs_per_group=4, num_groups=80)
    placed = plan[plan >= 0]
    assert len(placed) + left == len(pairs) and left == 0  # 80 groups of 4 slots are plenty
    assert len(np.unique(placed)) == len(placed)  # nobody twice
    for group in plan:
        seqs = lengths[group[group >= 0]].reshape(-1)
        assert first_fit_decreasing(seqs, spec.seq_len, spec.rows) is not None  # fits its rows
    again, _ = plan_groups(lengths, order, spec, pairs_per_group=4, num_groups=80)
    np.testing.assert_array_equal(plan, again)  # deterministic
    used = plan[: (len(placed) + 3) // 4]
    assert (used >= 0).mean() > 0.85  # groups are filled (deferral tops them up from later pairs)
    short, left_short = plan_groups(lengths, order, spec, pairs_per_group=4, num_groups=20)
    assert (short >= 0).sum() + left_short == len(pairs) and left_short > 0


def test_pack_pairs_layout():
    pairs = synthetic_pairs(20, seed=2)
    idx = [5, 0, 17, -1, 3, 9]
    spec = PackSpec(seq_len=32, rows=8, groups=2)
    b = pack_pairs(pairs, idx, spec, first_slot=6)
    ids, seg, pos, lm = (np.asarray(x) for x in (b.input_ids, b.segment_ids, b.positions, b.loss_mask))
    assert ids.shape == (8, 32) and b.pair_segments.shape == (6, 2) and b.groups == 2
    assert b.example_mask.tolist() == [True, True, True, False, True, True]
    assert b.index.tolist() == [105, 100, 117, -1, 103, 109]
    np.testing.assert_allclose(b.votes[[0, 3]], [pairs.votes[5], 1.0])
    assert b.pair_segments[3].tolist() == [0, 0]
    for p, i in enumerate(idx):
        if i < 0:
            continue
        for s, resp in enumerate(pairs.responses):
            sid = int(b.pair_segments[p, s])
            assert sid == 2 * (6 + p) + 1 + s  # global slot 6 + p
            rows, cols = np.nonzero(seg == sid)
            assert len(set(rows)) == 1 and rows[0] % 2 == p % 2  # one row, of the pair's group
            assert np.all(np.diff(cols) == 1)  # contiguous
            want = np.concatenate([pairs.prompt[i], resp[i]])
            np.testing.assert_array_equal(ids[rows[0], cols], want)
            np.testing.assert_array_equal(pos[rows[0], cols], np.arange(len(want)))
            mask = np.zeros(len(want), np.int32)
            mask[len(pairs.prompt[i]):] = 1
            mask[0] = 0
            np.testing.assert_array_equal(lm[rows[0], cols], mask)
    assert np.all(ids[seg == 0] == pairs.pad_id) and np.all(lm[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
    assert efficiency(b) == pytest.approx((seg != 0).sum() / seg.size)
    with pytest.raises(ValueError, match="need more than 2 rows of 32 tokens"):
        pack_pairs(pairs, idx, PackSpec(seq_len=32, rows=2))
    with pytest.raises(ValueError, match="at least 2 rows per group"):
        PackSpec(seq_len=32, rows=2, groups=2)


def test_packed_iterator_epoch_determinism_and_processes():
    pairs = synthetic_pairs(64, seed=3)
    rows = auto_rows(pairs.lengths(), 4, 48, groups=2)
    assert rows % 2 == 0 and rows >= 4 and auto_rows(pairs.lengths(), 4, 48, groups=2, devices=3) % 6 == 0
    spec = PackSpec(seq_len=48, rows=rows, groups=2)
    kw = dict(global_batch_size=8, seed=4, num_epochs=1, packing=spec, process_count=2)
    p0, p1 = BatchDataset(pairs, process_index=0, **kw), BatchDataset(pairs, process_index=1, **kw)
    seen = []
    for step in range(len(p0)):
        b0, b1 = p0[step], p1[step]
        assert b0.input_ids.shape == b1.input_ids.shape == (spec.rows, 48)
        s0, s1 = set(np.unique(b0.segment_ids)) - {0}, set(np.unique(b1.segment_ids)) - {0}
        assert not s0 & s1 and max(s0 | s1) <= 2 * 8  # global slots: unique across processes
        seen += [i for b in (b0, b1) for i in np.asarray(b.index).tolist() if i >= 0]
    assert len(seen) == len(set(seen)) and len(seen) + p0.packing_left_out[0] == len(pairs)
    again = BatchDataset(pairs, process_index=0, **kw)
    for step in range(len(p0)):
        jax.tree.map(np.testing.assert_array_equal, again[step], p0[step])
    assert again.fingerprint != BatchDataset(pairs, process_index=0, **{**kw, "packing": None}).fingerprint
    with pytest.raises(ValueError, match="exceeds the packed row length"):
        BatchDataset(pairs, global_batch_size=8, packing=PackSpec(seq_len=8, rows=4), process_index=0,
                     process_count=1)


# ----------------------------------------------------------------------------- tiny random Llama


@pytest.fixture(scope="module")
def llama():
    with fast_compile():
        graphdef, params, rest = S.split_model(random_model(LLAMA, seed=0))
        ref_params = S.split_model(random_model(LLAMA, seed=1))[1]
        yield graphdef, params, rest, ref_params


@pytest.fixture(scope="module")
def batches():
    pairs = synthetic_pairs(12, seed=5)
    idx = [4, 0, 7, 11, 2, -1, 9, 5]
    spec = PackSpec(seq_len=32, rows=6, groups=2)
    return pairs, pair_batch(pairs, idx, seq_len=20, batch_size=8), pack_pairs(pairs, idx, spec)


def test_packed_logprobs_equal_padded(llama, batches):
    graphdef, params, rest, _ = llama
    _, padded, packed = batches
    assert efficiency(packed) > (np.asarray(padded.segment_ids) != 0).mean()  # fewer slots for the same tokens
    got = jax.jit(lambda p, b: S.packed_pair_logps(graphdef, p, rest, b, num_segments=b.num_segments, **CHUNKS))(
        params, packed)
    want = jax.jit(lambda p, b: S.pair_logps(graphdef, p, rest, b, **CHUNKS))(params, padded)
    # two layouts of the same sums of negative token log-probs: 2γ of the row's rounding chain (tolerances.py)
    np.testing.assert_allclose(got[0], want[0], rtol=relative_tol(transformer_chain_length(LLAMA, 32)), atol=0)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(S.pair_counts(packed), want[1])
    assert float(np.abs(got[0][5]).sum()) == 0.0  # the padding pair


def test_chosen_and_rejected_never_attend_to_each_other(llama):
    """Rewriting one segment's tokens changes that sequence's log-prob and no other one, for a row that
    holds chosen and rejected of two pairs one after the other (in-pair and cross-pair neighbours)."""
    graphdef, params, rest, _ = llama
    rng = np.random.default_rng(6)
    tok = lambda n: rng.integers(3, 128, n).astype(np.int32)  # noqa: E731
    pairs = TokenizedPairs(prompt=[tok(6), tok(2)], chosen=[tok(8), tok(1)], rejected=[tok(6), tok(1)],
                           row=np.array([0, 1]), ids=["a", "b"], votes=np.ones(2, np.float32), tie=np.zeros(2, bool),
                           pad_id=0, stats=TokenizeStats())
    packed = pack_pairs(pairs, [0, 1], PackSpec(seq_len=32, rows=2))
    seg = np.asarray(packed.segment_ids)
    assert sorted(set(seg[0].tolist())) == [1, 2, 3, 4] and not seg[1].any()  # all four sequences fill row 0
    fn = jax.jit(lambda b: S.packed_pair_logps(graphdef, params, rest, b, num_segments=b.num_segments, **CHUNKS)[0])
    base = np.asarray(fn(packed))
    for p in range(2):
        for side in range(2):
            sid = packed.pair_segments[p, side]
            ids = np.asarray(packed.input_ids).copy()
            ids[seg == sid] = (ids[seg == sid] + 17) % 125 + 3  # rewrite that whole segment
            out = np.asarray(fn(packed.replace(input_ids=ids)))
            changed = np.zeros_like(base, bool)
            changed[p, side] = True
            np.testing.assert_array_equal(out[~changed], base[~changed])  # every other sequence: bit-identical
            assert abs(out[p, side] - base[p, side]) > 1e-3


def _sgd():
    return optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, clip_norm=None), 10)[0]


def _step(llama, batch, *, micro=1, reference="live", ref_logps=None):
    graphdef, params, rest, ref_params = llama
    opt = _sgd()
    comp = losses.compose([{"name": "sigmoid", "beta": 0.5}, {"name": "sft", "weight": 0.3}])
    fn = jax.jit(S.make_preference_step(graphdef, rest, opt, comp, reference=reference, micro_batches=micro,
                                        **CHUNKS))
    state = S.init_state(params, opt, 0)
    new, metrics = fn(state, ref_params if reference == "live" else None, batch, ref_logps)
    return jax.tree.map(np.asarray, new.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def padded_step(llama, batches):
    with fast_compile():
        return _step(llama, batches[1])


_ROWS: dict = {}


def _row_grads_and_reference(llama, padded):
    """``([B_valid, 2] ‖∇θ ℓ‖ per row, mean |r_c| + mean |r_r|)`` of the valid pairs (computed once)."""
    if "rows" not in _ROWS:
        graphdef, params, rest, ref_params = llama
        sums = lambda p: S.pair_logps(graphdef, p, rest, padded, **CHUNKS)[0]
        keep = np.asarray(padded.example_mask, bool)
        with fast_compile():
            jac = jax.tree.leaves(jax.jit(jax.jacrev(sums))(params))
            ref = np.abs(np.asarray(jax.jit(sums)(ref_params)))[keep]
        norms = np.linalg.norm(np.concatenate([np.asarray(x).reshape(*keep.shape, 2, -1) for x in jac], -1), axis=-1)
        _ROWS["rows"] = (norms[keep], float(ref.mean(0).sum()))
    return _ROWS["rows"]


@pytest.mark.parametrize("micro,reference", [(1, "live"), (2, "live"), (2, "precomputed")])
def test_packed_loss_and_gradients_equal_padded(llama, batches, padded_step, micro, reference):
    """DPO sigmoid + SFT (NLL) with a live reference that differs from the policy: same loss, metrics
    and SGD update (= gradients), also with 2 micro-batches and precomputed reference log-probs."""
    graphdef, _, rest, ref_params = llama
    _, padded, packed = batches
    ref_logps = None
    if reference == "precomputed":
        ref_logps = jax.jit(lambda p, b: S.pair_logps(graphdef, p, rest, b, **CHUNKS)[0])(ref_params, padded)
    with fast_compile():
        params, metrics = _step(llama, packed, micro=micro, reference=reference, ref_logps=ref_logps)
    want_params, want = padded_step
    assert abs(want["loss"] - np.log(2)) > 1e-3  # the reference really differs from the policy
    # worst-case rounding bounds of two layouts of the same step (jaxpref.testing.tolerances.dpo_step_bounds),
    # with the rows' log-prob gradients and the reference's magnitude from the padded batch
    rows, ref_abs = _row_grads_and_reference(llama, padded)
    bounds = dpo_step_bounds(LLAMA, packed.input_ids.shape[-1], want, row_grad_norms=rows,
                             reference_abs=ref_abs, beta=0.5, sft_weight=0.3,
                             sft_tokens=float(np.asarray(S.pair_counts(padded))[:, 0].sum()))
    assert_same_sgd_step(params, metrics, want_params, want, bounds, lr=1.0)
    assert metrics["pairs"] == 7 and metrics["tokens"] == want["tokens"]


def test_micro_batches_must_divide_groups(llama, batches):
    graphdef, params, rest, ref_params = llama
    opt = _sgd()
    step = S.make_preference_step(graphdef, rest, opt, losses.compose([{"name": "sigmoid"}]), micro_batches=4,
                                  **CHUNKS)
    with pytest.raises(ValueError, match="must divide the packed batch's groups"):
        jax.eval_shape(step, S.init_state(params, opt, 0), ref_params, batches[2], None)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hh(shared_data):
    return shared_data / "hh_rlhf_helpful_base_test_2k.jsonl"


COMMON = ["model.source=preset:tiny_llama", "model.tokenizer=builtin", "model.overrides={vocab_size: 512}",
          "data.limit=40", "data.max_length=128", "data.buckets=[128]", "train.batch_size=8",
          "logging.progress=false", "logging.tensorboard=false", "train.seq_chunk=32", "train.vocab_chunk=256",
          "checkpoint.every=0", "loss=[{name: sigmoid, hparams: {beta: 0.1}}]", "optim.lr=1e-3"]


def test_train_preference_with_packing(tmp_path, hh):
    cfg = load_config(RunConfig, None, [f"run_dir={tmp_path / 'packed'}", f"data.train={hh}", *COMMON,
                                        "data.packing=true", "train.steps=3", "train.micro_batches=2"])
    summary = run_training(cfg, kind="preference")
    lines = [json.loads(x) for x in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and summary["steps"] == 3
    first = lines[0]  # policy == reference at step 0: ln 2 up to the rounding bound (tolerances.dpo_ln2_tol)
    tol = dpo_ln2_tol(models.presets.tiny_llama(vocab_size=512), 128, first["logps/chosen"], first["logps/rejected"],
                      beta=0.1, n_pairs=8)
    assert first["loss"] == pytest.approx(np.log(2), abs=tol)
    assert all(np.isfinite(m["loss"]) and m["nonfinite"] == 0 for m in lines)
    assert all(6 <= m["pairs"] <= 8 for m in lines)
    assert lines[-1]["param_norm"] != lines[0]["param_norm"]


def test_packing_config_errors(tmp_path, hh):
    base = [f"data.train={hh}", *COMMON, "data.packing=true"]
    with pytest.raises(RunError, match="does not apply to sft runs"):
        run_training(load_config(RunConfig, None, [f"run_dir={tmp_path / 'a'}", *base]), kind="sft")
    with pytest.raises(RunError, match="data.pack_rows=3 must be 0"):
        run_training(load_config(RunConfig, None, [f"run_dir={tmp_path / 'b'}", *base, "data.pack_rows=3",
                                                   "train.micro_batches=2"]))
