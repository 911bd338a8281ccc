"""GPT-NeoX / Pythia: fused per-head-interleaved QKV, partial rotary, parallel residual.

Hugging Face's fused ``query_key_value`` rows are laid out ``(H, 3, hd)`` (``qkv.view(B, T, H,
3*hd).chunk(3, -1)``), not ``(3, H, hd)``. The output head is ``embed_out.weight`` in files
written by ``save_pretrained`` (transformers v5 renames the module ``lm_head`` on load), so
both names are accepted and ``embed_out`` is written.
"""

from __future__ import annotations

from jaxpref.models.config import Family
from jaxpref.models.hf_keys import KeyTable, Linear, NeoxQKV, rule
from jaxpref.models.transformer import CausalLM

_L = "gpt_neox.layers.{i}"
_J = "layers.{i}"

GPT_NEOX_KEYS = KeyTable(
    rules=(
        rule("gpt_neox.embed_in.weight", "embed.embedding_vd"),
        rule("gpt_neox.final_layer_norm.weight", "final_norm.scale_d"),
        rule("gpt_neox.final_layer_norm.bias", "final_norm.bias_d"),
        rule(f"{_L}.input_layernorm.weight", f"{_J}.attn_norm.scale_d"),
        rule(f"{_L}.input_layernorm.bias", f"{_J}.attn_norm.bias_d"),
        rule(f"{_L}.post_attention_layernorm.weight", f"{_J}.mlp_norm.scale_d"),
        rule(f"{_L}.post_attention_layernorm.bias", f"{_J}.mlp_norm.bias_d"),
        rule(f"{_L}.attention.query_key_value.weight",
             (f"{_J}.attn.query_dnh", f"{_J}.attn.key_dkh", f"{_J}.attn.value_dkh"), NeoxQKV()),
        rule(f"{_L}.attention.query_key_value.bias",
             (f"{_J}.attn.query_bias_nh", f"{_J}.attn.key_bias_kh", f"{_J}.attn.value_bias_kh"), NeoxQKV()),
        rule(f"{_L}.attention.dense.weight", f"{_J}.attn.out_nhd", Linear(2)),
        rule(f"{_L}.attention.dense.bias", f"{_J}.attn.out_bias_d"),
        rule(f"{_L}.mlp.dense_h_to_4h.weight", f"{_J}.mlp.up_df", Linear(1)),
        rule(f"{_L}.mlp.dense_h_to_4h.bias", f"{_J}.mlp.up_bias_f"),
        rule(f"{_L}.mlp.dense_4h_to_h.weight", f"{_J}.mlp.down_fd", Linear(1)),
        rule(f"{_L}.mlp.dense_4h_to_h.bias", f"{_J}.mlp.down_bias_d"),
    ),
    head=rule(("embed_out.weight", "lm_head.weight"), "lm_head_dv", Linear(1)),
    ignore=(r"gpt_neox\.layers\.\d+\.attention\.(masked_bias|bias|rotary_emb\.inv_freq)",),
)


class GPTNeoX(CausalLM):
    """GPT-NeoX (``GPTNeoXForCausalLM``), e.g. Pythia."""

    FAMILIES = (Family.GPT_NEOX,)
    HF_KEYS = GPT_NEOX_KEYS
