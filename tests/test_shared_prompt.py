"""Shared-prompt pairs (``data.share_prompt``): one ``[prompt | chosen | rejected]`` row per pair.

The oracle is always the separate layout (chosen and rejected as two sequences): the mask rule against a
hand-written matrix, attention on a shared row against attention on the two separate rows it stands for,
``blocked`` against ``xla`` with branch ids (values, gradients, tile skipping), and on a tiny random Llama
the per-pair log-probs, loss and SGD update of the padded ``[2B, T]`` path (packed and unpacked shared
rows, both backends, micro-batches, precomputed reference), plus isolation of the rejected branch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_packing import CHUNKS, LLAMA, _row_grads_and_reference, _step, synthetic_pairs

from jaxpref.data import BatchDataset, pair_batch
from jaxpref.data.packing import PackSpec, item_lengths, pack_pairs, plan_groups, shared_lengths, shared_pair_batch
from jaxpref.models.attention import MaskSpec, blocked, xla
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tolerances import assert_same_sgd_step, dpo_step_bounds, relative_tol, transformer_chain_length
from jaxpref.training import step as S

EPS32 = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------------------------------- the mask


def _row(p: int, c: int, r: int, pad: int = 0, seg: int = 1):
    """Segment, position and branch ids of one shared row ``[p prompt | c chosen | r rejected | pad]``."""
    segs = np.r_[np.full(p + c + r, seg), np.zeros(pad)].astype(np.int32)
    pos = np.r_[np.arange(p + c), p + np.arange(r), np.zeros(pad)].astype(np.int32)
    br = np.r_[np.zeros(p), np.ones(c), np.full(r, 2), np.zeros(pad)].astype(np.int32)
    return segs, pos, br


def test_mask_rule_of_a_shared_row():
    seg, pos, br = _row(2, 2, 3, pad=1)
    spec = MaskSpec.self_attention(seg[None], pos[None], br[None])
    got = np.asarray(xla.dense_mask(spec))[0, 0].astype(int)
    want = np.array([  # keys: P P C C R R R pad
        [1, 0, 0, 0, 0, 0, 0, 0],  # prompt 0
        [1, 1, 0, 0, 0, 0, 0, 0],  # prompt 1
        [1, 1, 1, 0, 0, 0, 0, 0],  # chosen 0 (position 2)
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen 1
        [1, 1, 0, 0, 1, 0, 0, 0],  # rejected 0 (position 2): the prompt and itself, never chosen
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],  # padding sees nothing
    ])
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="both or neither"):
        MaskSpec(spec.q_segment_ids, spec.q_positions, spec.kv_segment_ids, spec.kv_positions,
                 q_branch_ids=spec.q_branch_ids).validate((1, 8, 2, 4), (1, 8, 2, 4))


# ------------------------------------------------------------------------------------------- attention

LAYOUT = [(3, 16, 16), (5, 4, 6), (1, 3, 2)]  # (prompt, chosen, rejected) of the pairs packed into row 0


def _shared_rows():
    """Two rows: row 0 packs the LAYOUT pairs (segments 1..3) + padding, row 1 holds one pair."""
    parts = [_row(*x, seg=i + 1) for i, x in enumerate(LAYOUT)]
    t = sum(sum(x) for x in LAYOUT) + 3
    rows = [np.concatenate([p[j] for p in parts] + [np.zeros(3, np.int32)]) for j in range(3)]
    other = _row(2, 3, 3, pad=t - 8, seg=1)  # inside the first 8-token tile
    return [np.stack([a, b]) for a, b in zip(rows, other)]  # seg, pos, branch: [2, T]


def _separate_index(seg, br):
    """For each (row, segment): the shared-row columns of its [prompt | chosen] and [prompt | rejected]."""
    out = []
    for b in range(seg.shape[0]):
        for s in sorted(set(seg[b].tolist()) - {0}):
            cols = np.flatnonzero(seg[b] == s)
            prompt = cols[br[b, cols] == 0]
            for side in (1, 2):
                out.append((b, np.r_[prompt, cols[br[b, cols] == side]], side))
    return out


def _qkv(b, t, h=4, kv=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
            ((b, t, h, hd), (b, t, kv, hd), (b, t, kv, hd), (b, t, h, hd))]


def _tol(ref, n):
    """Reordered float32 sums of n terms (as tests/test_attention.py): 2 n eps max|ref|."""
    return 2 * n * EPS32 * float(np.max(np.abs(ref)))


def _run(fn, q, k, v, w, seg, pos, br):
    """(out, dq, dk, dv) of ``fn`` on shared rows with output cotangent ``w``."""
    spec = MaskSpec.self_attention(seg, pos, br)
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, spec, scale=0.35), q, k, v)
    return (out, *vjp(w))


def _small_blocked(q, k, v, spec, scale):
    return blocked.attend(q, k, v, spec, scale=scale, block_q=8, block_kv=8)


run_xla = jax.jit(lambda *a: _run(xla.attend, *a))
run_blocked = jax.jit(lambda *a: _run(_small_blocked, *a))


@pytest.fixture(autouse=True, scope="module")
def _fast():
    with fast_compile():
        yield


def test_shared_row_attention_equals_the_separate_rows():
    """xla on shared rows == xla on the separate [prompt | response] rows they stand for: the outputs of every
    token, and the gradients w.r.t. the shared q, k, v (prompt keys collect the cotangents of both branches)."""
    seg, pos, br = _shared_rows()
    b, t = seg.shape
    q, k, v, w = _qkv(b, t)
    index = _separate_index(seg, br)
    n = max(len(cols) for _, cols, _ in index)
    rows = np.array([r for r, _, _ in index])
    cols = np.stack([np.r_[c, np.zeros(n - len(c), int)] for _, c, _ in index])
    valid = np.stack([np.arange(n) < len(c) for _, c, _ in index])
    # the prompt's outputs enter the loss once (from its chosen row); both rows' response outputs enter
    keep = valid & np.stack([(side == 1) | (br[r, c] != 0) for (r, _, side), c in zip(index, cols)])
    sep_seg = jnp.asarray(valid.astype(np.int32))
    sep_pos = jnp.asarray(np.where(valid, pos[rows[:, None], cols], 0))
    sep_spec = MaskSpec.self_attention(sep_seg, sep_pos)
    gather = lambda x: x[rows[:, None], cols]  # noqa: E731

    def separate(q, k, v):
        out = xla.attend(gather(q), gather(k), gather(v), sep_spec, scale=0.35)
        return jnp.sum(jnp.where(keep[..., None, None], out * gather(w), 0.0)), out

    (_, sep_out), sep_grads = jax.jit(jax.value_and_grad(separate, (0, 1, 2), has_aux=True))(q, k, v)
    out, *grads = run_xla(q, k, v, w, seg, pos, br)
    got = np.asarray(out)[rows[:, None], cols][valid]
    np.testing.assert_allclose(got, np.asarray(sep_out)[valid], rtol=0, atol=_tol(sep_out, t))
    for g, r in zip(grads, sep_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=_tol(r, 2 * t))


def test_blocked_equals_xla_with_branches_and_skips_dead_branch_tiles():
    seg, pos, br = _shared_rows()
    b, t = seg.shape
    q, k, v, w = _qkv(b, t, seed=1)
    spec = MaskSpec.self_attention(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(br))
    for g, r in zip(run_blocked(q, k, v, w, seg, pos, br), run_xla(q, k, v, w, seg, pos, br)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=_tol(r, t))
    # the tile table: never skips a tile with a visible pair, and skips the chosen-only key tile [8, 16) for the
    # rejected-only query tile [24, 32) of pair 1 (live by segment and position, dead by branch)
    bq = 8
    pad = lambda x: jnp.pad(jnp.asarray(x), [(0, 0), (0, -t % bq)])  # noqa: E731
    static = blocked._Static(True, None, None, 1.0, bq, bq)
    table = jax.jit(blocked.live_tiles, static_argnums=0)
    live = np.asarray(table(static, pad(seg), pad(pos), pad(seg), pad(pos), pad(br), pad(br)))
    without = np.asarray(table(static, pad(seg), pad(pos), pad(seg), pad(pos)))
    m = np.pad(np.asarray(xla.dense_mask(spec))[:, 0], [(0, 0), (0, -t % bq), (0, -t % bq)])
    brute = m.reshape(b, m.shape[1] // bq, bq, m.shape[2] // bq, bq).any(axis=(0, 2, 4))
    assert not (brute & ~live).any(), "a tile with visible pairs was skipped"
    assert without[3, 1] and not live[3, 1] and not brute[3, 1]


# ------------------------------------------------------------------------------------- tiny random Llama

IDX = [4, 0, 7, 11, 2, -1, 9, 5]


@pytest.fixture(scope="module")
def llama():
    graphdef, params, rest = S.split_model(random_model(LLAMA, seed=0))
    ref_params = S.split_model(random_model(LLAMA, seed=1))[1]
    return graphdef, params, rest, ref_params


@pytest.fixture(scope="module")
def blocked_llama(llama):
    """The same weights under attention=blocked with 8 x 8 tiles (several tiles per 32-token row)."""
    old = blocked.DEFAULT_BLOCK_Q, blocked.DEFAULT_BLOCK_KV
    blocked.DEFAULT_BLOCK_Q = blocked.DEFAULT_BLOCK_KV = 8
    try:
        graphdef = S.split_model(random_model(dataclasses.replace(LLAMA, attention="blocked"), seed=0))[0]
        yield graphdef, *llama[1:]
    finally:
        blocked.DEFAULT_BLOCK_Q, blocked.DEFAULT_BLOCK_KV = old


@pytest.fixture(scope="module")
def batches():
    pairs = synthetic_pairs(12, seed=5)
    padded = pair_batch(pairs, IDX, seq_len=20, batch_size=8)
    packed = pack_pairs(pairs, IDX, PackSpec(seq_len=32, rows=6, groups=2, share_prompt=True))
    unpacked = shared_pair_batch(pairs, IDX, 32)
    return pairs, padded, packed, unpacked


@jax.jit
def _counts(batch):
    return S.pair_counts(batch)


_LOGPS: dict = {}


def _logps(model, batch):
    """``(sums, counts)`` [B, 2] of ``batch``, through one jitted function per model structure."""
    graphdef, params, rest, _ = model
    if graphdef not in _LOGPS:
        _LOGPS[graphdef] = jax.jit(lambda p, b: S.batch_pair_logps(graphdef, p, rest, b, **CHUNKS))
    return jax.device_get(_LOGPS[graphdef](params, batch))


def test_shared_batches_layout(batches):
    pairs, padded, packed, unpacked = batches
    for batch in (packed, unpacked):
        seg = np.asarray(batch.segment_ids)
        assert (seg != 0).sum() == shared_lengths(pairs)[[i for i in IDX if i >= 0]].sum()  # each prompt once
        assert len(set(seg[seg != 0].tolist())) == 7  # one segment per real pair
        np.testing.assert_array_equal(np.asarray(_counts(batch)), np.asarray(_counts(padded)))
    # packed: fewer rows than pairs, the packed plan uses the shared row as the item
    assert packed.input_ids.shape == (6, 32) and item_lengths(pairs, PackSpec(32, 6, share_prompt=True)).shape[1] == 1
    plan, left = plan_groups(shared_lengths(pairs)[:, None], np.arange(12), PackSpec(32, 2, share_prompt=True),
                             pairs_per_group=4, num_groups=6)
    assert left == 0 and sorted(plan[plan >= 0].tolist()) == list(range(12))


@pytest.mark.parametrize("backend,layout", [("xla", "unpacked"), ("blocked", "packed")])  # each backend, each layout
def test_shared_logprobs_equal_separate(llama, blocked_llama, batches, backend, layout):
    _, padded, packed, unpacked = batches
    model = llama if backend == "xla" else blocked_llama
    got = _logps(model, packed if layout == "packed" else unpacked)
    want = _logps(llama, padded)
    # the same sums of the same negative token log-probs in two layouts (masked attention entries are exact
    # zeros): 2γ of one token's rounding chain, relative (jaxpref.testing.tolerances), as for packing
    np.testing.assert_allclose(got[0], want[0], rtol=relative_tol(transformer_chain_length(LLAMA, 32)), atol=0)
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][5].tolist() == [0.0, 0.0]  # the padding pair


def test_rejected_never_sees_chosen(blocked_llama, batches):
    """Rewriting a pair's chosen tokens leaves every rejected log-prob (and every other pair's) bit-identical;
    rewriting its prompt changes both of its sides."""
    _, _, packed, _ = batches
    fn = lambda b: _logps(blocked_llama, b)[0]  # noqa: E731 (the compiled function of the equality test)
    base = np.asarray(fn(packed))
    seg, br, ids = (np.asarray(x) for x in (packed.segment_ids, packed.branch_ids, packed.input_ids))
    for p in (0, 3):
        s = p + 1
        for branch, changed in ((1, [(p, 0)]), (2, [(p, 1)]), (0, [(p, 0), (p, 1)])):
            new = ids.copy()
            where = (seg == s) & (br == branch)
            if branch == 0:
                where &= np.arange(ids.shape[1]) > np.argmax(seg == s, axis=1)[:, None]  # keep the first token
            new[where] = (new[where] + 17) % 125 + 3
            out = np.asarray(fn(packed.replace(input_ids=new)))
            mask = np.zeros_like(base, bool)
            for c in changed:
                mask[c] = True
            np.testing.assert_array_equal(out[~mask], base[~mask])
            assert all(abs(out[c] - base[c]) > 1e-3 for c in changed)


@pytest.fixture(scope="module")
def padded_step(llama, batches):
    return _step(llama, batches[1])


def test_shared_loss_and_gradients_equal_separate(llama, batches, padded_step):
    """DPO sigmoid + SFT on packed shared rows, two micro-batches, precomputed reference log-probs: same loss,
    metrics and SGD update (= gradients) as the padded [2B, T] step with a live reference (bounds:
    jaxpref.testing.tolerances.dpo_step_bounds). The padded step and the row gradients are the programs of
    tests/test_packing.py (loaded from the run's compilation cache when that file ran first)."""
    _, padded, packed, _ = batches
    ref_logps = _logps((llama[0], llama[3], llama[2], None), padded)[0]  # the reference's [B, 2] log-probs
    params, metrics = _step(llama, packed, micro=2, reference="precomputed", ref_logps=ref_logps)
    want_params, want = padded_step
    rows, ref_abs = _row_grads_and_reference(llama, padded)
    bounds = dpo_step_bounds(LLAMA, 32, want, row_grad_norms=rows, reference_abs=ref_abs, beta=0.5, sft_weight=0.3,
                             sft_tokens=float(np.asarray(S.pair_counts(padded))[:, 0].sum()))
    assert_same_sgd_step(params, metrics, want_params, want, bounds, lr=1.0)
    assert metrics["pairs"] == 7 and metrics["tokens"] < want["tokens"]  # each prompt computed once


def test_shared_iterator_unpacked_and_packed():
    pairs = synthetic_pairs(20, seed=2)
    ds = BatchDataset(pairs, global_batch_size=4, buckets=(16, 24), share_prompt=True)
    assert ds.shared_buckets == (16, 24, 48)  # doubled until the longest shared row (<= 32) fits
    batch = ds[0]
    assert batch.branch_ids is not None and batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] in (16, 24, 48)
    packed = BatchDataset(pairs, global_batch_size=4, packing=PackSpec(32, 4, groups=2, share_prompt=True))
    assert packed[1].branch_ids is not None and packed[1].input_ids.shape == (4, 32)
    assert packed.fingerprint != BatchDataset(pairs, global_batch_size=4, packing=PackSpec(32, 4, groups=2)).fingerprint


