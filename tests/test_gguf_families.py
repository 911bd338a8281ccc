"""GGUF import of Qwen3, Gemma, Gemma 2, Gemma 3 (text), OLMo 2 and Phi-3 against independent references.

Each tiny preset is built as a random transformers model (``jaxpref.testing.hf_factory``: norms
perturbed away from their init) and written to a GGUF file here the way llama.cpp's
``convert_hf_to_gguf.py`` writes that architecture, independently of ``gguf_io``'s tables: tensor
names from gguf-py's own ``TensorNameMap``, every Gemma ``*norm.weight`` stored as ``w + 1``, the
metadata keys each converter writes (and only those: Gemma 2 gets no RoPE base, Phi-3 its rotary
width in dimensions and no ``key_length``), float32 tensors (quantized payloads are covered by
``test_gguf_io.py``). References:

* the source model (every family): the imported state dict is its state dict (Gemma norms to the
  rounding of ``(w + 1) - 1``), the imported config is its config (``ModelConfig`` equality), and
  the jaxpref model's logits are its logits (<= 1e-4, float32, right-padded batch, T = 12 > window 4);
* transformers' own GGUF loader, for the architectures it reads (qwen3, gemma2, gemma3, phi3; not
  olmo2, gemma): the same state dict, bit for bit, and the same value for every config key it reads
  from the file. The keys it leaves at its config class's defaults although the file states them
  (``TRANSFORMERS_GGUF_GAPS``) are handed to it, and then its logits equal ours too;
* transformers on the directory ``gguf_to_hf_dir`` writes: the source model's class and logits.

Config-only cases pin llama.cpp's rules for what the file does not state (Gemma's
``query_pre_attn_scalar``, its local/global pattern, Gemma 2's default caps and window) on the
full-size presets, and unsupported architectures / options raise one line naming what is supported.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from jaxpref.models import ModelConfig, gguf_io, presets  # noqa: E402
from jaxpref.testing.tokenizers import GGUF_BPE_VOCAB, add_gguf_bpe_tokenizer  # noqa: E402

pytestmark = pytest.mark.torch

# llama.cpp architecture per tiny preset; ids 1 / 2 / 2 are the tokenizer helper's BOS / EOS / PAD
FAMILIES = {"tiny_qwen3": "qwen3", "tiny_gemma": "gemma", "tiny_gemma2": "gemma2", "tiny_gemma3": "gemma3",
            "tiny_olmo2": "olmo2", "tiny_phi3": "phi3"}
GEMMAS = ("gemma", "gemma2", "gemma3")
# Config keys transformers' GGUF reader (transformers/integrations/ggml.py) does not take from the file.
TRANSFORMERS_GGUF_GAPS = {
    "qwen3": ("head_dim",),  # no attention.key_length entry: Qwen3Config's 128
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
    "gemma3": ("query_pre_attn_scalar", "layer_types", "rope_parameters"),
    # rope.dimension_count (partial rotary), the window and rope.scaling.original_context_length are dropped
    "phi3": ("rope_parameters", "sliding_window", "original_max_position_embeddings"),
}


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    from jaxpref.testing.models import fast_compile

    with fast_compile():
        yield


def _preset(name: str) -> ModelConfig:
    """The tiny preset with the helper tokenizer's vocabulary and ids. Gemma 2/3 score with
    ``head_dim ** -0.5``: a GGUF cannot state another ``query_pre_attn_scalar`` (llama.cpp derives it)."""
    config = presets.get_preset(name, vocab_size=GGUF_BPE_VOCAB, pad_token_id=2)
    if config.query_pre_attn_scalar is not None:
        config = config.replace(query_pre_attn_scalar=config.head_dim)
    return config


def _as_stored(config: ModelConfig) -> ModelConfig:
    """``config`` as a GGUF carries it: the norm epsilon is a float32 key (1e-6 -> 9.99999997e-07), which
    transformers' reader (and so ours) takes as is."""
    return config.replace(norm_eps=float(np.float32(config.norm_eps)))


# ----------------------------------------------------------------------------- llama.cpp's converter, here


def _write_metadata(w, hf: dict, arch: str) -> None:
    """What ``convert_hf_to_gguf.py`` writes for ``arch`` from an HF ``config.json`` dict (v5 spelling)."""
    rope = hf["rope_parameters"]
    full = rope.get("full_attention", rope)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    if arch not in ("gemma", "gemma2"):  # GemmaModel / Gemma2Model write no RoPE base (llama.cpp: 10000)
        w.add_rope_freq_base(full["rope_theta"])
    if arch == "phi3":  # Phi3MiniModel: its own key set, the rotary width in dimensions, 0 = no window
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(partial * hidden) // heads)
        w.add_rope_scaling_orig_ctx_len(hf.get("original_max_position_embeddings", hf["max_position_embeddings"]))
        w.add_sliding_window(hf["sliding_window"] or 0)
    elif "head_dim" in hf:
        w.add_key_length(hf["head_dim"])
        w.add_value_length(hf["head_dim"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hf["final_logit_softcapping"])
        w.add_sliding_window(hf["sliding_window"])
    if arch == "gemma3":
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        if hf.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hf["final_logit_softcapping"])
        w.add_sliding_window(hf["sliding_window"])
        # llama.cpp's converter states no pattern (its loader assumes 5 local : 1 global); the tiny model's
        # 2 layers are [local, global], which this per-layer key states
        w.add_sliding_window_pattern([t == "sliding_attention" for t in hf["layer_types"]])


