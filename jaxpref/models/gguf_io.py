"""Import llama.cpp GGUF checkpoints as Hugging Face-layout weights (and jaxpref models).

A GGUF file holds the model config as metadata (``llama.block_count``, ...), the tokenizer as
metadata (``tokenizer.ggml.tokens``, ``merges``, ``token_type``, special ids, chat template)
and the tensors under llama.cpp's names, often block-quantized (Q4_0, Q4_1, Q8_0, K-quants).
This module turns one into exactly the weights ``transformers`` would load from the same file,
with the config of the HF model it was converted from::

    hf_config, state_dict, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf_to_hf_dir("model.gguf", "out/")          # config.json + model.safetensors + tokenizer
    model, tokenizer = load_gguf("model.gguf")    # a jaxpref model (through hf_io)

or from the shell: ``python -m jaxpref.models.gguf_io SRC.gguf OUT_DIR``.

Architectures (``general.architecture`` -> HF ``model_type``): ``llama`` (incl. Mistral /
SmolLM), ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``, ``gemma3`` (-> ``gemma3_text``), ``olmo2``,
``phi3`` (Phi-3 / Phi-4-mini); anything else raises :class:`GGUFError` (one line naming the list).

The tensor path is ours (``gguf.GGUFReader`` + numpy): dequantize to float32, rename with the
architecture's declarative table (:class:`_Arch`), and undo what llama.cpp's
``convert_hf_to_gguf.py`` changed: the Q/K row permutation of Llama-architecture models (it
reorders RoPE's rotate-half pairs into GGML's interleaved layout) and the ``+ 1`` it adds to
every Gemma norm weight (Gemma's RMSNorm multiplies by ``1 + w``; GGML by the stored weight).
Phi-3's fused ``attn_qkv`` / ``ffn_up`` ([gate; up]) stay fused, as HF has them. The config is
rebuilt per architecture from the metadata, including what transformers' own GGUF loader does
not read back (see :func:`hf_config_from_metadata`). The tokenizer is rebuilt by
``transformers``' own GGUF tokenizer converter so that it tokenizes exactly as
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does.
Dequantized weights are what the quantized model computes with; they are not the original
full-precision weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxpref.models.config import UnsupportedConfigError

log = logging.getLogger(__name__)


class GGUFError(UnsupportedConfigError, NotImplementedError):
    """A GGUF file this module cannot import (an architecture, RoPE variant or tensor it does not map,
    or a missing metadata key); the message is one line naming the file's architecture and what is
    supported. An :class:`~jaxpref.models.config.UnsupportedConfigError`, so the scripts print it as
    one line; also a ``NotImplementedError``, as these errors were before."""

# llama.cpp tensor name -> HF module name. Block tensors (`blk.{i}.NAME`) map under
# `model.layers.{i}.`; the suffix (.weight / .bias) is kept. Names from gguf-py's
# `MODEL_TENSOR` table; each architecture lists the ones its converter writes.
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",  # Llama's name for the norm *before* the MLP
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_POST_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GEMMA2_BLOCK = {**_LLAMA_BLOCK, "ffn_norm": "pre_feedforward_layernorm", **_POST_NORMS}
_OLMO2_BLOCK = {**{k: v for k, v in _LLAMA_BLOCK.items() if not k.endswith("_norm")}, **_POST_NORMS, **_QK_NORMS}
# Phi-3 keeps HF's fused projections: `attn_qkv` = [q; k; v] rows, `ffn_up` = [gate; up] rows.
_PHI3_BLOCK = {**{k: v for k, v in _LLAMA_BLOCK.items() if k not in ("attn_q", "attn_k", "attn_v", "ffn_gate")},
               "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


@dataclasses.dataclass(frozen=True)
class _Arch:
    """How one llama.cpp architecture maps to a transformers ``model_type``.

    Attributes:
      model_type: the HF ``model_type`` (and jaxpref family).
      architecture: the HF ``architectures`` entry.
      block: llama.cpp block tensor -> HF module under ``model.layers.{i}``.
      config: extra ``config.json`` keys from the metadata (:func:`hf_config_from_metadata`).
      permute_qk: llama.cpp's ``LlamaModel`` converter permuted the Q/K rows (:func:`permute_qk`).
      norm_shift: the converter stored every ``*norm.weight`` as ``w + norm_shift`` (Gemma's
        ``(1 + w)`` RMSNorm is stored as the multiplier itself); subtracted on import, as
        transformers does.
    """

    model_type: str
    architecture: str
    block: dict[str, str]
    config: Callable[[_Meta, dict], dict[str, Any]]
    permute_qk: bool = False
    norm_shift: float = 0.0


# ----------------------------------------------------------------------------- tensors


def dequantize(data: np.ndarray, tensor_type) -> np.ndarray:
    """GGUF tensor payload -> float32 array in numpy (row-major, HF ``[out, in]``) order.

    F32 / F16 are cast here; every other type goes through ``gguf.quants.dequantize``
    (tested against an independent decoder and transformers for Q4_0, Q4_1, Q8_0, BF16,
    Q4_K, Q5_K, Q6_K; IQ* and the rest are whatever the ``gguf`` package implements).

    Args:
      data: the tensor's bytes as ``GGUFReader`` exposes them: ``[..., row_bytes]`` uint8 for a
        block-quantized type, or the float array itself for F32/F16/BF16.
      tensor_type: a ``gguf.GGMLQuantizationType`` (or its int value).

    Returns:
      float32 array of the logical shape ``[..., row_elements]``.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType(int(tensor_type))
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.asarray(data).view(np.float16).astype(np.float32)
    out = gguf.quants.dequantize(np.ascontiguousarray(data), qtype)
    return np.asarray(out, dtype=np.float32)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``).

    Within each head, HF's rotate-half layout ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` becomes the
    interleaved ``[x_0, y_0, x_1, y_1, ...]`` GGML's RoPE expects. ``n_head`` is the number of
    heads the rows hold (query heads for Q, KV heads for K). Used to write test files and as the
    reference that :func:`unpermute_qk` inverts.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGML's interleaved rows back to HF's rotate-half rows.

    Works for ``[rows, in]`` weights and ``[rows]`` biases.
    """
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp tensor name -> HF name for ``arch`` (``None`` when its table has no entry).

    ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ``output.weight`` ->
    ``lm_head.weight``. The same llama.cpp name can mean different HF modules (``ffn_norm`` is
    Llama's ``post_attention_layernorm`` but Gemma 2's ``pre_feedforward_layernorm``).
    """
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    m = _BLOCK_NAME.match(stem)
    if m is None:
        hf = _GLOBAL_TENSORS.get(stem)
        return None if hf is None else f"{hf}.{suffix}"
    hf = _ARCHITECTURES[arch].block.get(m["kind"]) if arch in _ARCHITECTURES else None
    return None if hf is None else f"model.layers.{m['i']}.{hf}.{suffix}"


