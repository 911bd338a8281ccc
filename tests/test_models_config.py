"""ModelConfig: HF v4/v5 spellings, round trips, validation, presets (exact parameter counts), FLOPs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxpref.models import (
    Family,
    ModelConfig,
    RopeScaling,
    UnsupportedConfigError,
    abstract_model,
    count_params,
    presets,
)
from jaxpref.models.config import rope_inv_freq


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_hf_config_round_trip(name):
    cfg = presets.get_preset(name)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_v4_and_v5_spellings_agree():
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
    v4 = {**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **rope}, "torch_dtype": "bfloat16"}
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **rope}, "dtype": "bfloat16"}
    a, b = ModelConfig.from_hf_config(v4), ModelConfig.from_hf_config(v5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling == RopeScaling(**rope)
    assert a.param_dtype == a.dtype == "bfloat16" and a.head_dim == 8
    assert ModelConfig.from_hf_config(v4, dtype="float32").dtype == "float32"


def test_gpt_neox_v4_spelling():
    v4 = {"model_type": "gpt_neox", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5, "rotary_emb_base": 20000,
          "use_parallel_residual": False, "torch_dtype": "float16"}
    cfg = ModelConfig.from_hf_config(v4)
    assert (cfg.partial_rotary_factor, cfg.rope_theta, cfg.parallel_residual) == (0.5, 20000.0, False)
    assert cfg.rotary_dim == 4 and cfg.param_dtype == "float16" and cfg.act == "gelu"
    # HF's NeoX default is 25% rotary when nothing is given.
    assert ModelConfig.from_hf_config({k: v for k, v in v4.items() if k != "rotary_pct"}).partial_rotary_factor == 0.25


@pytest.mark.parametrize("hf, match", [
    ({"model_type": "mixtral"}, "model_type 'mixtral'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "gpt2", "reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"model_type": "llama", "hidden_act": "relu2"}, "activation 'relu2'"),
    ({"model_type": "llama", "pretraining_tp": 2}, "pretraining_tp"),
])
def test_unsupported_hf_features_raise(hf, match):
    full = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "n_embd": 32, "n_head": 4, "n_layer": 2, **hf}
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf_config(full)


@pytest.mark.parametrize("changes, error, match", [
    (dict(num_kv_heads=3), ValueError, "not a multiple"),
    (dict(hidden_size=0), ValueError, "hidden_size must be positive"),
    (dict(sliding_window=4), UnsupportedConfigError, "only supported .* for mistral"),
    (dict(parallel_residual=True), UnsupportedConfigError, "gpt_neox feature"),
    (dict(partial_rotary_factor=0.5), UnsupportedConfigError, "partial rotary"),
    (dict(dtype="int8"), ValueError, "dtype='int8'"),
    (dict(act="tanh"), UnsupportedConfigError, "activation 'tanh'"),
    (dict(family="t5"), UnsupportedConfigError, "unknown model family"),
])
def test_validation(changes, error, match):
    with pytest.raises(error, match=match):
        dataclasses.replace(presets.tiny_llama(), **changes)


def test_normalisation():
    cfg = presets.tiny_llama().replace(family="mistral", dtype=np.dtype("float32"), act="swish", eos_token_id=[2, 3])
    assert cfg.family is Family.MISTRAL and cfg.dtype == "float32" and cfg.act == "silu"
    assert cfg.eos_token_id == (2, 3) and hash(cfg)
    assert cfg.to_hf_config()["eos_token_id"] == [2, 3]


# Exact counts of the public checkpoints, computed on abstract (eval_shape) models: no memory.
@pytest.mark.parametrize("name, expected", [
    ("llama3_8b", 8_030_261_248), ("llama3_2_1b", 1_235_814_400), ("llama3_2_3b", 3_212_749_824),
    ("llama3_1_70b", 70_553_706_496),
    ("qwen2_5_7b", 7_615_616_512), ("mistral_7b", 7_241_732_096), ("gemma_2b", 2_506_172_416),
    ("qwen2_0_5b", 494_032_768), ("smollm2_135m", 134_515_008), ("gpt2_small", 124_439_808),
    ("pythia_160m", 162_322_944), ("stories260k", 260_032),
    ("qwen2_5_0_5b", 494_032_768), ("qwen2_5_1_5b", 1_543_714_304), ("qwen2_5_7b", 7_615_616_512),
    ("qwen3_0_6b", 596_049_920), ("gemma2_2b", 2_614_341_888), ("gemma3_1b", 999_885_952),
    ("olmo2_1b", 1_484_916_736), ("phi3_mini", 3_821_079_552),
])
def test_full_size_presets_param_count(name, expected):
    """The analytic count and the count of the built (abstract) model. The model is built with one and two
    layers (every layer is the same block) and extrapolated to ``num_layers``: building all 80 layers of the
    70B abstractly costs 9 s, the 1- and 2-layer models 0.3 s."""
    cfg = presets.get_preset(name)
    assert cfg.num_params() == expected
    cut = lambda n: cfg.replace(num_layers=n, **({"layer_types": cfg.layer_types[:n]} if cfg.layer_types else {}))  # noqa: E731
    one, two = (count_params(abstract_model(cut(n))) for n in (1, 2))
    assert one + (cfg.num_layers - 1) * (two - one) == expected


def test_unknown_preset():
    with pytest.raises(KeyError, match="available"):
        presets.get_preset("llama5")


def test_flops_per_token():
    cfg = presets.tiny_llama()
    d, i, v, L = 32, 64, 128, 2
    matmul = 2 * (L * (d * 8 * (4 + 2 * 2) + 4 * 8 * d + 3 * d * i) + d * v)
    assert cfg.flops_per_token(1, training=False) == matmul + 4 * L * 4 * 8 * 1.0
    assert cfg.flops_per_token(9, training=False) == matmul + 4 * L * 4 * 8 * 5.0  # mean context (T+1)/2
    assert cfg.flops_per_token(9) == 3 * cfg.flops_per_token(9, training=False)
    # a sliding window caps the context: mean(min(t, 4) for t in 1..9) = 30 / 9
    window = presets.tiny_mistral()
    np.testing.assert_allclose(window.flops_per_token(9, training=False), matmul + 4 * L * 4 * 8 * 30 / 9)
    # at short context, training FLOPs are ~6 N (non-embedding + head) per token, the usual rule.
    big = presets.llama3_8b()
    n_matmul = big.num_params() - big.vocab_size * big.hidden_size - (2 * big.num_layers + 1) * big.hidden_size
    assert abs(big.flops_per_token(1) / (6 * n_matmul) - 1) < 1e-3


def test_llama3_inv_freq_bands():
    cfg = presets.tiny_llama3()  # theta 1e4, hd 8, original context 64: wavelengths 6.3, 63, 628, 6283
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * np.pi / plain
    assert wavelen[0] < 64 / 4 and scaled[0] == plain[0]                         # high frequency: kept
    assert 64 / 4 <= wavelen[1] <= 64 and plain[1] / 8 < scaled[1] < plain[1]    # medium: interpolated
    assert np.all(wavelen[2:] > 64) and np.allclose(scaled[2:], plain[2:] / 8)   # low: divided by factor
