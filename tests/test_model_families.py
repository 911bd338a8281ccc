"""Qwen3, Gemma 2, Gemma 3 (text), OLMo 2, Phi-3/4 against transformers' own implementations.

Each tiny preset (``presets.tiny_<family>``) is built as a random transformers model
(``jaxpref.testing.hf_factory``: norm weights perturbed away from their init, q/k norms
included), saved, loaded into jaxpref and compared on a right-padded batch of T = 12 > the
sliding window 4, with Gemma 2's soft-caps binding (|logits| reach 0.9 of the final cap). Then
the same checkpoint with ``attention="blocked"`` and with ``scan_layers=True`` (Gemma 2/3: a
scanned stack of one local and one global layer), the export that transformers reloads, and
20-token greedy generation with the KV cache against ``generate``, unrolled and scanned.
``test_features_bind`` shows that each family feature changes the logits at these sizes, so
parity cannot pass without it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jaxpref import logprobs
from jaxpref.generation import SamplingConfig, generate
from jaxpref.models import ModelConfig, UnsupportedConfigError, load_hf, params_from_hf, presets, save_hf
from jaxpref.models.attention import blocked
from jaxpref.models.hf_io import SafetensorsCheckpoint, hf_tensors
from jaxpref.testing.models import fast_compile
from jaxpref.testing.tolerances import logits_tol, relative_tol, transformer_chain_length

FAMILIES = ("tiny_qwen3", "tiny_gemma2", "tiny_gemma3", "tiny_olmo2", "tiny_phi3")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


@nnx.jit
def forward(model, ids, segment_ids):
    out = model(ids, segment_ids=segment_ids, return_logits=True)
    return out.hidden, out.logits


def forward_logits(model, ids, segment_ids):
    return forward(model, ids, segment_ids)[1]


def _padded_batch(vocab: int):
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), np.int32)
    mask[1, 8:] = 0  # right padding
    return ids, mask


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (torch model, saved dir, transformers' logits on the padded batch), built once per module."""
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(1)
    from jaxpref.testing.hf_factory import save_hf_model

    built = {}

    def get(name):
        if name not in built:
            hf_model, src = save_hf_model(presets.get_preset(name), tmp_path_factory.mktemp(name))
            ids, mask = _padded_batch(hf_model.config.vocab_size)
            with torch.no_grad():
                want = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask)).logits.numpy()
            built[name] = hf_model, src, want
        return built[name]

    return get


def _assert_parity(model, ids, mask, want):
    """Logits on the valid slots equal transformers' ``want``: two float32 programs of one network, so the
    logits' rounding bound (tolerances.logits_tol; the final soft-cap is 1-Lipschitz, so the pre-cap bound
    holds after it), and the issue's 1e-4."""
    valid = mask.astype(bool)
    hidden, got = map(np.asarray, forward(model, ids, mask))
    matrix, layout = model.unembedding()
    w = np.asarray(matrix, np.float64)
    tol = logits_tol(model.config, ids.shape[1], hidden, w if layout == "dv" else w.T)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err[valid] <= np.minimum(tol[valid], 1e-4))


