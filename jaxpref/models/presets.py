"""Named :class:`ModelConfig` presets: real checkpoints' shapes and tiny test models.

Full-size presets mirror the public ``config.json`` of each checkpoint (checked by exact
parameter counts in the tests, through ``jax.eval_shape``, so nothing is allocated). Tiny
presets (D <= 64, 2 layers) exercise one family feature each and are what the parity tests
build random Hugging Face models from.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpref.models.config import Family, ModelConfig, RopeScaling

# ------------------------------------------------------------------------------- full size


def llama3_8b(**kw) -> ModelConfig:
    """Meta-Llama-3.1-8B (8,030,261,248 parameters)."""
    return ModelConfig(
        Family.LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, **kw)


def llama3_2_1b(**kw) -> ModelConfig:
    """Llama-3.2-1B (1,235,814,400 parameters; tied, GQA 32/8, llama3 RoPE scaling factor 32)."""
    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    return ModelConfig(
        Family.LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=scaling,
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, **kw)


def llama3_2_3b(**kw) -> ModelConfig:
    """Meta-Llama-3.2-3B (3,212,749,824 parameters; tied, GQA 24/8, RoPE scaling factor 32)."""
    return ModelConfig(
        Family.LLAMA, vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
        tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, **kw)


def llama3_1_70b(**kw) -> ModelConfig:
    """Meta-Llama-3.1-70B (70,553,706,496 parameters; GQA 64/8)."""
    return ModelConfig(
        Family.LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, **kw)


def qwen2_5_7b(**kw) -> ModelConfig:
    """Qwen2.5-7B (7,615,616,512 parameters; q/k/v biases, GQA 28/4, untied)."""
    return ModelConfig(
        Family.QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
        max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643, **kw)


def mistral_7b(**kw) -> ModelConfig:
    """Mistral-7B-v0.1 (7,241,732,096 parameters; sliding window 4096)."""
    return ModelConfig(
        Family.MISTRAL, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, norm_eps=1e-5, sliding_window=4096, max_position_embeddings=32768,
        bos_token_id=1, eos_token_id=2, **kw)


def qwen2_0_5b(**kw) -> ModelConfig:
    """Qwen2-0.5B (494,032,768 parameters; tied, q/k/v biases)."""
    return ModelConfig(
        Family.QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643, **kw)


def smollm2_135m(**kw) -> ModelConfig:
    """SmolLM2-135M (134,515,008 parameters; Llama, tied, GQA 9/3)."""
    return ModelConfig(
        Family.LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=0, **kw)


def gemma_2b(**kw) -> ModelConfig:
    """gemma-2b (2,506,172,416 parameters; MQA, head_dim 256)."""
    return ModelConfig(
        Family.GEMMA, vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_layers=18, num_heads=8,
        num_kv_heads=1, head_dim=256, norm_eps=1e-6, act="gelu_tanh", tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0, **kw)


def gpt2_small(**kw) -> ModelConfig:
    """gpt2 (124,439,808 parameters)."""
    return ModelConfig(
        Family.GPT2, vocab_size=50257, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
        num_kv_heads=12, head_dim=64, norm_eps=1e-5, act="gelu_tanh", tie_word_embeddings=True,
        qkv_bias=True, out_bias=True, mlp_bias=True, max_position_embeddings=1024,
        bos_token_id=50256, eos_token_id=50256, **kw)


def pythia_160m(**kw) -> ModelConfig:
    """EleutherAI/pythia-160m (162,322,944 parameters; rotary 25%, parallel residual)."""
    return ModelConfig(
        Family.GPT_NEOX, vocab_size=50304, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
        num_kv_heads=12, head_dim=64, norm_eps=1e-5, partial_rotary_factor=0.25, act="gelu",
        qkv_bias=True, out_bias=True, mlp_bias=True, parallel_residual=True, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=0, **kw)


def stories260k(**kw) -> ModelConfig:
    """llama2.c ``stories260K`` (260,032 parameters; tied, GQA 8/4)."""
    return ModelConfig(
        Family.LLAMA, vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=5, num_heads=8,
        num_kv_heads=4, head_dim=8, norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, **kw)


# ------------------------------------------------------------------------------- tiny

_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)


def tiny_llama(**kw) -> ModelConfig:
    """Llama 2 shape, untied, GQA 4/2."""
    return ModelConfig(Family.LLAMA, **{**_TINY, "norm_eps": 1e-5, **kw})


def tiny_llama3(**kw) -> ModelConfig:
    """Llama 3.1 RoPE scaling with a short original context so all three frequency bands occur."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    return ModelConfig(Family.LLAMA, **{**_TINY, "rope_scaling": scaling, **kw})


