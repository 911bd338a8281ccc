"""llama2.c checkpoints (``stories260K.bin``) and their ``tok512.bin`` tokenizer.

The "legacy" llama2.c export is 7 little-endian int32 (``dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, max_seq_len``; a negative vocab size means an untied classifier)
followed by float32 tensors stored ``(out, in)``: token embedding, attention RMS weights,
wq, wk, wv, wo, FFN RMS weights, w1 (gate), w2 (down), w3 (up), final RMS weight, two unused
RoPE tables, then the classifier when untied.

llama2.c rotates *interleaved* pairs ``(2j, 2j+1)`` of each head; Hugging Face Llama (and
jaxpref) rotate ``(j, j + hd/2)``. Since attention scores are invariant to a common
permutation of q and k dims, permuting the rows of Wq and Wk inside each head to
``[0, 2, 4, ..., 1, 3, 5, ...]`` gives the rotate-half model exactly. The converted tensors
use HF names and go through the generic loader (:func:`jaxpref.models.hf_io.params_from_hf`).

Usage::

    model = load_llama2c("stories260K.bin")
    tok = Llama2cTokenizer.from_file("tok512.bin")
    ids = tok.encode("Once upon a time")          # [1, 403, 407, 261, 378]
    llama2c_to_hf("stories260K.bin", "out_dir")    # config.json + model.safetensors
"""

from __future__ import annotations

import os
import pathlib
import struct

import numpy as np

from jaxpref.models.config import Family, ModelConfig
from jaxpref.models.hf_io import params_from_hf, save_hf
from jaxpref.models.transformer import CausalLM

BOS_ID, EOS_ID = 1, 2
_BYTE_OFFSET = 3  # byte b is token b + 3 (after <unk>, BOS, EOS)


def rotate_half_permutation(head_dim: int) -> np.ndarray:
    """Row order taking interleaved RoPE pairs to rotate-half pairs: ``[0, 2, ..., 1, 3, ...]``."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _permute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permutes the rows of ``w [n_heads * hd, D]`` inside each head (interleaved -> rotate-half)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd, -1)[:, rotate_half_permutation(hd)].reshape(w.shape)


def read_llama2c(path: str | os.PathLike, **config_overrides) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Reads a legacy llama2.c checkpoint as a Llama config plus HF-named float32 tensors.

    Args:
      path: the ``.bin`` file.
      **config_overrides: e.g. ``dtype="bfloat16"``.

    Returns:
      (config, {HF key: array}) with Wq / Wk rows permuted to the rotate-half layout.
    """
    raw = pathlib.Path(path).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, max_len = struct.unpack("<7i", raw[:28])
    shared, vocab = vocab > 0, abs(vocab)
    hd = dim // n_heads
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    shapes = [("emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, n_heads * hd, dim)),
              ("wk", (n_layers, n_kv * hd, dim)), ("wv", (n_layers, n_kv * hd, dim)),
              ("wo", (n_layers, dim, n_heads * hd)), ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
              ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
              ("freq_real", (max_len, hd // 2)), ("freq_imag", (max_len, hd // 2))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    w, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        if offset + size > data.size:
            raise ValueError(f"{path}: truncated llama2.c checkpoint while reading {name} {shape}")
        w[name] = data[offset: offset + size].reshape(shape)
        offset += size
    if offset != data.size:
        raise ValueError(f"{path}: {data.size - offset} trailing floats; not a legacy llama2.c checkpoint "
                         f"with header {(dim, hidden, n_layers, n_heads, n_kv, vocab, max_len)}")

    config = ModelConfig(
        Family.LLAMA, vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=n_layers,
        num_heads=n_heads, num_kv_heads=n_kv, head_dim=hd, norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=shared, max_position_embeddings=max_len, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        **config_overrides)
    t = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"]}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = w["rms_att"][i]
        t[f"{p}.post_attention_layernorm.weight"] = w["rms_ffn"][i]
        t[f"{p}.self_attn.q_proj.weight"] = _permute_heads(w["wq"][i], n_heads)
        t[f"{p}.self_attn.k_proj.weight"] = _permute_heads(w["wk"][i], n_kv)
        t[f"{p}.self_attn.v_proj.weight"] = w["wv"][i]
        t[f"{p}.self_attn.o_proj.weight"] = w["wo"][i]
        t[f"{p}.mlp.gate_proj.weight"] = w["w1"][i]
        t[f"{p}.mlp.down_proj.weight"] = w["w2"][i]
        t[f"{p}.mlp.up_proj.weight"] = w["w3"][i]
    if not shared:
        t["lm_head.weight"] = w["wcls"]
    return config, {k: np.ascontiguousarray(v) for k, v in t.items()}


def load_llama2c(path: str | os.PathLike, *, mesh=None, **config_overrides) -> CausalLM:
    """A jaxpref Llama from a legacy llama2.c checkpoint (see :func:`read_llama2c`)."""
    config, tensors = read_llama2c(path, **config_overrides)
    return params_from_hf(config, tensors, mesh=mesh)


def llama2c_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes a Hugging Face Llama directory (``config.json`` + ``model.safetensors``); no tokenizer."""
    return save_hf(load_llama2c(path), out_dir)


class Llama2cTokenizer:
    """llama2.c's BPE tokenizer (``tok512.bin``), reproducing ``run.c``'s encode/decode.

    Args:
      pieces: the byte string of each id.
      scores: merge priority of each piece (higher merges first).
    """

    def __init__(self, pieces: list[bytes], scores: list[float]):
        self.pieces, self.scores = pieces, scores
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._ids.setdefault(piece, i)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Llama2cTokenizer:
        """Reads ``tok*.bin``: int32 max length, then per id float32 score, int32 length, bytes."""
        raw = pathlib.Path(path).read_bytes()
        offset, pieces, scores = 4, [], []
        while offset < len(raw):
            score, n = struct.unpack_from("<fi", raw, offset)
            pieces.append(raw[offset + 8: offset + 8 + n])
            scores.append(score)
            offset += 8 + n
        return cls(pieces, scores)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text -> ids: BOS, dummy-prefix space, per-character pieces (byte fallback), greedy best-score merges."""
        ids: list[int] = [BOS_ID] if bos else []
        tokens: list[int] = []
        if text:
            tokens.append(self._ids[b" "])
        for ch in text:
            piece = ch.encode("utf-8")
            if piece in self._ids:
                tokens.append(self._ids[piece])
            else:
                tokens.extend(b + _BYTE_OFFSET for b in piece)
        while True:
            best, best_score = None, -float("inf")
            for i in range(len(tokens) - 1):
                merged = self._ids.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score = (i, merged), self.scores[merged]
            if best is None:
                break
            i, merged = best
            tokens[i: i + 2] = [merged]
        return ids + tokens + ([EOS_ID] if eos else [])

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Ids -> text: BOS/EOS dropped, the space after BOS dropped, ``<0xXX>`` pieces as raw bytes."""
        out, prev = bytearray(), BOS_ID
        for token in (int(t) for t in ids):
            if token in (BOS_ID, EOS_ID):
                prev = token
                continue
            piece = self.pieces[token]
            if prev == BOS_ID and piece.startswith(b" "):
                piece = piece[1:]
            if _BYTE_OFFSET <= token < _BYTE_OFFSET + 256:
                piece = bytes([token - _BYTE_OFFSET])
            out += piece
            prev = token
        return out.decode("utf-8", errors="replace")
