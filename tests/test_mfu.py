"""FLOP counting of a preference step (jaxpref.training.mfu) against a hand computation."""

import pytest

from jaxpref.models import presets
from jaxpref.training import mfu


def test_step_flops_by_hand():
    # tiny_llama: V=128, D=32, I=64, L=2, H=4, KV=2, hd=8, untied, gated MLP.
    cfg = presets.tiny_llama()
    per_layer = 32 * 8 * (4 + 2 * 2) + 4 * 8 * 32 + 3 * 32 * 64  # q,k,v + o + gate/up/down = 9216
    n_matmul = 2 * per_layer + 32 * 128  # + unembedding = 22528 (embedding lookup is not a matmul)
    b, t = 3, 16
    ctx = (t + 1) / 2  # keys a causal query attends to, on average
    attention = 4 * 2 * 4 * 8 * ctx  # QK^T and PV: 2 matmuls x 2 FLOPs x L x H x hd x ctx = 2176
    fwd = 2 * n_matmul + attention  # per token
    tokens = 2 * b * t  # chosen + rejected
    # "6 N" sanity: policy forward+backward = 6 * N_matmul per token, plus 3x the attention term.
    policy = tokens * (6 * n_matmul + 3 * attention)
    assert cfg.flops_per_token(t, training=False) == pytest.approx(fwd)
    assert mfu.step_flops(cfg, b, t, reference="none") == pytest.approx(policy)
    assert mfu.step_flops(cfg, b, t, reference="precomputed") == pytest.approx(policy)
    assert mfu.step_flops(cfg, b, t, reference="live") == pytest.approx(policy + tokens * fwd)
    assert mfu.step_flops(cfg, b, t, reference="live") == pytest.approx(96 * 4 * 47232)


def test_sliding_window_caps_attention():
    cfg = presets.tiny_mistral()  # window 4
    t = 16
    full = presets.tiny_llama().flops_per_token(t, training=False)
    ctx = sum(min(i, 4) for i in range(1, t + 1)) / t
    attention_full, attention_window = 4 * 2 * 4 * 8 * (t + 1) / 2, 4 * 2 * 4 * 8 * ctx
    assert cfg.flops_per_token(t, training=False) == pytest.approx(full - attention_full + attention_window)


def test_mfu_and_errors():
    assert mfu.mfu(5e12, 2.0, 1e13) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="reference"):
        mfu.step_flops(presets.tiny_llama(), 1, 8, reference="frozen")
    with pytest.raises(ValueError):
        mfu.mfu(1.0, 0.0, 1.0)