_BLOCK_NAME = re.compile(r"^blk\.(?P<i>\d+)\.(?P<kind>\w+)$")


# ----------------------------------------------------------------------------- metadata


def _metadata(reader) -> dict:
    """All key/value fields as plain Python values (token lists left as lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Meta:
    """A file's metadata read under its architecture's prefix: ``m("block_count")`` is
    ``meta["gemma2.block_count"]``; a missing key without a default is a one-line error."""

    raw: dict
    tensors: frozenset[str]

    @property
    def arch(self) -> str:
        return self.raw["general.architecture"]

    def __call__(self, key: str, default: Any = _REQUIRED) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.raw:
            return self.raw[full]
        if default is _REQUIRED:
            raise GGUFError(f"GGUF {self.arch}: metadata key {full!r} is missing")
        return default


def _llama_keys(m: _Meta, base: dict) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in m.tensors,
            "mlp_bias": "blk.0.ffn_up.bias" in m.tensors}


def _qwen2_keys(m: _Meta, base: dict) -> dict[str, Any]:
    return {"hidden_act": "silu"}  # Qwen2 always has q/k/v biases


def _qwen3_keys(m: _Meta, base: dict) -> dict[str, Any]:
    return {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in m.tensors,
            "use_sliding_window": False, "sliding_window": None}


def _olmo2_keys(m: _Meta, base: dict) -> dict[str, Any]:
    if m("attention.sliding_window", None) is not None:  # llama.cpp's olmo2 also carries OLMo 3
        raise GGUFError(f"GGUF olmo2: {m.arch}.attention.sliding_window (OLMo 3's local layers) is not "
                                  "supported (supported: OLMo 2, no sliding window)")
    return {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in m.tensors}


def _phi3_keys(m: _Meta, base: dict) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini: the rotary width is stated in dimensions, the window as 0 for "none"."""
    window = int(m("attention.sliding_window", 0))
    rope = dict(base["rope_parameters"],
                partial_rotary_factor=int(m("rope.dimension_count", base["head_dim"])) / base["head_dim"])
    return {"hidden_act": "silu", "rope_parameters": rope, "sliding_window": window or None,
            "original_max_position_embeddings": int(m("rope.scaling.original_context_length",
                                                      base["max_position_embeddings"]))}


