"""Flax NNX ports of Hugging Face causal LMs (see :mod:`jaxpref.models.base` for the contract).

Typical use::

    from jaxpref import models
    model = models.load_hf("path/to/hf_dir", mesh=mesh, dtype="bfloat16")
    out = model(input_ids, segment_ids=segment_ids)          # out.hidden [B, T, D]
    models.save_hf(model, "out_dir", source_dir="path/to/hf_dir")

    model = models.build_model(models.presets.tiny_llama(), rngs=0)   # random init
"""

from jaxpref.models import presets
from jaxpref.models.base import CausalLM as CausalLMProtocol
from jaxpref.models.base import KVCache, ModelOutput
from jaxpref.models.config import Family, FamilyTraits, ModelConfig, RopeScaling, UnsupportedConfigError
from jaxpref.models.families import Gemma2, Gemma3, Olmo2, Phi3, Qwen3
from jaxpref.models.gemma import Gemma
from jaxpref.models.gguf_io import gguf_to_hf_dir, load_gguf, read_gguf
from jaxpref.models.gpt2 import GPT2
from jaxpref.models.gpt_neox import GPTNeoX
from jaxpref.models.hf_io import CheckpointMismatchError, SafetensorsCheckpoint, load_hf, params_from_hf, save_hf
from jaxpref.models.llama import Llama
from jaxpref.models.llama2c import Llama2cTokenizer, load_llama2c
from jaxpref.models.presets import PRESETS, get_preset
from jaxpref.models.registry import MODEL_CLASSES, abstract_model, build_model, model_class
from jaxpref.models.transformer import CausalLM, count_params

__all__ = [
    # contract
    "CausalLMProtocol", "KVCache", "ModelOutput",
    # configs
    "Family", "FamilyTraits", "ModelConfig", "RopeScaling", "UnsupportedConfigError", "PRESETS", "get_preset",
    "presets",
    # models
    "CausalLM", "Llama", "Gemma", "GPT2", "GPTNeoX",
    "Qwen3", "Gemma2", "Gemma3", "Olmo2", "Phi3", "MODEL_CLASSES", "build_model", "abstract_model",
    "model_class", "count_params",
    # checkpoints
    "load_hf", "save_hf", "params_from_hf", "SafetensorsCheckpoint", "CheckpointMismatchError",
    "load_llama2c", "Llama2cTokenizer", "load_gguf", "read_gguf", "gguf_to_hf_dir",
]
