"""GPT-2: learned absolute positions, LayerNorm, ``gelu_new`` MLP, tied head, biases everywhere.

Hugging Face stores GPT-2's projections as ``Conv1D`` weights ``(in, out)``, so they map by a
reshape with no transpose; ``c_attn`` fuses ``[q | k | v]`` along the output axis.
"""

from __future__ import annotations

from jaxpref.models.config import Family
from jaxpref.models.hf_keys import Conv1D, Gpt2QKV, KeyTable, Linear, rule
from jaxpref.models.transformer import CausalLM

_L = "transformer.h.{i}"
_J = "layers.{i}"

GPT2_KEYS = KeyTable(
    rules=(
        rule("transformer.wte.weight", "embed.embedding_vd"),
        rule("transformer.wpe.weight", "position_pd"),
        rule("transformer.ln_f.weight", "final_norm.scale_d"),
        rule("transformer.ln_f.bias", "final_norm.bias_d"),
        rule(f"{_L}.ln_1.weight", f"{_J}.attn_norm.scale_d"),
        rule(f"{_L}.ln_1.bias", f"{_J}.attn_norm.bias_d"),
        rule(f"{_L}.ln_2.weight", f"{_J}.mlp_norm.scale_d"),
        rule(f"{_L}.ln_2.bias", f"{_J}.mlp_norm.bias_d"),
        rule(f"{_L}.attn.c_attn.weight", (f"{_J}.attn.query_dnh", f"{_J}.attn.key_dkh", f"{_J}.attn.value_dkh"),
             Gpt2QKV()),
        rule(f"{_L}.attn.c_attn.bias", (f"{_J}.attn.query_bias_nh", f"{_J}.attn.key_bias_kh",
                                        f"{_J}.attn.value_bias_kh"), Gpt2QKV()),
        rule(f"{_L}.attn.c_proj.weight", f"{_J}.attn.out_nhd", Conv1D(2)),
        rule(f"{_L}.attn.c_proj.bias", f"{_J}.attn.out_bias_d"),
        rule(f"{_L}.mlp.c_fc.weight", f"{_J}.mlp.up_df", Conv1D(1)),
        rule(f"{_L}.mlp.c_fc.bias", f"{_J}.mlp.up_bias_f"),
        rule(f"{_L}.mlp.c_proj.weight", f"{_J}.mlp.down_fd", Conv1D(1)),
        rule(f"{_L}.mlp.c_proj.bias", f"{_J}.mlp.down_bias_d"),
    ),
    head=rule("lm_head.weight", "lm_head_dv", Linear(1)),
    # causal-mask buffers written by old transformers versions.
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias",),
)


class GPT2(CausalLM):
    """GPT-2 (``GPT2LMHeadModel``)."""

    FAMILIES = (Family.GPT2,)
    HF_KEYS = GPT2_KEYS