def tiny_smollm2(**kw) -> ModelConfig:
    """SmolLM2 shape: Llama, tied embeddings, GQA 4/1."""
    return ModelConfig(Family.LLAMA, **{**_TINY, "num_kv_heads": 1, "tie_word_embeddings": True, **kw})


def tiny_mistral(**kw) -> ModelConfig:
    """Mistral with a 4-token sliding window (shorter than the test sequences)."""
    return ModelConfig(Family.MISTRAL, **{**_TINY, "sliding_window": 4, **kw})


def tiny_qwen2(**kw) -> ModelConfig:
    """Qwen2: q/k/v biases, untied."""
    return ModelConfig(Family.QWEN2, **{**_TINY, "qkv_bias": True, "rope_theta": 1000000.0, **kw})


def tiny_qwen2_tied(**kw) -> ModelConfig:
    """Qwen2: q/k/v biases, tied (like the real 0.5B-1.5B checkpoints)."""
    return tiny_qwen2(**{"tie_word_embeddings": True, **kw})


def tiny_gemma(**kw) -> ModelConfig:
    """Gemma: (1 + w) RMSNorm, scaled embeddings, gelu-tanh, MQA, head_dim 16 != D / H."""
    return ModelConfig(Family.GEMMA, **{**_TINY, "num_kv_heads": 1, "head_dim": 16, "act": "gelu_tanh",
                                        "tie_word_embeddings": True, **kw})


def tiny_gpt2(**kw) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, gelu_new, tied, all biases."""
    return ModelConfig(Family.GPT2, **{**_TINY, "num_kv_heads": 4, "intermediate_size": 128, "act": "gelu_tanh",
                                       "norm_eps": 1e-5, "tie_word_embeddings": True, "qkv_bias": True,
                                       "out_bias": True, "mlp_bias": True, **kw})


def tiny_gpt_neox(**kw) -> ModelConfig:
    """GPT-NeoX / Pythia: fused per-head QKV, 25% rotary, parallel residual, untied head."""
    return ModelConfig(Family.GPT_NEOX, **{**_TINY, "num_kv_heads": 4, "act": "gelu", "norm_eps": 1e-5,
                                           "partial_rotary_factor": 0.25, "parallel_residual": True,
                                           "qkv_bias": True, "out_bias": True, "mlp_bias": True, **kw})


# ------------------------------------------------------------------------------- 2025-2026 families
# (Qwen2.5, Qwen3, Gemma 2, Gemma 3, OLMo 2, Phi-3/4: full-size shapes from each public config.json, then
# one tiny preset per family whose features all bind at T = 12: window 4 < T, caps below the logits' range.)


def qwen2_5_0_5b(**kw) -> ModelConfig:
    """Qwen2.5-0.5B (494,032,768 parameters; the Qwen2 architecture, tied, q/k/v biases)."""
    return ModelConfig(
        Family.QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643, **kw)


def qwen2_5_1_5b(**kw) -> ModelConfig:
    """Qwen2.5-1.5B (1,543,714,304 parameters; tied, GQA 12/2)."""
    return ModelConfig(
        Family.QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643, **kw)


def qwen3_0_6b(**kw) -> ModelConfig:
    """Qwen3-0.6B (596,049,920 parameters; tied, per-head q/k norms, head_dim 128 != D / H)."""
    return ModelConfig(
        Family.QWEN3, vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645, **kw)


def gemma2_2b(**kw) -> ModelConfig:
    """gemma-2-2b (2,614,341,888 parameters; soft-caps 50 / 30, window 4096 on even layers)."""
    return ModelConfig(
        Family.GEMMA2, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8,
        num_kv_heads=4, head_dim=256, norm_eps=1e-6, act="gelu_tanh", tie_word_embeddings=True,
        max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, layer_types=_alternating(26, 2), bos_token_id=2, eos_token_id=1, pad_token_id=0,
        **kw)


def gemma3_1b(**kw) -> ModelConfig:
    """gemma-3-1b-pt (999,885,952 parameters; 5 local (window 512, base 1e4) : 1 global (base 1e6) layers)."""
    return ModelConfig(
        Family.GEMMA3, vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4,
        num_kv_heads=1, head_dim=256, norm_eps=1e-6, act="gelu_tanh", tie_word_embeddings=True,
        max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256, rope_theta=1000000.0,
        rope_local_theta=10000.0, layer_types=_alternating(26, 6), bos_token_id=2, eos_token_id=1, pad_token_id=0,
        **kw)


def olmo2_1b(**kw) -> ModelConfig:
    """OLMo-2-0425-1B (1,484,916,736 parameters; post-norm blocks, q/k norms over H * hd)."""
    return ModelConfig(
        Family.OLMO2, vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=16,
        num_kv_heads=16, head_dim=128, norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=4096,
        eos_token_id=100257, pad_token_id=100277, **kw)


def phi3_mini(**kw) -> ModelConfig:
    """Phi-3-mini-4k-instruct (3,821,079,552 parameters; fused qkv / gate_up, window 2047)."""
    return ModelConfig(
        Family.PHI3, vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=96, norm_eps=1e-5, sliding_window=2047, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, **kw)


def _alternating(num_layers: int, pattern: int) -> tuple[str, ...]:
    """HF's default local/global pattern: every ``pattern``-th layer global, the rest local."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


