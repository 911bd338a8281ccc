"""Model behaviour without a reference implementation: RoPE, masks, packing, KV cache, dtypes, remat.

Parity with transformers is in ``test_hf_io.py``; the real pretrained check in ``test_llama2c.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models import KVCache, presets
from jaxpref.models.attention import MaskSpec
from jaxpref.models.attention.xla import dense_mask
from jaxpref.models.layers import apply_rope, rope_sin_cos
from jaxpref.models.transformer import segment_positions
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tolerances import U_BF16, hidden_state_tol, logits_tol, low_precision_stages, reduction_tol

FAMILY_PRESETS = ("tiny_llama", "tiny_mistral", "tiny_gpt2", "tiny_gpt_neox")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def models():
    return {name: random_model(presets.get_preset(name)) for name in FAMILY_PRESETS}


@nnx.jit
def forward(model, ids, segment_ids):
    """(hidden, logits); jitted because op-by-op dispatch compiles every op separately."""
    out = model(ids, segment_ids=segment_ids, return_logits=True)
    return out.hidden, out.logits


def _ids(shape, vocab=128, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, shape).astype(np.int32)


def test_apply_rope_matches_numpy_rotate_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 50, (2, 5))
    inv = 1.0 / 10000 ** (np.arange(0, 4, 2) / 4)  # partial rotary: 4 of 8 dims
    sin, cos = rope_sin_cos(jnp.asarray(pos), jnp.asarray(inv, jnp.float32))
    got = np.asarray(apply_rope(jnp.asarray(x), sin, cos))
    ang = pos[..., None, None] * inv  # [B, T, 1, 2]
    rot, rest = x[..., :4], x[..., 4:]
    half = np.concatenate([-rot[..., 2:], rot[..., :2]], -1)
    want = np.concatenate([rot * np.cos(np.concatenate([ang, ang], -1)) + half * np.sin(np.concatenate([ang, ang], -1)),
                           rest], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.array_equal(got[..., 4:], x[..., 4:])


def test_segment_positions_and_mask():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1]])
    pos = segment_positions(seg)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    mask = np.asarray(dense_mask(MaskSpec.self_attention(seg, pos, sliding_window=2)))[:, 0]
    assert mask.shape == (2, 6, 6)
    np.testing.assert_array_equal(mask[0, 2], [0, 1, 1, 0, 0, 0])  # window 2: itself and one back
    np.testing.assert_array_equal(mask[0, 4], [0, 0, 0, 1, 1, 0])  # second segment only
    assert not mask[0, 5].any() and not mask[1, :2].any()          # padding rows see nothing
    np.testing.assert_array_equal(mask[1, 3], [0, 0, 1, 1, 0, 0])


@pytest.mark.parametrize("name", FAMILY_PRESETS)
def test_packed_segments_equal_separate_runs(models, name):
    """Row 0 packs a (5 tokens) and b (7) + 2 pads; rows 1, 2 hold a and b alone (right-padded)."""
    a, b = _ids(5, seed=1), _ids(7, seed=2)
    ids, seg = np.zeros((3, 14), np.int32), np.zeros((3, 14), np.int32)
    ids[0, :12], seg[0, :12] = np.concatenate([a, b]), [1] * 5 + [2] * 7
    ids[1, :5], seg[1, :5] = a, 1
    ids[2, :7], seg[2, :7] = b, 1
    hidden, logits = forward(models[name], ids, seg)
    # two layouts of the same tokens: norm-wise hidden-state bound of the rounding chain (tolerances.py)
    rel = hidden_state_tol(models[name].config, 14)
    for got, want in ((hidden[0, :5], hidden[1, :5]), (hidden[0, 5:12], hidden[2, :7])):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.all(np.linalg.norm(got - want, axis=-1) <= rel * np.linalg.norm(want, axis=-1))
    assert np.isfinite(np.asarray(logits)).all()  # padding rows stay finite


@pytest.mark.parametrize("name,attention", [("tiny_mistral", None), ("tiny_gpt2", None), ("tiny_mistral", "blocked")])
def test_kv_cache_decode_matches_full_forward(models, name, attention):
    """Left-padded prefill + 4 one-token steps == one full forward of each unpadded sequence.

    With ``attention=blocked`` the prefill and the full forward run the blocked kernel (a cache
    layout: 6 queries over 10 slots) and the one-token steps fall back to xla."""
    model = models[name] if attention is None else random_model(presets.get_preset(name, attention=attention))
    lengths, prompt_len, steps = (6, 3), 6, 4
    full = _ids((2, prompt_len + steps), seed=3)
    full_seg = np.zeros_like(full)
    prompt, seg = np.zeros((2, prompt_len), np.int32), np.zeros((2, prompt_len), np.int32)
    for b, n in enumerate(lengths):  # left padding: row b's prompt is full[b, :n]
        prompt[b, prompt_len - n:], seg[b, prompt_len - n:] = full[b, :n], 1
        full_seg[b, :n + steps] = 1
    want_h, want = forward(model, full, full_seg)  # causal: want[b, j] is the prediction after full[b, :j+1]
    matrix, layout = model.unembedding()
    tol = logits_tol(model.config, prompt_len + steps, want_h, matrix if layout == "dv" else np.asarray(matrix).T)

    @nnx.jit
    def step(model, ids, seg, cache):
        out = model(ids, segment_ids=seg, cache=cache, return_logits=True)
        return out.logits[:, -1], out.cache

    cache = model.init_cache(2, prompt_len + steps)
    assert cache.k.shape == (2, 2, prompt_len + steps, model.config.num_kv_heads, model.config.head_dim)
    last, cache = step(model, prompt, seg, cache)
    for t in range(steps + 1):
        for b, n in enumerate(lengths):
            err = np.abs(np.asarray(last[b], np.float64) - np.asarray(want[b, n - 1 + t], np.float64))
            assert np.all(err <= tol[b, n - 1 + t]), f"step {t} row {b}: max excess {(err - tol[b, n - 1 + t]).max()}"
        if t < steps:  # decode: row b consumes full[b, n + t]
            ids = np.asarray([[full[b, n + t]] for b, n in enumerate(lengths)], np.int32)
            last, cache = step(model, ids, np.ones((2, 1), np.int32), cache)
    assert int(cache.index) == prompt_len + steps
    np.testing.assert_array_equal(cache.positions[1, prompt_len - 3:], np.arange(3 + steps))


def test_model_contract(models):
    model, ids = models["tiny_llama"], _ids((3, 14))
    seg = np.ones_like(ids)
    hidden, logits = forward(model, ids, seg)
    assert hidden.shape == (3, 14, 32) and logits.shape == (3, 14, 128) and logits.dtype == jnp.float32
    matrix, layout = model.unembedding()
    assert layout == "dv" and matrix.shape == (32, 128)
    # the same D-term dot products in two programs: 2γ_D·(|h|·|W|)
    bound = reduction_tol(np.ones(32)) / 32 * (np.abs(np.asarray(hidden, np.float64)) @ np.abs(np.asarray(matrix)))
    assert np.all(np.abs(np.asarray(logits, np.float64) - np.asarray(model.logits(hidden), np.float64)) <= bound)
    matrix, layout = random_model(presets.tiny_gemma()).unembedding()
    assert layout == "vd" and matrix.shape == (128, 32)
    cache = model.init_cache(1, 8, dtype=jnp.bfloat16)
    assert isinstance(cache, KVCache) and cache.k.dtype == jnp.bfloat16 and int(cache.index) == 0


def test_bf16_compute_policy(models):
    cfg, ids = presets.tiny_llama(), _ids((3, 14))
    seg = np.ones_like(ids)
    _, ref = forward(models["tiny_llama"], ids, seg)
    bf = random_model(cfg.replace(dtype="bfloat16"))
    hidden, logits = forward(bf, ids, seg)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert bf.embed.embedding_vd[...].dtype == jnp.float32  # params stay float32
    # derived bounds (jaxpref.testing.tolerances), per token; u = 2⁻⁸ (bfloat16):
    # the final hidden state went through k roundings to bfloat16: ‖h_bf − h‖ <= k·u·‖h‖ (first order)
    h32, hbf = np.asarray(forward(models["tiny_llama"], ids, seg)[0], np.float64), np.asarray(hidden, np.float64)
    err_h = np.linalg.norm(hbf - h32, axis=-1)
    assert np.all(err_h <= low_precision_stages(cfg) * U_BF16 * np.linalg.norm(h32, axis=-1))
    # logits = h_bf · bf16(W) accumulated in float32 (bf16 products are exact in float32): by Cauchy-Schwarz
    # |z_bf − z| <= ‖h_bf − h‖·‖W_v‖ + u·Σ_d |h_bf,d|·|W_dv| (W's rounding) + 2γ_D(u32)·Σ_d |h_d|·|W_dv|
    w = np.asarray(models["tiny_llama"].unembedding()[0], np.float64)  # [D, V]; the same weights (seed 0)
    bound = (err_h[..., None] * np.linalg.norm(w, axis=0) + U_BF16 * (np.abs(hbf) @ np.abs(w))
             + reduction_tol(np.ones(cfg.hidden_size)) / cfg.hidden_size * (np.abs(h32) @ np.abs(w)))
    assert np.all(np.abs(np.asarray(logits, np.float64) - np.asarray(ref, np.float64)) <= bound)
    bf_params = random_model(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))
    assert bf_params.layers[0].attn.query_dnh[...].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(forward(bf_params, ids, seg)[1])).all()


def _loss_grads(model, ids):
    return nnx.grad(lambda m: jnp.mean(m(ids, return_logits=True).logits ** 2))(model)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch", "dots"])
def test_remat_gives_same_gradients(policy):
    cfg, ids = presets.tiny_gpt_neox(num_layers=1), _ids((2, 6))
    grads = nnx.jit(_loss_grads)
    g0 = jax.tree.leaves(grads(random_model(cfg), ids))
    g1 = jax.tree.leaves(grads(random_model(cfg.replace(remat=True, remat_policy=policy)), ids))
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _saved_residual_bytes(fn, *args) -> int:
    """Bytes the backward keeps from the forward, from ``jax.ad_checkpoint.print_saved_residuals``."""
    import contextlib
    import io
    import re

    from jax import ad_checkpoint

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ad_checkpoint.print_saved_residuals(fn, *args)
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "s32": 4, "u32": 4, "bool": 1, "pred": 1}
    total = 0
    for dtype, dims in re.findall(r"^(\w+)\[([\d,]*)\]", buf.getvalue(), flags=re.M):
        total += sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def test_remat_policies_trade_memory_for_recompute():
    """What the backward keeps: none > dots > dots_no_batch > full (each policy saves less of the forward).
    A policy that was silently ignored would tie with its neighbour. (XLA:CPU's compiled temp memory hardly
    moves with remat at this size, 33.6 vs 30.6 MiB, so the residuals are what is measured.)"""
    cfg = presets.tiny_llama(num_layers=4, hidden_size=128, intermediate_size=512, num_heads=2, num_kv_heads=2,
                             head_dim=64, vocab_size=256)
    ids = _ids((8, 64), vocab=256)
    saved = {}
    for name, over in {"none": {}, "dots": {"remat": True, "remat_policy": "dots"},
                       "dots_no_batch": {"remat": True, "remat_policy": "dots_no_batch"},
                       "full": {"remat": True, "remat_policy": "full"}}.items():
        graphdef, state = nnx.split(random_model(cfg.replace(**over)))

        def loss(state, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, state)(ids).hidden ** 2)

        saved[name] = _saved_residual_bytes(loss, state)
    assert saved["none"] > saved["dots"] > saved["dots_no_batch"] > saved["full"], saved
    assert saved["full"] < saved["none"] / 4, saved  # 5.9 vs 43 MiB when written
    with pytest.raises(ValueError, match="remat_policy='most'"):
        cfg.replace(remat=True, remat_policy="most")


def test_logical_axes_on_parameters(models):
    attn = models["tiny_llama"].layers[0].attn
    assert attn.query_dnh.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
    assert attn.out_nhd.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
    assert models["tiny_llama"].lm_head_dv.get_metadata()["out_sharding"] == ("embed", "vocab")


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_gemma"])
def test_equal_models_share_one_graphdef(name):
    """Two separately built models of one config are one jit key (no recompile per model object); GELU
    families used to hold a fresh lambda each."""
    config = getattr(presets, name)()
    first, second = (nnx.split(random_model(config, seed))[0] for seed in (0, 1))
    assert first == second and hash(first) == hash(second)
