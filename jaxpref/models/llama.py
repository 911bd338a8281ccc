"""Llama 2/3 (incl. Llama 3.1 RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v biases) and
SmolLM2 (tied Llama with GQA): one module, one Hugging Face key table.

All four share transformers' ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` naming; variants
differ only in config (biases, tying, window, RoPE scaling), and rules for parameters a config
does not have are skipped by the loader.
"""

from __future__ import annotations

from jaxpref.models.config import Family
from jaxpref.models.hf_keys import KeyTable, Linear, Reshape, rule
from jaxpref.models.transformer import CausalLM

_L = "model.layers.{i}"
_J = "layers.{i}"

LLAMA_KEYS = KeyTable(
    rules=(
        rule("model.embed_tokens.weight", "embed.embedding_vd"),
        rule("model.norm.weight", "final_norm.scale_d"),
        rule(f"{_L}.input_layernorm.weight", f"{_J}.attn_norm.scale_d"),
        rule(f"{_L}.post_attention_layernorm.weight", f"{_J}.mlp_norm.scale_d"),
        rule(f"{_L}.self_attn.q_proj.weight", f"{_J}.attn.query_dnh", Linear(1)),
        rule(f"{_L}.self_attn.k_proj.weight", f"{_J}.attn.key_dkh", Linear(1)),
        rule(f"{_L}.self_attn.v_proj.weight", f"{_J}.attn.value_dkh", Linear(1)),
        rule(f"{_L}.self_attn.o_proj.weight", f"{_J}.attn.out_nhd", Linear(2)),
        rule(f"{_L}.self_attn.q_proj.bias", f"{_J}.attn.query_bias_nh", Reshape()),
        rule(f"{_L}.self_attn.k_proj.bias", f"{_J}.attn.key_bias_kh", Reshape()),
        rule(f"{_L}.self_attn.v_proj.bias", f"{_J}.attn.value_bias_kh", Reshape()),
        rule(f"{_L}.self_attn.o_proj.bias", f"{_J}.attn.out_bias_d"),
        rule(f"{_L}.mlp.gate_proj.weight", f"{_J}.mlp.gate_df", Linear(1)),
        rule(f"{_L}.mlp.up_proj.weight", f"{_J}.mlp.up_df", Linear(1)),
        rule(f"{_L}.mlp.down_proj.weight", f"{_J}.mlp.down_fd", Linear(1)),
        rule(f"{_L}.mlp.gate_proj.bias", f"{_J}.mlp.gate_bias_f"),
        rule(f"{_L}.mlp.up_proj.bias", f"{_J}.mlp.up_bias_f"),
        rule(f"{_L}.mlp.down_proj.bias", f"{_J}.mlp.down_bias_d"),
    ),
    head=rule("lm_head.weight", "lm_head_dv", Linear(1)),
    ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)


class Llama(CausalLM):
    """Llama / Mistral / Qwen2 / SmolLM2: RMSNorm, RoPE (rotate-half), GQA, gated SiLU MLP."""

    FAMILIES = (Family.LLAMA, Family.MISTRAL, Family.QWEN2)
    HF_KEYS = LLAMA_KEYS
