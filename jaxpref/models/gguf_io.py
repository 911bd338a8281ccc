"""Import llama.cpp GGUF checkpoints as Hugging Face-layout weights (and jaxpref models).

A GGUF file holds the model config as metadata (``llama.block_count``, ...), the tokenizer as
metadata (``tokenizer.ggml.tokens``, ``merges``, ``token_type``, special ids, chat template)
and the tensors under llama.cpp's names, often block-quantized (Q4_0, Q4_1, Q8_0, K-quants).
This module turns one into exactly what ``transformers`` would load from the same file::

    hf_config, state_dict, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf_to_hf_dir("model.gguf", "out/")          # config.json + model.safetensors + tokenizer
    model, tokenizer = load_gguf("model.gguf")    # a jaxpref model (through hf_io)

or from the shell: ``python -m jaxpref.models.gguf_io SRC.gguf OUT_DIR``.

The tensor path is ours (``gguf.GGUFReader`` + numpy): dequantize to float32, rename with a
declarative table, and undo the row permutation llama.cpp's ``convert_hf_to_gguf.py`` applies
to the Q and K projections of Llama-architecture models (it reorders RoPE's interleaved pairs
into GGML's layout). The tokenizer is rebuilt by ``transformers``' own GGUF tokenizer converter
so that it tokenizes exactly as ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does.
Dequantized weights are what the quantized model computes with; they are not the original
full-precision weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import tempfile

import numpy as np

log = logging.getLogger(__name__)

# Architectures whose tensors and metadata we map to a transformers ``model_type``.
# ``permute_qk``: llama.cpp's LlamaModel converter permutes Q/K rows; Qwen2's does not.
_ARCHITECTURES: dict[str, dict] = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "permute_qk": True},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "permute_qk": False},
}

# llama.cpp tensor name -> HF name, `{i}` being the block index. Suffix (.weight/.bias) is kept.
_TENSOR_NAMES: tuple[tuple[str, str], ...] = (
    (r"token_embd", "model.embed_tokens"),
    (r"output_norm", "model.norm"),
    (r"output", "lm_head"),
    (r"blk\.(\d+)\.attn_norm", "model.layers.{i}.input_layernorm"),
    (r"blk\.(\d+)\.attn_q", "model.layers.{i}.self_attn.q_proj"),
    (r"blk\.(\d+)\.attn_k", "model.layers.{i}.self_attn.k_proj"),
    (r"blk\.(\d+)\.attn_v", "model.layers.{i}.self_attn.v_proj"),
    (r"blk\.(\d+)\.attn_output", "model.layers.{i}.self_attn.o_proj"),
    (r"blk\.(\d+)\.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
    (r"blk\.(\d+)\.ffn_gate", "model.layers.{i}.mlp.gate_proj"),
    (r"blk\.(\d+)\.ffn_up", "model.layers.{i}.mlp.up_proj"),
    (r"blk\.(\d+)\.ffn_down", "model.layers.{i}.mlp.down_proj"),
)
_TENSOR_PATTERNS = tuple((re.compile(rf"^{p}\.(weight|bias)$"), hf) for p, hf in _TENSOR_NAMES)


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


def hf_tensor_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF Llama name (``None`` when the table has no entry)."""
    for pattern, hf in _TENSOR_PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            groups = m.groups()
            name = hf.format(i=groups[0]) if len(groups) == 2 else hf
            return f"{name}.{groups[-1]}"
    return None


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


def hf_config_from_metadata(meta: dict, tensor_names: set[str]) -> dict:
    """The ``config.json`` dict transformers builds from the same GGUF metadata.

    Args:
      meta: GGUF metadata (``general.architecture``, ``{arch}.block_count``, ...).
      tensor_names: names of the file's tensors (decides tied embeddings and biases).
    """
    arch = meta["general.architecture"]
    if arch not in _ARCHITECTURES:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
    if "rope_freqs.weight" in tensor_names or f"{arch}.rope.scaling.type" in meta:
        # Llama-3.1-style RoPE scaling lives in a `rope_freqs` tensor GGUF keeps instead of the
        # HF `rope_scaling` parameters; rebuilding those is not implemented.
        raise NotImplementedError("GGUF files with RoPE scaling (rope_freqs / rope.scaling.*) are not supported")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    vocab = get("vocab_size")
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    rope_theta = float(get("rope.freq_base", 10000.0))
    spec = _ARCHITECTURES[arch]
    config = {
        "architectures": list(spec["architectures"]),
        "model_type": spec["model_type"],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "dtype": "float32",
    }
    if arch == "qwen2":
        del config["attention_bias"], config["mlp_bias"]  # Qwen2 always has q/k/v biases
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    return config


# ----------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(path: str | os.PathLike):
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
      NotImplementedError: unsupported architecture, or a tensor the name table does not know.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config_from_metadata(meta, names)
    permute = _ARCHITECTURES[meta["general.architecture"]]["permute_qk"]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    state_dict: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is None:
            raise NotImplementedError(f"GGUF tensor {tensor.name!r} has no HF mapping")
        # ggml lists dims fastest-first; numpy (and HF) want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        value = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if permute and kind in heads:
            value = unpermute_qk(value, heads[kind])
        state_dict[hf_name] = np.ascontiguousarray(value, dtype=np.float32)

    if config["vocab_size"] is None:
        config["vocab_size"] = int(state_dict["model.embed_tokens.weight"].shape[0])
    return config, state_dict


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray], object]:
    """Read a GGUF file into ``(hf_config, state_dict, tokenizer)``.

    Args:
      path: a ``.gguf`` file (architectures ``llama`` -- incl. Mistral/SmolLM -- and ``qwen2``).

    Returns:
      hf_config: dict in transformers' ``config.json`` form (``model_type``, ``hidden_size``, ...;
        ``tie_word_embeddings`` is true when the file has no ``output.weight``).
      state_dict: ``{hf_name: float32 ndarray}`` in HF naming and ``[out, in]`` layout;
        ``lm_head.weight`` is absent when embeddings are tied.
      tokenizer: a ``transformers`` fast tokenizer (with ``chat_template``), or ``None``.
    """
    config, state_dict = read_gguf_tensors(path)
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
    **config_overrides,
):
    """A jaxpref model and its tokenizer from a GGUF file: ``(model, tokenizer)``.

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
    from jaxpref.models import hf_io
    from jaxpref.models.config import ModelConfig

    hf_config, state_dict, tokenizer = read_gguf(path)
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
    out = gguf_to_hf_dir(args.src, args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
