"""Hugging Face checkpoint import/export: parity with transformers, round trips, errors, sharded loads.

Torch tests build a tiny random transformers model per family (``jaxpref.testing.hf_factory``),
``save_pretrained`` it, load it into jaxpref and compare logits on a right-padded batch, then
export back and reload in transformers. The rest needs neither torch nor a download.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxpref.models import CheckpointMismatchError, ModelConfig, build_model, load_hf, params_from_hf, presets, save_hf
from jaxpref.models.attention import blocked
from jaxpref.models.hf_io import hf_tensors
from jaxpref.parallel import MeshConfig, make_mesh
from jaxpref.testing.models import fast_compile, random_model
from jaxpref.testing.tolerances import logits_tol

PARITY_PRESETS = ("tiny_llama", "tiny_llama3", "tiny_mistral", "tiny_qwen2", "tiny_qwen2_tied", "tiny_smollm2",
                  "tiny_gemma", "tiny_gpt2", "tiny_gpt_neox")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


@nnx.jit
def forward_logits(model, ids, segment_ids):
    return model(ids, segment_ids=segment_ids, return_logits=True).logits


def _padded_batch(vocab: int):
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12)).astype(np.int32)
    mask = np.ones((2, 12), np.int32)
    mask[1, 8:] = 0  # right padding
    return ids, mask


def _has_spec(x: jax.Array, *spec) -> bool:
    """Sharding equality up to trailing replicated axes (jit drops them from the spec)."""
    return x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, P(*spec)), x.ndim)


def _flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ------------------------------------------------------------------------------ parity (torch)


def _logits_bounds(model, ids, mask) -> np.ndarray:
    """[B, T, V] rounding bounds for two float32 programs' logits of ``ids`` (jaxpref.testing.tolerances)."""
    hidden = model(ids, segment_ids=mask).hidden
    matrix, layout = model.unembedding()
    w = np.asarray(matrix, np.float64)
    return logits_tol(model.config, ids.shape[1], hidden, w if layout == "dv" else w.T)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """name -> (torch model, saved dir), built once per module on first use."""
    pytest.importorskip("torch")
    import torch

    torch.set_num_threads(1)
    from jaxpref.testing.hf_factory import save_hf_model

    built = {}

    def get(name):
        if name not in built:
            built[name] = save_hf_model(presets.get_preset(name), tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.mark.torch
@pytest.mark.parametrize("name", PARITY_PRESETS)
def test_logits_match_transformers_and_round_trip(hf_checkpoint, tmp_path, name, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    hf_model, src = hf_checkpoint(name)
    model = load_hf(src)
    assert model.config == presets.get_preset(name)
    ids, mask = _padded_batch(model.config.vocab_size)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(forward_logits(model, ids, mask))
    valid = mask.astype(bool)
    # two float32 implementations of the same network: the logits' rounding-chain bound (tolerances.logits_tol)
    tol = _logits_bounds(model, ids, mask)
    assert np.all(np.abs(got[valid].astype(np.float64) - want[valid]) <= tol[valid])
    assert np.abs(want[valid]).std() > 0.5  # the comparison is not trivially small
    monkeypatch.setattr(blocked, "DEFAULT_BLOCK_Q", 8)  # T = 12: two tiles each way, one skipped
    monkeypatch.setattr(blocked, "DEFAULT_BLOCK_KV", 8)
    got_blocked = np.asarray(forward_logits(load_hf(src, attention="blocked"), ids, mask))
    np.testing.assert_allclose(got_blocked[valid], want[valid], atol=1e-4, rtol=0)

    out = save_hf(model, tmp_path / "export", source_dir=src)
    with safe_open(src / "model.safetensors", "np") as a, safe_open(out / "model.safetensors", "np") as b:
        assert set(a.keys()) == set(b.keys())
    assert (out / "generation_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref_sd, new_sd = hf_model.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k


@pytest.mark.torch
@pytest.mark.parametrize("name", ["tiny_llama3", "tiny_gemma", "tiny_gpt2", "tiny_gpt_neox"])
def test_from_pretrained_config_object(name):
    pytest.importorskip("torch")
    from jaxpref.testing.hf_factory import hf_config

    cfg = presets.get_preset(name)
    assert ModelConfig.from_hf_config(hf_config(cfg)) == cfg


# ------------------------------------------------------------------------------ no torch


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny Qwen2 (untied, biases) exported by jaxpref, with fake tokenizer files."""
    model = random_model(presets.tiny_qwen2())
    src = tmp_path_factory.mktemp("src")
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    out = save_hf(model, tmp_path_factory.mktemp("qwen2"), source_dir=src)
    return model, out


def test_save_load_round_trip(saved):
    model, path = saved
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in path.iterdir()}
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    reloaded = load_hf(path)
    assert reloaded.config == model.config
    a, b = _flat_params(model), _flat_params(reloaded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_index_checkpoint(saved, tmp_path):
    model, path = saved
    tensors = load_file(path / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():
        save_file({k: tensors[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a, b = _flat_params(model), _flat_params(load_hf(tmp_path))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_load_dtype_override_and_bf16_export(saved, tmp_path):
    model, path = saved
    bf = load_hf(path, dtype="bfloat16", param_dtype="bfloat16", remat=True)
    assert bf.config.remat and bf.layers[0].attn.query_dnh[...].dtype == jax.numpy.bfloat16
    out = save_hf(bf, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype.name == "bfloat16"
    assert load_hf(out).config.param_dtype == "bfloat16"


def test_mismatches_are_named(saved):
    model, _ = saved
    cfg, good = model.config, hf_tensors(model)
    missing = {k: v for k, v in good.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing from checkpoint: \['model.layers.1.self_attn.k_proj.bias'\]"):
        params_from_hf(cfg, missing)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in checkpoint .*\['model.extra.weight'\]"):
        params_from_hf(cfg, {**good, "model.extra.weight": np.zeros(3, np.float32)})
    bad = {**good, "model.layers.0.mlp.up_proj.weight": np.zeros((32, 64), np.float32)}
    with pytest.raises(CheckpointMismatchError,
                       match=r"model.layers.0.mlp.up_proj.weight: checkpoint shape \(32, 64\), expected \(64, 32\)"):
        params_from_hf(cfg, bad)
    # A checkpoint with biases does not load into a config without them (no silent drop).
    with pytest.raises(CheckpointMismatchError, match="q_proj.bias"):
        params_from_hf(cfg.replace(family="llama", qkv_bias=False), good)
    # Buffers that carry no parameters, and a duplicate tied head, are accepted.
    tied = cfg.replace(tie_word_embeddings=True)
    extra = {**good, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}
    params_from_hf(tied, extra)


# ------------------------------------------------------------------------------ sharding


def test_sharded_load_on_2x2x2_mesh(saved):
    model, path = saved
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = load_hf(path, mesh=mesh)
    attn = sharded.layers[0].attn
    assert _has_spec(attn.query_dnh[...], "fsdp", "tensor", None)  # [embed, heads, head_dim]
    assert _has_spec(attn.key_dkh[...], "fsdp", "tensor", None)  # 2 kv heads split over tensor=2
    assert _has_spec(attn.out_nhd[...], "tensor", None, "fsdp")
    assert _has_spec(attn.query_bias_nh[...], "tensor", None)
    assert _has_spec(sharded.embed.embedding_vd[...], "tensor", "fsdp")
    assert _has_spec(sharded.lm_head_dv[...], "fsdp", "tensor")
    assert _has_spec(sharded.layers[1].mlp.down_fd[...], "tensor", "fsdp")
    assert _has_spec(sharded.final_norm.scale_d[...], None)
    assert len(attn.query_dnh[...].addressable_shards) == 8

    ids, mask = _padded_batch(model.config.vocab_size)
    want = forward_logits(model, ids, mask)
    err = np.abs(np.asarray(forward_logits(sharded, ids, mask), np.float64) - np.asarray(want, np.float64))
    assert np.all(err[mask.astype(bool)] <= _logits_bounds(model, ids, mask)[mask.astype(bool)])


def test_build_model_born_sharded():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = presets.tiny_smollm2()  # 1 kv head: not divisible by tensor=2, so replicated
    model = build_model(cfg, rngs=0, mesh=mesh)
    attn = model.layers[0].attn
    assert _has_spec(attn.key_dkh[...], "fsdp", None, None)
    assert _has_spec(attn.query_dnh[...], "fsdp", "tensor", None)
    np.testing.assert_allclose(np.std(attn.query_dnh[...]), cfg.initializer_range, rtol=0.2)
    np.testing.assert_array_equal(model.final_norm.scale_d[...], 1.0)


def test_hf_io_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, jaxpref.models.hf_io, jaxpref.models.llama2c; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