def _gemma_keys(m: _Meta, base: dict) -> dict[str, Any]:
    return {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": "blk.0.attn_q.bias" in m.tensors}


def _layer_types(m: _Meta, pattern: int) -> list[str]:
    """Per-layer local/global from ``attention.sliding_window_pattern`` (a period or one flag per
    layer) or, when the file has none, llama.cpp's fixed period for the architecture: layer ``i``
    is local unless ``i % pattern == pattern - 1`` (llama.cpp's ``set_swa_pattern``)."""
    n = int(m("block_count"))
    stated = m("attention.sliding_window_pattern", pattern)
    if isinstance(stated, (list, tuple)):
        local = [bool(x) for x in stated]
    else:
        p = int(stated)
        local = [p == 0 or i % p < p - 1 for i in range(n)]
    if len(local) != n:
        raise GGUFError(f"GGUF {m.arch}: attention.sliding_window_pattern has {len(local)} entries for {n} layers")
    return ["sliding_attention" if x else "full_attention" for x in local]


def _query_pre_attn_scalar(m: _Meta, base: dict, layers_27b: int) -> int:
    """The file has no key for it: llama.cpp scales scores by ``head_dim ** -0.5``, except for the
    27B models (identified by their layer count), where it uses ``hidden / heads`` (Gemma's
    ``query_pre_attn_scalar`` of 144 / 168)."""
    if base["num_hidden_layers"] == layers_27b:
        return base["hidden_size"] // base["num_attention_heads"]
    return base["head_dim"]


def _gemma2_keys(m: _Meta, base: dict) -> dict[str, Any]:
    """Gemma 2: soft-caps and window as stated, else llama.cpp's defaults (50, 30, 4096); every
    other layer local."""
    return {**_gemma_keys(m, base), "query_pre_attn_scalar": _query_pre_attn_scalar(m, base, 46),
            "attn_logit_softcapping": float(m("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(m("final_logit_softcapping", 30.0)),
            "sliding_window": int(m("attention.sliding_window", 4096)), "layer_types": _layer_types(m, 2)}


def _gemma3_keys(m: _Meta, base: dict) -> dict[str, Any]:
    """Gemma 3 (text): 5 local : 1 global layers when the file states a window (all global
    otherwise); ``rope.freq_base`` is the global layers' base, ``rope.freq_base_swa`` the local
    ones' (llama.cpp's default 10000 when absent); a linear ``rope.scaling`` applies to the
    global layers only; no attention soft-cap, a final one only when stated."""
    full = {"rope_type": "default", "rope_theta": base["rope_theta"]}
    if m("rope.scaling.type", "none") == "linear":
        full.update(rope_type="linear", factor=float(m("rope.scaling.factor")))
    local = {"rope_type": "default", "rope_theta": float(m("rope.freq_base_swa", 10000.0))}
    window = int(m("attention.sliding_window", 0)) or None
    types = _layer_types(m, 6) if window else ["full_attention"] * base["num_hidden_layers"]
    cap = m("final_logit_softcapping", None)
    return {**_gemma_keys(m, base), "query_pre_attn_scalar": _query_pre_attn_scalar(m, base, 62),
            "attn_logit_softcapping": None, "final_logit_softcapping": None if cap is None else float(cap),
            "sliding_window": window, "layer_types": types,
            "rope_theta": None, "rope_parameters": {"full_attention": full, "sliding_attention": local}}


_ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", "LlamaForCausalLM", _LLAMA_BLOCK, _llama_keys, permute_qk=True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK, _qwen2_keys),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORMS}, _qwen3_keys),
    "gemma": _Arch("gemma", "GemmaForCausalLM", _LLAMA_BLOCK, _gemma_keys, norm_shift=1.0),
    "gemma2": _Arch("gemma2", "Gemma2ForCausalLM", _GEMMA2_BLOCK, _gemma2_keys, norm_shift=1.0),
    "gemma3": _Arch("gemma3_text", "Gemma3ForCausalLM", {**_GEMMA2_BLOCK, **_QK_NORMS}, _gemma3_keys,
                    norm_shift=1.0),
    "olmo2": _Arch("olmo2", "Olmo2ForCausalLM", _OLMO2_BLOCK, _olmo2_keys),
    "phi3": _Arch("phi3", "Phi3ForCausalLM", _PHI3_BLOCK, _phi3_keys),
}
# RoPE variants llama.cpp stores that jaxpref does not implement: frequency-factor tensors
# (Llama 3.1's `rope_freqs`, Phi-3 128k's LongRoPE factors) and scaling types other than these.
_ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_ROPE_SCALING = {"gemma3": ("none", "linear")}


def llama3_scaling_from_factors(factors: np.ndarray, rope_theta: float, rotary_dim: int) -> dict | None:
    """HF's ``rope_type: "llama3"`` parameters behind llama.cpp's ``rope_freqs.weight`` (Llama 3.1+).

    llama.cpp's converter stores, per rotary pair i, the divisor ``f_i`` of the frequency
    ``w_i = theta^(-2i/d)``: 1 for short wavelengths, ``factor`` for long ones, and between them
    ``1 / ((1 - s_i) / factor + s_i)`` with ``s_i = (L / wavelen_i - lo) / (hi - lo)`` (L the original
    context length; Meta's ``apply_scaling``). So ``factor = max f`` and ``s`` is affine in ``1 / wavelen``
    with slope ``L / (hi - lo)`` and intercept ``-lo / (hi - lo)``: two numbers for three parameters, and
    any choice of ``lo`` gives the same frequencies (the region's ends are where s is 0 and 1). We fit the
    line on the smoothed pairs, take ``lo = 1`` (Meta's value), round L to an integer and check that
    HF's formula reproduces every factor within 1e-5 relative.

    Returns None when every factor is 1 (no scaling).

    Raises:
      GGUFError: fewer than two smoothed pairs (the line is undetermined) or factors the llama3 rule
        does not reproduce.
    """
    f = np.asarray(factors, np.float64)
    inv = rope_theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if f.shape != inv.shape:
        raise GGUFError(f"GGUF: rope_freqs.weight has {f.size} factors, expected rotary_dim / 2 = {inv.size}")
    factor = float(f.max())
    if factor <= 1.0 + 1e-6:
        return None
    mid = (f > 1.0 + 1e-5) & (f < factor * (1.0 - 1e-5))
    if mid.sum() < 2:
        raise GGUFError(f"GGUF: rope_freqs.weight has {int(mid.sum())} smoothed pair(s); the llama3 scaling "
                        "parameters cannot be recovered from fewer than 2 (not supported)")
    smooth = (1.0 / f[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(inv[mid] / (2 * np.pi), smooth, 1)
    low = 1.0
    high = low - low / intercept  # intercept = -lo / (hi - lo)
    scaling = {"factor": factor, "low_freq_factor": low, "high_freq_factor": round(float(high), 6),
               "original_max_position_embeddings": int(round(slope * (high - low)))}
    wavelen = 2 * np.pi / inv
    length = scaling["original_max_position_embeddings"]
    s = np.clip((length / wavelen - low) / (high - low), 0.0, 1.0)
    redo = np.where(wavelen < length / high, 1.0,
                    np.where(wavelen > length / low, factor, 1.0 / ((1 - s) / factor + s)))
    if not np.allclose(redo, f, rtol=1e-5, atol=0):
        raise GGUFError(f"GGUF: rope_freqs.weight is not a llama3 frequency scaling (best fit {scaling} is off by "
                        f"{np.abs(redo / f - 1).max():.2g} relative; not supported)")
    return scaling


def hf_config_from_metadata(meta: dict, tensor_names: set[str], rope_freqs: np.ndarray | None = None) -> dict:
    """The ``config.json`` dict of the HF model the file was converted from.

    Where transformers' GGUF loader reads a key, the value is the one it reads. Where the
    converter stores something transformers does not read back (Gemma 2's soft-caps, Gemma 3's
    local RoPE base and layer pattern, Phi-3's rotary width and window, Qwen3's ``head_dim``),
    it is taken from the file; where the file has no key at all, from llama.cpp's own rule
    (Gemma's ``query_pre_attn_scalar``, its layer pattern and default caps / window).

    Args:
      meta: GGUF metadata (``general.architecture``, ``{arch}.block_count``, ...).
      tensor_names: names of the file's tensors (decides tied embeddings and biases).
      rope_freqs: the values of ``rope_freqs.weight`` when the file has it (Llama 3.1+ RoPE scaling,
        :func:`llama3_scaling_from_factors`; architecture ``llama`` only).

    Raises:
      GGUFError: an architecture or RoPE variant jaxpref does not implement, or a missing key.
    """
    arch = meta["general.architecture"]
    if arch not in _ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
    m = _Meta(meta, frozenset(tensor_names))
    for name in _ROPE_FACTOR_TENSORS:
        if name == "rope_freqs.weight" and arch == "llama" and rope_freqs is not None:
            continue  # llama3 scaling, recovered below
        if name in tensor_names:
            raise GGUFError(f"GGUF {arch}: tensor {name!r} (RoPE frequency factors: Llama 3.1 / "
                                      "LongRoPE scaling) is not supported")
    scaling = m("rope.scaling.type", "none")
    if scaling not in _ROPE_SCALING.get(arch, ("none",)):
        raise GGUFError(f"GGUF {arch}: {arch}.rope.scaling.type {scaling!r} is not supported "
                                  f"(supported: {list(_ROPE_SCALING.get(arch, ('none',)))})")

    n_heads = int(m("attention.head_count"))
    hidden = int(m("embedding_length"))
    vocab = m("vocab_size", None)
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    rope_theta = float(m("rope.freq_base", 10000.0))
    spec = _ARCHITECTURES[arch]
    config = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(m("attention.head_count_kv", n_heads)),
        "head_dim": int(m("attention.key_length", hidden // n_heads)),
        "max_position_embeddings": int(m("context_length", 2048)),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "dtype": "float32",
    }
    config.update(spec.config(m, config))
    if arch == "llama" and rope_freqs is not None:
        rotary_dim = int(m("rope.dimension_count", config["head_dim"]))
        scaling = llama3_scaling_from_factors(rope_freqs, rope_theta, rotary_dim)
        if scaling is not None:
            config["rope_parameters"] = {"rope_theta": rope_theta, "rope_type": "llama3", **scaling}
    if config["rope_theta"] is None:  # per-layer-type rope_parameters only (Gemma 3)
        del config["rope_theta"]
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    return config


# ----------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(path: str | os.PathLike):
    """The GGUF's tokenizer (:func:`convert_tokenizer`), through :mod:`jaxpref.models.gguf_cache`."""
    from jaxpref.models import gguf_cache

    return gguf_cache.tokenizer(path, convert_tokenizer)


def convert_tokenizer(path: str | os.PathLike):
    """The GGUF's tokenizer as a ``transformers`` fast tokenizer, chat template included.

    Built by transformers' GGUF tokenizer converter from the file's vocab, merges, token types
    (control -> special tokens, user-defined -> added tokens), special token ids, ``add_bos``
    flags and ``tokenizer.chat_template``; it tokenizes exactly as
    ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` does, without that call's second,
    slow pass over the file to build a model config.

    Returns ``None`` when the file has no tokenizer metadata.
    """
    from transformers import PreTrainedTokenizerFast

    path = pathlib.Path(path).resolve()
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers < 5.x keeps the converter elsewhere; use the public route
        return _auto_tokenizer(path)
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    if "tokens" not in tokenizer_dict:
        return None
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _auto_tokenizer(path: pathlib.Path):
    """``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` on a lone link to ``path``.

    The link keeps tokenizer files lying next to the GGUF from taking precedence.
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, pathlib.Path(tmp) / path.name)
        return AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)


# ----------------------------------------------------------------------------- public API


def read_gguf_tensors(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(hf_config, state_dict)``: float32 numpy weights under HF names and layout.

    Raises:
      GGUFError: unsupported architecture or option, or a tensor the name table does not know.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    rope_freqs = dequantize(freqs[0].data, freqs[0].tensor_type).reshape(-1) if freqs else None
    config = hf_config_from_metadata(meta, names, rope_freqs)
    arch = meta["general.architecture"]
    spec = _ARCHITECTURES[arch]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    state_dict: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight" and rope_freqs is not None and arch == "llama":
            continue  # folded into the config's rope_parameters
        hf_name = hf_tensor_name(tensor.name, arch)
        if hf_name is None:
            raise GGUFError(f"GGUF {arch}: tensor {tensor.name!r} has no HF mapping")
        # ggml lists dims fastest-first; numpy (and HF) want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        value = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if spec.permute_qk and kind in heads:
            value = unpermute_qk(value, heads[kind])
        if spec.norm_shift and tensor.name.endswith("norm.weight"):
            value = value - np.float32(spec.norm_shift)
        state_dict[hf_name] = np.ascontiguousarray(value, dtype=np.float32)

    if config["vocab_size"] is None:
        config["vocab_size"] = int(state_dict["model.embed_tokens.weight"].shape[0])
    return config, state_dict


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], object]:
    """Read a GGUF file into ``(hf_config, state_dict, tokenizer)``.

    Args:
      path: a ``.gguf`` file (architectures ``llama`` -- incl. Mistral/SmolLM --, ``qwen2``,
        ``qwen3``, ``gemma``, ``gemma2``, ``gemma3`` (text), ``olmo2``, ``phi3``).

    Returns:
      hf_config: dict in transformers' ``config.json`` form (``model_type``, ``hidden_size``, ...;
        ``tie_word_embeddings`` is true when the file has no ``output.weight``).
      state_dict: ``{hf_name: float32 ndarray}`` in HF naming and ``[out, in]`` layout;
        ``lm_head.weight`` is absent when embeddings are tied.
      tokenizer: a ``transformers`` fast tokenizer (with ``chat_template``), or ``None``.
    """
    from jaxpref.models import gguf_cache

    config, state_dict = gguf_cache.tensors(path, read_gguf_tensors)
    return config, state_dict, gguf_tokenizer(path)


def gguf_to_hf_dir(path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write an HF checkpoint directory (``config.json``, ``model.safetensors``, tokenizer).

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` and
    with :func:`jaxpref.models.hf_io.load_hf`.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, state_dict, tokenizer = read_gguf(path)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    log.info("wrote %s (%d tensors) from %s", out, len(state_dict), path)
    return out


def load_gguf(
    path: str | os.PathLike,
    *,
    mesh=None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    with_tokenizer: bool = True,
    **config_overrides,
):
    """A jaxpref model and its tokenizer from a GGUF file: ``(model, tokenizer)`` (tokenizer ``None`` with
    ``with_tokenizer=False``).

    The weights are dequantized to float32 (:func:`read_gguf`), then loaded through the
    family's HF key table (:func:`jaxpref.models.hf_io.params_from_hf`), so the model sees
    exactly the weights and config transformers would load from the file.

    Args:
      path: the ``.gguf`` file.
      mesh: shard parameters on this mesh while loading (None: one device).
      dtype: compute dtype (default float32).
      param_dtype: storage dtype (default float32).
      **config_overrides: further :class:`~jaxpref.models.config.ModelConfig` fields
        (e.g. ``remat=True``).
    """
    from jaxpref.models import gguf_cache, hf_io
    from jaxpref.models.config import ModelConfig

    hf_config, state_dict = gguf_cache.tensors(path, read_gguf_tensors)
    tokenizer = gguf_tokenizer(path) if with_tokenizer else None
    overrides = dict(config_overrides)
    overrides.update({k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None})
    config = ModelConfig.from_hf_config(hf_config, **overrides)
    return hf_io.params_from_hf(config, state_dict, mesh=mesh), tokenizer


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m jaxpref.models.gguf_io SRC.gguf OUT_DIR``."""
    parser = argparse.ArgumentParser(
        description="Convert a llama.cpp GGUF file to a Hugging Face checkpoint directory.")
    parser.add_argument("src", help="input .gguf file")
    parser.add_argument("out_dir", help="output directory (config.json, model.safetensors, tokenizer files)")
    args = parser.parse_args(argv)
    from jaxpref import cli

    try:
        out = gguf_to_hf_dir(args.src, args.out_dir)
    except cli.expected_errors() as err:
        cli.fail(err)  # one line, no traceback
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