def tiny_qwen3(**kw) -> ModelConfig:
    """Qwen3: per-head q/k norms, head_dim 16 != D / H, tied."""
    return ModelConfig(Family.QWEN3, **{**_TINY, "head_dim": 16, "rope_theta": 1000000.0,
                                        "tie_word_embeddings": True, **kw})


def tiny_gemma2(**kw) -> ModelConfig:
    """Gemma 2: sandwich norms, soft-caps that bind, window 4 on layer 0, query_pre_attn_scalar 24 != hd."""
    return ModelConfig(Family.GEMMA2, **{**_TINY, "head_dim": 16, "act": "gelu_tanh", "tie_word_embeddings": True,
                                         "sliding_window": 4, "layer_types": _alternating(2, 2),
                                         "query_pre_attn_scalar": 24, "attn_logit_softcap": 1.5,
                                         "final_logit_softcap": 3.0, **kw})


def tiny_gemma3(**kw) -> ModelConfig:
    """Gemma 3: per-head q/k norms, local layer 0 (window 4, base 1e4), global layer 1 (base 1e6, linear x8)."""
    return ModelConfig(Family.GEMMA3, **{**_TINY, "head_dim": 16, "act": "gelu_tanh", "tie_word_embeddings": True,
                                         "sliding_window": 4, "layer_types": _alternating(2, 2),
                                         "query_pre_attn_scalar": 24, "rope_theta": 1000000.0,
                                         "rope_local_theta": 10000.0, "rope_linear_factor": 8.0, **kw})


def tiny_olmo2(**kw) -> ModelConfig:
    """OLMo 2: post-norm blocks, q/k norms over the full projection, GQA 4/2."""
    return ModelConfig(Family.OLMO2, **{**_TINY, "rope_theta": 500000.0, **kw})


def tiny_phi3(**kw) -> ModelConfig:
    """Phi-3 / Phi-4-mini: fused qkv / gate_up, partial rotary 0.5, window 4."""
    return ModelConfig(Family.PHI3, **{**_TINY, "partial_rotary_factor": 0.5, "sliding_window": 4, **kw})


FAMILY_PRESETS = (qwen2_5_0_5b, qwen2_5_1_5b, qwen2_5_7b, qwen3_0_6b, gemma2_2b, gemma3_1b, olmo2_1b, phi3_mini,
                  tiny_qwen3, tiny_gemma2, tiny_gemma3, tiny_olmo2, tiny_phi3)

PRESETS: dict[str, Callable[..., ModelConfig]] = {
    f.__name__: f for f in (llama3_8b, llama3_2_1b, llama3_2_3b, llama3_1_70b, qwen2_5_7b, mistral_7b, qwen2_0_5b,
                            smollm2_135m, gemma_2b, gpt2_small, pythia_160m, stories260k, tiny_llama, tiny_llama3,
                            tiny_smollm2,
                            tiny_mistral, tiny_qwen2, tiny_qwen2_tied, tiny_gemma, tiny_gpt2, tiny_gpt_neox,
                            *FAMILY_PRESETS)
}
TINY_PRESETS: tuple[str, ...] = tuple(name for name in PRESETS if name.startswith("tiny_"))


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. ``dtype="bfloat16"``, or ``num_layers=2`` of a full-size
    preset, whose constructor sets it: overrides replace fields of the built config)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)