def write_llama_cpp_gguf(path, hf_model, arch: str) -> None:
    """An HF model -> GGUF, F32, named by gguf-py's ``TensorNameMap`` for ``arch``."""
    hf = hf_model.config.to_dict()
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w, hf, arch)
    add_gguf_bpe_tokenizer(w)
    model_arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(model_arch, hf["num_hidden_layers"])
    for hf_name, value in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and hf["tie_word_embeddings"]:
            continue  # tied: the checkpoint has no head
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        data = value.numpy().astype(np.float32)
        if arch in GEMMAS and name.endswith("norm.weight"):
            data = data + np.float32(1.0)  # GemmaModel / Gemma2Model / Gemma3Model: the (1 + w) multiplier
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _padded_batch(vocab: int):
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), np.int32)
    mask[1, 8:] = 0  # right padding
    return ids, mask


def _torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """preset name -> (source torch model, GGUF path, source logits on the padded batch), built once."""
    from jaxpref.testing.hf_factory import make_hf_model

    torch.set_num_threads(1)
    built = {}

    def get(name):
        if name not in built:
            hf_model = make_hf_model(_preset(name))
            path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
            write_llama_cpp_gguf(path, hf_model, FAMILIES[name])
            built[name] = hf_model, path, _torch_logits(hf_model, *_padded_batch(GGUF_BPE_VOCAB))
        return built[name]

    return get


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_the_source(family, name):
    hf_model, path, _ = family(name)
    config, sd = gguf_io.read_gguf_tensors(path)
    want = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        want.pop("lm_head.weight")
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
        assert sd[k].dtype == np.float32 and sd[k].shape == v.shape, k
        if FAMILIES[name] in GEMMAS and k.endswith("norm.weight"):
            # (w + 1) - 1 in float32, |w + 1| < 2: within half an ulp of 2, 2 ** -23
            np.testing.assert_allclose(sd[k], v, rtol=0, atol=2.0 ** -23, err_msg=k)
        else:
            np.testing.assert_array_equal(sd[k], v, err_msg=k)
    assert ModelConfig.from_hf_config(config) == _as_stored(_preset(name))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_source_and_transformers_gguf(family, name, tmp_path):
    """``load_gguf``'s model against the source model and (where it reads the architecture) the model
    transformers loads from the same file, given the config keys it does not read."""
    import jax
    from flax import nnx
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_model, path, want = family(name)
    model, tok = gguf_io.load_gguf(path)
    assert tok.eos_token == "<|im_end|>" and tok(" t")["input_ids"] == [GGUF_BPE_VOCAB - 1]
    ids, mask = _padded_batch(GGUF_BPE_VOCAB)
    valid = mask.astype(bool)
    forward = jax.jit(lambda g, s, x, m: nnx.merge(g, s)(x, segment_ids=m, return_logits=True).logits,
                      static_argnums=0)
    got = np.asarray(forward(*nnx.split(model), ids, mask))
    assert np.abs(want[valid]).std() > 0.5
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-4)

    arch = FAMILIES[name]
    if arch not in TRANSFORMERS_GGUF_GAPS:
        return
    ours, sd = gguf_io.read_gguf_tensors(path)
    plain = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    gaps = TRANSFORMERS_GGUF_GAPS[arch]
    shared = (set(ours) & set(plain)) - set(gaps) - {"architectures", "dtype"}
    assert {k: ours[k] for k in shared} == {k: plain[k] for k in shared}
    assert shared >= {"vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
                      "tie_word_embeddings", "eos_token_id"}
    cfg = AutoConfig.for_model(plain.pop("model_type"), **{**plain, **{k: ours[k] for k in gaps}})
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=cfg,
                                                  dtype=torch.float32, attn_implementation="eager").eval()
    their_sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
    if ours["tie_word_embeddings"]:
        their_sd.pop("lm_head.weight")
    assert sorted(sd) == sorted(their_sd)
    for k in sd:
        np.testing.assert_array_equal(sd[k], their_sd[k], err_msg=k)
    np.testing.assert_allclose(got[valid], _torch_logits(theirs, ids, mask)[valid], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_converted_directory_is_the_source_model_for_transformers(family, name, tmp_path):
    """``gguf_to_hf_dir`` (the CLI): transformers loads the directory as the source model -- the config
    dict is a valid transformers config of that model, not only one jaxpref reads."""
    from transformers import AutoModelForCausalLM

    hf_model, path, want = family(name)
    out = gguf_io.gguf_to_hf_dir(path, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    ids, mask = _padded_batch(GGUF_BPE_VOCAB)
    valid = mask.astype(bool)
    np.testing.assert_allclose(_torch_logits(reloaded, ids, mask)[valid], want[valid], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- llama.cpp's rules, full size


def _config_from(preset: ModelConfig, arch: str, tmp_path, drop: tuple[str, ...] = ()) -> ModelConfig:
    """A metadata-only GGUF written from ``preset``'s HF config the converter's way, minus the keys in
    ``drop`` (``{arch}.`` omitted), read back to a ``ModelConfig``."""
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    _write_metadata(w, preset.to_hf_config(), arch)
    for key in drop:
        del w.kv_data[0][f"{arch}.{key}"]
    w.add_vocab_size(preset.vocab_size)
    for add, token_id in ((w.add_bos_token_id, preset.bos_token_id), (w.add_eos_token_id, preset.eos_token_id),
                          (w.add_pad_token_id, preset.pad_token_id)):
        if token_id is not None:
            add(token_id)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = gguf_io._metadata(gguf.GGUFReader(str(path)))
    names = {"token_embd.weight"} | (set() if preset.tie_word_embeddings else {"output.weight"})
    return ModelConfig.from_hf_config(gguf_io.hf_config_from_metadata(meta, names))


def _full(name: str, **overrides) -> ModelConfig:
    return presets.get_preset(name, param_dtype="float32", dtype="float32", **overrides)


@pytest.mark.parametrize("name, arch, drop", [
    ("qwen3_0_6b", "qwen3", ()),
    ("olmo2_1b", "olmo2", ()),
    ("phi3_mini", "phi3", ()),
    # no pattern / local base in the file: llama.cpp's every-6th-layer-global and 10000
    ("gemma3_1b", "gemma3", ("attention.sliding_window_pattern", "rope.freq_base_swa")),
    # no caps / window in the file: llama.cpp's defaults, Gemma 2's published 50 / 30 / 4096
    ("gemma2_2b", "gemma2", ("attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window")),
])
def test_full_size_configs_round_trip(name, arch, drop, tmp_path):
    """The public configs survive the converter's metadata, including what the file does not state;
    query_pre_attn_scalar is never stated (llama.cpp: head_dim, 256 here)."""
    assert _config_from(_full(name), arch, tmp_path, drop) == _as_stored(_full(name))


def test_gemma2_27b_query_scale(tmp_path):
    """The 27B Gemma 2 (46 layers) scales scores by (hidden / heads) ** -0.5 in llama.cpp: its published
    query_pre_attn_scalar is 144 = 4608 / 32, not head_dim 128."""
    big = _full("gemma2_2b", num_layers=46, hidden_size=4608, intermediate_size=36864, num_heads=32, num_kv_heads=16,
                head_dim=128, layer_types=presets._alternating(46, 2), query_pre_attn_scalar=144)
    assert _config_from(big, "gemma2", tmp_path) == _as_stored(big)
    assert _config_from(big.replace(num_layers=42, layer_types=presets._alternating(42, 2)), "gemma2",
                        tmp_path).query_pre_attn_scalar == 128


# ----------------------------------------------------------------------------- errors


def _meta(arch: str, **keys) -> dict:
    base = {"block_count": 2, "embedding_length": 32, "feed_forward_length": 64, "attention.head_count": 4,
            "context_length": 64, "attention.sliding_window": 4}
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in {**base, **keys}.items()}}


@pytest.mark.parametrize("meta, tensors, match", [
    (_meta("gpt2"), (), r"GGUF architecture 'gpt2' is not supported \(supported: \[.*'gemma3'.*'phi3'.*\]\)"),
    (_meta("olmo2"), (), r"GGUF olmo2: olmo2.attention.sliding_window \(OLMo 3's local layers\) is not supported"),
    (_meta("gemma2", **{"rope.scaling.type": "linear"}), (),
     r"GGUF gemma2: gemma2.rope.scaling.type 'linear' is not supported \(supported: \['none'\]\)"),
    (_meta("gemma3", **{"rope.scaling.type": "yarn"}), (),
     r"GGUF gemma3: gemma3.rope.scaling.type 'yarn' is not supported \(supported: \['none', 'linear'\]\)"),
    (_meta("phi3"), ("rope_factors_long.weight",), r"GGUF phi3: tensor 'rope_factors_long.weight' .*LongRoPE"),
    (_meta("gemma3", **{"attention.sliding_window_pattern": [True]}), (),
     r"GGUF gemma3: attention.sliding_window_pattern has 1 entries for 2 layers"),
])
def test_unsupported_architectures_and_options(meta, tensors, match):
    from jaxpref import cli

    with pytest.raises(gguf_io.GGUFError, match=match) as info:
        gguf_io.hf_config_from_metadata(meta, {"token_embd.weight", *tensors})
    assert "\n" not in str(info.value)
    assert isinstance(info.value, cli.expected_errors())  # the scripts print it as one line


def test_unmapped_tensor_names_the_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "phi3")
    _write_metadata(w, _preset("tiny_phi3").to_hf_config(), "phi3")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))  # split q/k/v: HF Phi-3 fuses them
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SystemExit) as info:  # the converter's command line: one line, no traceback
        gguf_io.main([str(tmp_path / "x.gguf"), str(tmp_path / "out")])
    assert info.value.code == "error: GGUF phi3: tensor 'blk.0.attn_q.weight' has no HF mapping"