def test_run_wiring_and_config_errors(tmp_path):
    """``data.share_prompt`` in a run: packed rows long enough for the longest shared row, the unpacked
    iterator's bucket ladder, and one-line errors where it does not apply (no model, nothing compiles)."""
    from jaxpref.config import RunConfig, load_config
    from jaxpref.parallel import MeshConfig, make_mesh
    from jaxpref.training import loop

    pairs = synthetic_pairs(40, seed=3, max_prompt=20, max_response=24)  # shared rows up to 68 > max_length
    base = ["data.train=x.jsonl", "data.max_length=48", "data.buckets=[16, 32, 48]", "train.batch_size=8",
            "data.share_prompt=true"]
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    packed_cfg = load_config(RunConfig, None, [*base, "data.packing=true", "train.micro_batches=2"])
    spec = loop.pack_spec(packed_cfg, pairs, mesh)
    assert spec.share_prompt and spec.seq_len == 96 and spec.groups == 2  # 48 doubled: holds rows of <= 68
    it = loop.open_iterator(packed_cfg, pairs, packing=spec, share_prompt=True)
    batch = next(it)
    assert batch.branch_ids is not None and batch.input_ids.shape == (spec.rows, 96)
    cfg = load_config(RunConfig, None, base)
    it = loop.open_iterator(cfg, pairs, share_prompt=True)
    assert loop.batch_shapes(it.dataset) == [(8, 16), (8, 32), (8, 48), (8, 96)]
    assert next(it).input_ids.shape[1] in (16, 32, 48, 96)
    with pytest.raises(loop.RunError, match="supported by train.preference only"):
        loop.open_iterator(cfg, pairs)
    with pytest.raises(loop.RunError, match="does not apply to sft runs"):
        loop._check_packing(cfg, "sft", ())
    with pytest.raises(loop.RunError, match="reference samples"):
        loop._check_packing(cfg, "preference", ("typo",))
