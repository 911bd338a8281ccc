"""Gemma (v1): Llama's layout with ``(1 + w)`` RMSNorm, embeddings scaled by ``sqrt(D)`` (rounded
to the parameter dtype, as transformers does), gelu-tanh gated MLP, an explicit ``head_dim``
and tied embeddings. Hugging Face names are Llama's, so the key table is shared.

Gemma 2/3 (soft-capping, sandwich norms, local/global layers) are different families and are
rejected by :meth:`ModelConfig.from_hf_config` (their ``model_type`` differs).
"""

from __future__ import annotations

from jaxpref.models.config import Family
from jaxpref.models.llama import LLAMA_KEYS
from jaxpref.models.transformer import CausalLM

GEMMA_KEYS = LLAMA_KEYS


class Gemma(CausalLM):
    """Gemma 1; the differences from Llama live in ``FAMILY_TRAITS[Family.GEMMA]``."""

    FAMILIES = (Family.GEMMA,)
    HF_KEYS = GEMMA_KEYS
