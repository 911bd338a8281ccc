"""Attention backends (``jaxpref.models.attention``): ``blocked`` against the dense ``xla`` oracle.

Kernel cases run with small tiles (8 x 16) so that T is not a multiple of the tile, several
tiles are dead (skipped) and several are partly masked. Tolerances follow from float32
rounding of a length-n reduction (module constants below); bf16 ones from bf16's unit roundoff.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.config import ConfigError, RunConfig, load_config
from jaxpref.models import presets
from jaxpref.models.attention import MaskSpec, attend, blocked, cudnn, pallas_gpu, resolve, select, splash, xla
from jaxpref.models.attention.xla import dense_mask
from jaxpref.models.transformer import segment_positions
from jaxpref.testing.models import fast_compile, random_model

EPS32 = float(np.finfo(np.float32).eps)
BF16_U = 2.0 ** -8  # bf16 unit roundoff: 8 significand bits, round-to-nearest relative error <= 2^-8


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


def _tol(ref: np.ndarray, n: int) -> float:
    """Reordering a sum of n float32 terms moves it by at most ~n * eps * max|term| (Higham, Thm 4.4,
    first order); the terms of attention outputs and gradients are bounded by the result scale
    max|ref| times a small factor, so we allow 2 n eps max|ref|."""
    return 2 * n * EPS32 * float(np.max(np.abs(ref)))


def _qkv(b, t, s, h, kv, hd, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal((b, t, h, hd))
    k = scale * rng.standard_normal((b, s, kv, hd))
    v = rng.standard_normal((b, s, kv, hd))
    w = rng.standard_normal((b, t, h, hd))  # output cotangent
    return (jnp.asarray(x, jnp.float32) for x in (q, k, v, w))


def _self_spec(seg, **flags):
    seg = jnp.asarray(seg, jnp.int32)
    return MaskSpec.self_attention(seg, segment_positions(seg), **flags)


def _segments(kind: str, b: int, t: int) -> np.ndarray:
    seg = np.ones((b, t), np.int32)
    if kind == "right_pad":
        seg[0, t - 7:] = 0
        seg[1, t // 2:] = 0
    elif kind == "left_pad":
        seg[0, :9] = 0
        seg[1, :t - 3] = 0
    elif kind == "packed":  # three documents + padding in row 0, two + padding in row 1
        seg[0] = np.repeat([1, 2, 3, 0], [10, 13, t - 28, 5])
        seg[1] = np.repeat([1, 2, 0], [t - 17, 12, 5])
    elif kind == "pad_rows":  # row 1 is all padding (a batch-padding row)
        seg[0, t - 11:] = 0
        seg[1] = 0
    return seg


# name: (B, T, H, KV, hd, segments, flags, score scale)
CASES = {
    "odd_T_right_pad_gqa4": (2, 37, 8, 2, 8, "right_pad", {}, 1.0),
    "left_pad_mqa_window": (2, 29, 4, 1, 8, "left_pad", {"sliding_window": 9}, 1.0),
    "packed_window": (2, 45, 4, 2, 8, "packed", {"sliding_window": 6}, 1.0),
    "packed_softcap": (2, 45, 4, 2, 8, "packed", {"softcap": 3.0}, 3.0),  # scores ~ +-9: the cap bites
    "pad_rows_bidirectional": (2, 33, 8, 2, 8, "pad_rows", {"causal": False}, 1.0),
}


def _value_and_grads(fn, q, k, v, w, spec):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, spec, scale=0.35), q, k, v)
    return (out, *vjp(w))


def _blocked_small(q, k, v, spec, *, scale):
    return blocked.attend(q, k, v, spec, scale=scale, block_q=8, block_kv=16)


run_xla = jax.jit(lambda q, k, v, w, spec: _value_and_grads(xla.attend, q, k, v, w, spec))
run_blocked = jax.jit(lambda q, k, v, w, spec: _value_and_grads(_blocked_small, q, k, v, w, spec))


@pytest.mark.parametrize("case", CASES)
def test_blocked_equals_xla_values_and_grads(case):
    b, t, h, kvh, hd, kind, flags, scale = CASES[case]
    q, k, v, w = _qkv(b, t, t, h, kvh, hd, seed=len(case), scale=scale)
    spec = _self_spec(_segments(kind, b, t), **flags)
    want = [np.asarray(x) for x in run_xla(q, k, v, w, spec)]
    got = [np.asarray(x) for x in run_blocked(q, k, v, w, spec)]
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, r, rtol=0, atol=_tol(r, t), err_msg=f"{case}: {name}")
    seen = np.asarray(dense_mask(spec)).any(-1)[:, 0]  # [B, T] queries that see some key
    assert (~seen).any()  # every case has padding queries
    np.testing.assert_array_equal(got[0][~seen], 0.0)  # pad queries: exact zeros, no NaN
    np.testing.assert_array_equal(got[1][~seen], 0.0)
    assert np.abs(want[0]).max() > 0.3 and np.abs(want[2]).max() > 0.3  # non-trivial comparison


def test_blocked_cross_attention_to_a_cache_layout():
    """Queries [B, 5] against 23 cache slots with their own segments/positions (left-padded prefill + writes)."""
    q, k, v, w = _qkv(2, 5, 23, 4, 2, 8, seed=7)
    kv_seg = np.zeros((2, 23), np.int32)
    kv_seg[0, 3:18], kv_seg[1, 10:18] = 1, 1
    kv_pos = np.maximum(np.cumsum(kv_seg, 1) - 1, 0).astype(np.int32)
    q_seg = np.ones((2, 5), np.int32)
    q_seg[1, 4] = 0
    q_pos = (kv_pos[:, 13:18]).astype(np.int32)  # the last five written slots
    spec = MaskSpec(jnp.asarray(q_seg), jnp.asarray(q_pos), jnp.asarray(kv_seg), jnp.asarray(kv_pos),
                    sliding_window=6)
    want = run_xla(q, k, v, w, spec)
    got = run_blocked(q, k, v, w, spec)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=_tol(np.asarray(r), 23))


def _brute_live(spec: MaskSpec, bq: int, bk: int) -> np.ndarray:
    """Tiles with at least one visible pair in some row, from the dense mask."""
    m = np.asarray(dense_mask(spec))[:, 0]
    b, t, s = m.shape
    m = np.pad(m, [(0, 0), (0, -t % bq), (0, -s % bk)])
    return m.reshape(b, m.shape[1] // bq, bq, m.shape[2] // bk, bk).any(axis=(0, 2, 4))


@pytest.mark.parametrize("blocks", [(8, 16), (5, 7)])  # 5 x 7: tile edges at every offset from the window edge
@pytest.mark.parametrize("kind,flags", [("right_pad", {}), ("left_pad", {"sliding_window": 9}),
                                        ("packed", {}), ("packed", {"sliding_window": 6})])
def test_tile_skipping_is_exact_or_conservative(kind, flags, blocks):
    """Never skips a tile with a visible pair; skips the causal upper triangle and out-of-window tiles."""
    t, (bq, bk) = 45, blocks
    seg = np.stack([_segments(kind, 2, t)[0]] * 2)  # one layout in both rows: skipping is per layout
    spec = _self_spec(seg, **flags)
    pad = lambda x, b: jnp.pad(x, [(0, 0), (0, -t % b)])  # noqa: E731
    static = blocked._Static(True, flags.get("sliding_window"), None, 1.0, bq, bk)
    live = np.asarray(jax.jit(blocked.live_tiles, static_argnums=0)(
        static, pad(spec.q_segment_ids, bq), pad(spec.q_positions, bq), pad(spec.kv_segment_ids, bk),
        pad(spec.kv_positions, bk)))
    want = _brute_live(spec, bq, bk)
    assert not (want & ~live).any(), "a tile with visible pairs was skipped"
    assert live.sum() < live.size  # something is skipped
    if kind == "right_pad" or "sliding_window" in flags:
        np.testing.assert_array_equal(live, want)  # single documents per tile: the bounds are exact


def test_blocked_bf16_within_bf16_tolerance():
    """bf16 inputs; reference = xla in float32 on the same (bf16-rounded) inputs.

    blocked rounds the probabilities to bf16 before ``P V`` (relative error <= u = 2^-8 each, so
    the weighted sum moves by <= u * max|v|) and rounds the output once (<= u * |out|): the bound is
    u * (max|v| + max|out|). Gradients pass through two more bf16 roundings (dS and the cast of
    the f32 accumulators): their norm-wise relative error is a few u; we allow 4u.
    """
    q, k, v, w = _qkv(2, 37, 37, 8, 2, 16, seed=3)
    spec = _self_spec(_segments("right_pad", 2, 37), sliding_window=20)
    q16, k16, v16, w16 = (x.astype(jnp.bfloat16) for x in (q, k, v, w))
    ref = [np.asarray(x, np.float32) for x in run_xla(*(x.astype(jnp.float32) for x in (q16, k16, v16, w16)), spec)]
    got = [np.asarray(x.astype(jnp.float32)) for x in run_blocked(q16, k16, v16, w16, spec)]
    assert all(x.dtype == jnp.bfloat16 for x in run_blocked(q16, k16, v16, w16, spec))
    vmax = float(jnp.max(jnp.abs(v16.astype(jnp.float32))))
    np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=BF16_U * (vmax + np.abs(ref[0]).max()))
    for name, g, r in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        rel = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert rel < 4 * BF16_U, (name, rel)


# ------------------------------------------------------------------------------ model level


# GQA, window and MQA; every family (gpt2 / gpt_neox too) is checked against transformers with
# attention=blocked in test_hf_io.py.
FAMILIES = ("tiny_llama", "tiny_mistral", "tiny_gemma")


@pytest.mark.parametrize("name", FAMILIES)
def test_model_logits_blocked_equal_xla(name, monkeypatch):
    """Packed + right-padded rows, T = 40 with 16-token tiles (several tiles, some skipped)."""
    monkeypatch.setattr(blocked, "DEFAULT_BLOCK_Q", 16)
    monkeypatch.setattr(blocked, "DEFAULT_BLOCK_KV", 16)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, (2, 40)).astype(np.int32)
    seg = np.stack([np.repeat([1, 2, 0], [17, 19, 4]), np.repeat([1, 0], [31, 9])]).astype(np.int32)
    logits = {}
    for backend in ("xla", "blocked"):
        model = random_model(presets.get_preset(name, attention=backend))
        logits[backend] = np.asarray(nnx.jit(lambda m, i, s: m(i, segment_ids=s, return_logits=True).logits)(
            model, ids, seg))
    valid = seg > 0
    scale = np.abs(logits["xla"][valid]).max()
    assert scale > 0.5
    # each layer's attention output moves by a length-40 reduction's rounding; the rest of the net is the same
    tol = max(1e-5, 2 * 40 * EPS32 * scale)
    np.testing.assert_allclose(logits["blocked"][valid], logits["xla"][valid], rtol=0, atol=tol)


# ------------------------------------------------------------------------------ memory


def _dpo_step_temp_bytes(attention: str, t: int) -> int:
    """Compiled temp memory of the real preference (DPO, precomputed reference) train step; compile only
    (the benchmark's own function, ``bench/attention_cpu.py``, so test and benchmark measure the same step)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "attention_cpu.py"
    spec = importlib.util.spec_from_file_location("attention_cpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dpo_step_temp_bytes(attention, t)


def test_blocked_train_step_temp_memory_at_8k_is_under_an_eighth_of_xla():
    dense, tiled = _dpo_step_temp_bytes("xla", 8192), _dpo_step_temp_bytes("blocked", 8192)
    # xla holds [2 rows, 2 heads, 8192, 8192] float32 scores (1 GiB each) for the backward
    assert dense >= 2 * 2 * 8192 * 8192 * 4, dense
    assert tiled * 8 <= dense, (tiled, dense)


# ------------------------------------------------------------------------------ selection and config


def _spec_of_len(tq: int, s: int) -> MaskSpec:
    return MaskSpec(jnp.ones((1, tq), jnp.int32), jnp.zeros((1, tq), jnp.int32), jnp.ones((1, s), jnp.int32),
                    jnp.zeros((1, s), jnp.int32))


def test_auto_selection_and_logging(caplog, monkeypatch):
    monkeypatch.setattr(select, "_logged", set())
    n = select.AUTO_BLOCKED_MIN_LEN
    with caplog.at_level(logging.INFO, logger="jaxpref.models.attention.select"):
        assert resolve("auto", _spec_of_len(64, 64)) == "xla"
        assert resolve("auto", _spec_of_len(64, 64)) == "xla"
        assert resolve("auto", _spec_of_len(n, n)) == "blocked"
        assert resolve("auto", _spec_of_len(1, n)) == "xla"  # one-token decode
        assert resolve("blocked", _spec_of_len(1, 64)) == "xla"
        assert resolve("blocked", _spec_of_len(8, 64)) == "blocked"
        assert resolve("xla", _spec_of_len(n, n)) == "xla"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # each distinct choice logged once; explicit choices that run as asked: silent
    assert any("using blocked" in x for x in lines)


def test_attend_matches_backends_through_the_interface():
    q, k, v, _ = _qkv(1, 12, 12, 4, 2, 8)
    spec = _self_spec(np.ones((1, 12), np.int32))
    run = jax.jit(attend, static_argnums=4)
    want = np.asarray(run(q, k, v, spec, "xla"))
    np.testing.assert_allclose(np.asarray(run(q, k, v, spec, "blocked")), want, rtol=0, atol=_tol(want, 12))
    with pytest.raises(ValueError, match="q_segment_ids has shape"):
        attend(q, k, v, _self_spec(np.ones((1, 11), np.int32)), "xla")


@pytest.mark.parametrize("name, why", [("splash", "needs tpu"), ("cudnn", "needs gpu"), ("pallas_gpu", "needs gpu")])
def test_unavailable_backend_is_a_config_error_before_compiling(name, why):
    cfg = presets.tiny_llama(attention=name)
    with pytest.raises(ConfigError, match=f"^model.attention='{name}' {why}, this platform is cpu") as err:
        random_model(cfg)
    assert "\n" not in str(err.value)
    select.check_backend("cudnn", on="gpu")  # the platforms the kernels need accept them
    select.check_backend("pallas_gpu", on="gpu")
    select.check_backend("splash", on="tpu")
    with pytest.raises(ConfigError, match="'cudnn' needs gpu, this platform is tpu; available here: auto, xla, "
                                          "blocked, splash$"):
        select.check_backend("cudnn", on="tpu")


def test_pallas_gpu_kernel_in_interpret_mode_equals_xla_values_and_grads():
    """The Pallas GPU flash kernel (forward and Triton backward), run by Pallas' interpreter on CPU:
    packed segments + padding + a batch-padding row, GQA 4/2, T = 45 (padded to the kernel's block)."""
    b, t, h, kvh, hd = 2, 45, 4, 2, 8
    q, k, v, w = _qkv(b, t, t, h, kvh, hd, seed=3)
    seg = _segments("packed", b, t)
    seg[1, 30:] = 0
    spec = _self_spec(seg)
    kernel = lambda q, k, v, spec, *, scale: pallas_gpu.attend(q, k, v, spec, scale=scale, interpret=True)  # noqa: E731
    got = [np.asarray(x) for x in jax.jit(lambda *a: _value_and_grads(kernel, *a))(q, k, v, w, spec)]
    want = [np.asarray(x) for x in run_xla(q, k, v, w, spec)]
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, r, rtol=0, atol=_tol(r, t), err_msg=name)
    pad = seg == 0
    np.testing.assert_array_equal(got[0][pad], 0.0)
    np.testing.assert_array_equal(got[1][pad], 0.0)


def test_splash_kernel_in_interpret_mode_equals_xla_values_and_grads():
    """The TPU splash kernel (multi-query kernel per KV head), run by Pallas' TPU interpreter on CPU: packed
    segments + padding, sliding window, soft-cap that binds, MQA 2/1, T = 150 (two 128-blocks after padding)."""
    b, t, h, kvh, hd = 2, 150, 2, 1, 8
    q, k, v, w = _qkv(b, t, t, h, kvh, hd, seed=5, scale=3.0)
    seg = np.ones((b, t), np.int32)
    seg[0, 120:] = 0
    seg[1] = np.repeat([1, 2, 3, 0], [50, 40, 50, 10])
    spec = _self_spec(seg, sliding_window=37, softcap=3.0)
    kernel = lambda q, k, v, spec, *, scale: splash.attend(q, k, v, spec, scale=scale, interpret=True)  # noqa: E731
    got = [np.asarray(x) for x in jax.jit(lambda *a: _value_and_grads(kernel, *a))(q, k, v, w, spec)]
    want = [np.asarray(x) for x in run_xla(q, k, v, w, spec)]
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, r, rtol=0, atol=_tol(r, t), err_msg=name)
    np.testing.assert_array_equal(got[0][seg == 0], 0.0)
    assert splash.unsupported(MaskSpec(*(jnp.ones((2, n), jnp.int32) for n in (1, 1, 9, 9))), jnp.float32, 8)