@pytest.mark.torch
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_and_export_reloads(family, tmp_path, name, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    hf_model, src, want = family(name)
    model = load_hf(src)
    assert model.config == presets.get_preset(name)
    ids, mask = _padded_batch(model.config.vocab_size)
    valid = mask.astype(bool)
    _assert_parity(model, ids, mask, want)
    assert np.abs(want[valid]).std() > 0.5
    cap = model.config.final_logit_softcap
    if cap is not None:
        assert np.abs(want[valid]).max() > 0.9 * cap  # the cap binds: tanh is far from linear there

    monkeypatch.setattr(blocked, "DEFAULT_BLOCK_Q", 8)  # T = 12: two tiles each way, one skipped
    monkeypatch.setattr(blocked, "DEFAULT_BLOCK_KV", 8)
    got_blocked = np.asarray(forward_logits(load_hf(src, attention="blocked"), ids, mask))
    np.testing.assert_allclose(got_blocked[valid], want[valid], atol=1e-4, rtol=0)
    scanned = load_hf(src, scan_layers=True)
    assert scanned.layers.attn.query_dnh.shape[0] == model.config.num_layers
    _assert_parity(scanned, ids, mask, want)
    a, b = hf_tensors(scanned), hf_tensors(model)  # what save_hf writes, from either layout
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)

    out = save_hf(model, tmp_path / "export", source_dir=src)
    with safe_open(src / "model.safetensors", "np") as a, safe_open(out / "model.safetensors", "np") as b:
        assert set(a.keys()) == set(b.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ref_sd, new_sd = hf_model.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    with torch.no_grad():
        again = reloaded(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    np.testing.assert_allclose(again.numpy()[valid], want[valid], atol=1e-6, rtol=0)  # same config, same net


# Config changes that must move the logits: each family feature is live at the tiny sizes. (The final
# soft-cap binds by the parity test's logit range; the per-layer window path is shared by Gemma 3 and
# Phi-3, whose windows the parity test also covers.)
ABLATIONS = {
    "tiny_gemma2": [dict(sliding_window=None, layer_types=None), dict(attn_logit_softcap=None),
                    dict(query_pre_attn_scalar=None)],
    "tiny_gemma3": [dict(rope_local_theta=None), dict(rope_linear_factor=1.0)],
    "tiny_phi3": [dict(partial_rotary_factor=1.0)],
}


@pytest.mark.torch
@pytest.mark.parametrize("name, changes", [(n, c) for n, cs in ABLATIONS.items() for c in cs],
                         ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_features_bind(family, name, changes):
    _, src, want = family(name)
    cfg = presets.get_preset(name).replace(**changes)
    ids, mask = _padded_batch(cfg.vocab_size)
    got = np.asarray(forward_logits(params_from_hf(cfg, SafetensorsCheckpoint(src)), ids, mask))
    assert np.abs(got - want)[mask.astype(bool)].max() > 1e-2


@pytest.mark.torch
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_matches_transformers(family, name):
    """20 greedy tokens from a left-padded batch, KV cache on both sides (window 4 < 26 tokens), unrolled and
    scanned (the cache [L, B, S, KV, hd] carried through the scan). The tied Gemmas repeat a token at these
    sizes, so each token's log-prob is also checked against transformers' raw logits: it depends on every
    layer, the local ones included."""
    import torch

    hf_model, src, _ = family(name)
    ids = np.random.default_rng(1).integers(3, hf_model.config.vocab_size, (2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences.numpy()[:, ids.shape[1]:]
    z = np.stack([s.numpy() for s in out.logits], axis=1).astype(np.float64)  # [B, N, V] raw logits
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    z_y = np.take_along_axis(z, theirs[..., None], -1)[..., 0]
    # two float32 programs of one network (tolerances.token_logp_tol), with the cancelling terms |z_y| + |lse|
    # taken from the logits themselves (the capped / confident logits are not small next to ln V)
    cfg = presets.get_preset(name)
    tol = relative_tol(transformer_chain_length(cfg, 26)) * (np.abs(z_y) + np.abs(lse) + 1.0)
    config = SamplingConfig(max_new_tokens=20, temperature=0.0)
    # scanned generation where the scan differs per family: the mixed local/global stacks (lax.cond per layer);
    # homogeneous stacks run the scanned cache path of tests/test_scan_layers.py
    mixed = len({cfg.layer_is_local(i) for i in range(cfg.num_layers)}) > 1
    for scan_layers in (False, True) if mixed else (False,):
        model = load_hf(src, scan_layers=scan_layers)
        ours = generate(model, ids, mask, key=jax.random.key(0), config=config)
        np.testing.assert_array_equal(np.asarray(ours.completion), theirs, err_msg=f"scan_layers={scan_layers}")
        err = np.abs(np.asarray(ours.logprobs, np.float64) - (z_y - lse))
        assert np.all(err <= tol), f"scan_layers={scan_layers}: log-prob excess {(err - tol).max():.3g}"


# ------------------------------------------------------------------------------ no torch


def test_final_softcap_in_chunked_logprobs():
    """Log-probs and gradients of ``c tanh(hW / c)``, chunked (3 vocab chunks), against float64 NumPy / naive JAX."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 7, 16)).astype(np.float32)
    w = rng.normal(size=(16, 40)).astype(np.float32)
    ids = rng.integers(0, 40, (2, 7)).astype(np.int32)
    mask = np.ones((2, 7), np.int32)
    cap = 2.0
    z = cap * np.tanh(h.astype(np.float64) @ w / cap)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0].sum(-1)
    got = logprobs.sequence_logprobs(h, w, ids, mask, softcap=cap, seq_chunk=3, vocab_chunk=16)
    np.testing.assert_allclose(np.asarray(got.sums), want, rtol=1e-5)
    z_raw = h.astype(np.float64) @ w
    uncapped = np.take_along_axis((z_raw - np.log(np.exp(z_raw).sum(-1, keepdims=True)))[:, :-1],
                                  ids[:, 1:, None], -1)[..., 0].sum(-1)
    assert np.abs(uncapped - want).max() > 1.0  # the cap binds

    def naive(h, w):
        zz = cap * jnp.tanh(h[:, :-1] @ w / cap)
        return jnp.take_along_axis(jax.nn.log_softmax(zz), ids[:, 1:, None], -1).sum()

    chunked = lambda h, w: logprobs.sequence_logprobs(h, w, ids, mask, softcap=cap, seq_chunk=3,  # noqa: E731
                                                      vocab_chunk=16).sums.sum()
    for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# config.json files as the Hub ships them (transformers v4 spellings), trimmed to the fields read.
HUB_CONFIGS = {
    "qwen2_5_0_5b": {  # Qwen/Qwen2.5-0.5B
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "gemma3_1b": {  # google/gemma-3-1b-pt
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
        "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1, "final_logit_softcapping": None,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_json_loads(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[name]))
    cfg = ModelConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == presets.get_preset(name, param_dtype="bfloat16", dtype="bfloat16")


@pytest.mark.parametrize("hf, match", [
    ({"model_type": "qwen3", "num_experts": 8}, r"qwen3: num_experts=8: mixture-of-experts"),
    ({"model_type": "mixtral", "num_local_experts": 8}, r"model_type 'mixtral' is not supported; supported: .*'qwen3'"),
    ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     r"phi3: rope_type 'longrope' \(rope_parameters / rope_scaling\) is not supported"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unsupported_options_name_the_field(hf, match):
    full = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, **hf}
    with pytest.raises(UnsupportedConfigError, match=match) as info:
        ModelConfig.from_hf_config(full)
    assert "\n" not in str(info.value)


def test_gemma_features_are_rejected_elsewhere():
    with pytest.raises(UnsupportedConfigError, match="attn_logit_softcap=1.0 is a gemma2/gemma3_text feature"):
        presets.tiny_llama(attn_logit_softcap=1.0)
    with pytest.raises(ValueError, match="layer_types must list"):
        presets.tiny_gemma2(layer_types=("sliding_attention",))
