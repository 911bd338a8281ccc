"""2025-2026 families on the shared transformer: Qwen3, Gemma 2, Gemma 3 (text), OLMo 2, Phi-3/Phi-4.

Each differs from Llama only in :class:`~jaxpref.models.config.FamilyTraits` (q/k norms, norm
placement, norm casting) and config fields (soft-caps, local/global layers, local RoPE base,
``query_pre_attn_scalar``, partial rotary); the modules here hold their Hugging Face key tables,
built from Llama's projection rules plus each family's norm names:

=========  ================================  =========================================
family     block norms (HF names)             attention extras
=========  ================================  =========================================
qwen3      input / post_attention (pre)       ``self_attn.{q,k}_norm`` per head
gemma2     input, post_attention,             --
           pre_feedforward, post_feedforward
gemma3     as gemma2                          ``self_attn.{q,k}_norm`` per head
olmo2      post_attention, post_feedforward   ``self_attn.{q,k}_norm`` over H * hd
phi3       input / post_attention (pre)       fused ``qkv_proj``; MLP ``gate_up_proj``
=========  ================================  =========================================

Note the name clash the tables resolve: Llama's ``post_attention_layernorm`` is the norm
*before* the MLP, Gemma 2's and OLMo 2's is the norm *after* attention. llama.cpp's names keep
them apart (``ffn_norm`` vs ``post_attention_norm``); :mod:`jaxpref.models.gguf_io` maps GGUF
files of all five families (and Gemma) to these HF names.
"""

from __future__ import annotations

from jaxpref.models.config import Family
from jaxpref.models.hf_keys import FusedLinear, KeyTable, Linear, rule
from jaxpref.models.llama import LLAMA_KEYS
from jaxpref.models.transformer import CausalLM

_L = "model.layers.{i}"
_J = "layers.{i}"

# Llama's rules without its two block norms (every family below names those itself).
_PROJECTIONS = tuple(r for r in LLAMA_KEYS.rules if "layernorm" not in r.hf[0])
_PRE_NORMS = (rule(f"{_L}.input_layernorm.weight", f"{_J}.attn_norm.scale_d"),
              rule(f"{_L}.post_attention_layernorm.weight", f"{_J}.mlp_norm.scale_d"))
_QK_NORMS = (rule(f"{_L}.self_attn.q_norm.weight", f"{_J}.attn.q_norm.scale_d"),
             rule(f"{_L}.self_attn.k_norm.weight", f"{_J}.attn.k_norm.scale_d"))
_POST_NORMS = (rule(f"{_L}.post_attention_layernorm.weight", f"{_J}.attn_post_norm.scale_d"),
               rule(f"{_L}.post_feedforward_layernorm.weight", f"{_J}.mlp_post_norm.scale_d"))
_SANDWICH_NORMS = (rule(f"{_L}.input_layernorm.weight", f"{_J}.attn_norm.scale_d"),
                   rule(f"{_L}.pre_feedforward_layernorm.weight", f"{_J}.mlp_norm.scale_d"), *_POST_NORMS)


def _table(*rules) -> KeyTable:
    return KeyTable(rules=(*_PROJECTIONS, *rules), head=LLAMA_KEYS.head, ignore=LLAMA_KEYS.ignore)


QWEN3_KEYS = _table(*_PRE_NORMS, *_QK_NORMS)
GEMMA2_KEYS = _table(*_SANDWICH_NORMS)
GEMMA3_KEYS = _table(*_SANDWICH_NORMS, *_QK_NORMS)
OLMO2_KEYS = _table(*_POST_NORMS, *_QK_NORMS)
PHI3_KEYS = KeyTable(
    rules=(
        rule("model.embed_tokens.weight", "embed.embedding_vd"),
        rule("model.norm.weight", "final_norm.scale_d"),
        *_PRE_NORMS,
        rule(f"{_L}.self_attn.qkv_proj.weight", (f"{_J}.attn.query_dnh", f"{_J}.attn.key_dkh", f"{_J}.attn.value_dkh"),
             FusedLinear()),
        rule(f"{_L}.self_attn.o_proj.weight", f"{_J}.attn.out_nhd", Linear(2)),
        rule(f"{_L}.mlp.gate_up_proj.weight", (f"{_J}.mlp.gate_df", f"{_J}.mlp.up_df"), FusedLinear()),
        rule(f"{_L}.mlp.down_proj.weight", f"{_J}.mlp.down_fd", Linear(1)),
    ),
    head=LLAMA_KEYS.head,
    ignore=LLAMA_KEYS.ignore,
)


class Qwen3(CausalLM):
    """Qwen3 (dense): Llama plus per-head q/k RMSNorm, explicit ``head_dim``."""

    FAMILIES = (Family.QWEN3,)
    HF_KEYS = QWEN3_KEYS


class Gemma2(CausalLM):
    """Gemma 2: sandwich norms, soft-capped attention and final logits, alternating local/global layers."""

    FAMILIES = (Family.GEMMA2,)
    HF_KEYS = GEMMA2_KEYS


class Gemma3(CausalLM):
    """Gemma 3 (text): Gemma 2's block with per-head q/k norms and a local RoPE base for sliding layers."""

    FAMILIES = (Family.GEMMA3,)
    HF_KEYS = GEMMA3_KEYS


class Olmo2(CausalLM):
    """OLMo 2: post-norm blocks (``x + norm(f(x))``), q/k RMSNorm over the full projection."""

    FAMILIES = (Family.OLMO2,)
    HF_KEYS = OLMO2_KEYS


class Phi3(CausalLM):
    """Phi-3 / Phi-4: Llama with fused ``qkv_proj`` and ``gate_up_proj`` (split on import, fused on export)."""

    FAMILIES = (Family.PHI3,)
    HF_KEYS = PHI3_KEYS