def _padded_spec(t, **flags):
    seg = np.ones((2, t), np.int32)
    seg[1, t // 2:] = 0
    return _self_spec(seg, right_padded=True, **flags)


def test_kernel_limits_name_the_reason():
    bf16 = jnp.bfloat16
    assert cudnn.unsupported(_padded_spec(64), bf16, 64) is None
    assert cudnn.unsupported(_padded_spec(64, sliding_window=8), bf16, 128) is None
    cases = [(_self_spec(_segments("packed", 2, 64)), bf16, 64, "not the right-padded"),
             (_padded_spec(64), jnp.float32, 64, "float32; cuDNN's fused kernel needs bfloat16"),
             (_padded_spec(64, softcap=5.0), bf16, 64, "no logit soft-cap"),
             (_padded_spec(64, causal=False), bf16, 64, "not causal"),
             (_padded_spec(64), bf16, 256, "head_dim 256"),
             (MaskSpec(*(jnp.ones((2, n), jnp.int32) for n in (1, 1, 64, 64)), right_padded=True), bf16, 64,
              "KV-cache")]
    for spec, dtype, hd, why in cases:
        assert why in cudnn.unsupported(spec, dtype, hd), why
    assert pallas_gpu.unsupported(_self_spec(_segments("packed", 2, 64)), jnp.float32, 64) is None
    assert "sliding window" in pallas_gpu.unsupported(_padded_spec(64, sliding_window=8), bf16, 64)
    assert "soft-cap" in pallas_gpu.unsupported(_padded_spec(64, softcap=5.0), bf16, 64)


def test_gpu_resolution_picks_kernels_and_falls_back_with_a_logged_reason(caplog, monkeypatch):
    monkeypatch.setattr(select, "_logged", set())
    monkeypatch.setattr(select, "platform", lambda: "gpu")
    bf16, f32 = jnp.bfloat16, jnp.float32
    packed = _self_spec(_segments("packed", 2, 64))
    with caplog.at_level(logging.INFO, logger="jaxpref.models.attention.select"):
        assert resolve("auto", _padded_spec(64), bf16, 64) == "cudnn"
        assert resolve("auto", _padded_spec(64), f32, 64) == "xla"  # cuDNN is bf16 / f16 only
        assert resolve("auto", _padded_spec(2048), f32, 64) == "blocked"
        assert resolve("auto", packed, bf16, 64) == "xla"
        assert resolve("cudnn", _padded_spec(64), bf16, 64) == "cudnn"  # explicit and servable: silent
        assert resolve("cudnn", packed, bf16, 64) == "xla"
        assert resolve("pallas_gpu", packed, bf16, 64) == "pallas_gpu"
        assert resolve("pallas_gpu", _padded_spec(2048, sliding_window=8), bf16, 64) == "blocked"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5, lines  # f32 and packed under auto log the same choice and reason once
    assert any("cudnn cannot serve it: the mask is not the right-padded" in x for x in lines)
    assert any("pallas_gpu cannot serve it: the Pallas GPU kernel has no sliding window" in x for x in lines)


def test_padded_training_rows_reach_the_length_kernel_and_packed_rows_do_not(monkeypatch):
    """The padded ``[2B, T]`` path promises ``right_padded`` (so ``auto`` can give it to cuDNN on a GPU);
    the packed path does not. A spy stands in for cuDNN (CPU) and delegates to the dense oracle."""
    from jaxpref.data import TokenizedPairs, TokenizeStats, pair_batch
    from jaxpref.data.packing import PackSpec, pack_pairs
    from jaxpref.training import step as S

    seen = []

    def spy(q, k, v, spec, *, scale):
        seen.append(spec.right_padded)
        return xla.attend(q, k, v, spec, scale=scale)

    monkeypatch.setattr(select, "platform", lambda: "gpu")
    monkeypatch.setitem(select.IMPLEMENTATIONS, "cudnn", spy)
    model = random_model(presets.tiny_llama(dtype="bfloat16"))
    graphdef, params, rest = S.split_model(model)
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, 128, n).astype(np.int32)  # noqa: E731
    pairs = TokenizedPairs(prompt=[ids(5), ids(3)], chosen=[ids(4), ids(6)], rejected=[ids(2), ids(5)],
                           row=np.arange(2), ids=["a", "b"], votes=np.ones(2, np.float32), tie=np.zeros(2, bool),
                           pad_id=0, stats=TokenizeStats(n_input=2, n_kept=2))
    S.pair_logps(graphdef, params, rest, pair_batch(pairs, [0, 1], seq_len=16), seq_chunk=8, vocab_chunk=64)
    assert seen == [True] * model.config.num_layers
    seen.clear()
    packed = pack_pairs(pairs, [0, 1], PackSpec(seq_len=16, rows=4))
    S.packed_pair_logps(graphdef, params, rest, packed, num_segments=packed.num_segments, seq_chunk=8,
                        vocab_chunk=64)
    assert seen == []


def test_run_config_attention_field():
    cfg = load_config(RunConfig, None, ["model.attention=blocked"])
    assert cfg.model.model_overrides()["attention"] == "blocked"
    assert "attention" not in load_config(RunConfig, None, []).model.model_overrides()
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(RunConfig, None, ["model.attention=flash"])
    with pytest.raises(ValueError, match="attention='flash'"):
        presets.tiny_llama(attention="flash")
