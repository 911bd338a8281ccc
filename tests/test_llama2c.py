"""stories260K (llama2.c): a real pretrained model against its published reference outputs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models import load_hf, load_llama2c
from jaxpref.models.llama2c import Llama2cTokenizer, llama2c_to_hf, rotate_half_permutation
from jaxpref.testing.models import fast_compile


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    with fast_compile():
        yield


@pytest.fixture(scope="module")
def stories(shared_data):
    return shared_data / "models" / "llama2c_stories260K"


@pytest.fixture(scope="module")
def model(stories):
    return load_llama2c(stories / "stories260K.bin")


@pytest.fixture(scope="module")
def tokenizer(stories):
    return Llama2cTokenizer.from_file(stories / "tok512.bin")


@pytest.fixture(scope="module")
def references(stories):
    return json.loads((stories / "reference_greedy.json").read_text())["references"]


@nnx.jit
def _logits(model, ids, segment_ids):
    return model(ids, segment_ids=segment_ids, return_logits=True).logits


def test_config(model):
    cfg = model.config
    sizes = (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
    assert sizes == (64, 172, 5, 8, 4)
    assert cfg.tie_word_embeddings and cfg.num_params() == 260_032
    np.testing.assert_array_equal(rotate_half_permutation(8), [0, 2, 4, 6, 1, 3, 5, 7])


def test_tokenizer(tokenizer, references):
    assert tokenizer.vocab_size == 512
    assert tokenizer.encode("Zoo") == [1, 410, 469, 347]
    assert tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode("Zoo", bos=False, eos=True) == [410, 469, 347, 2]
    for ref in references:
        assert tokenizer.encode(ref["prompt"]) == ref["prompt_token_ids"]
        assert tokenizer.decode(ref["token_ids"]) == ref["text"]
    text = "naïve 🦙 café"  # byte fallback for pieces not in the 512-token vocabulary
    ids = tokenizer.encode(text)
    assert any(3 <= i < 259 for i in ids) and tokenizer.decode(ids) == text


def test_reference_logits(model, stories):
    ref = np.load(stories / "reference_logits_once_upon_a_time.npz")
    ids = jnp.asarray(ref["token_ids"])[None]
    got = np.asarray(_logits(model, ids, jnp.ones_like(ids)))[0]
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0)


def test_greedy_reference_no_cache(model, references):
    """Greedy no-cache decoding is reproduced iff, on the reference sequence, each generated token is
    the argmax of the causal logits at the position before it: one padded forward checks all steps."""
    width = 256
    ids, seg = np.zeros((len(references), width), np.int32), np.zeros((len(references), width), np.int32)
    for b, ref in enumerate(references):
        n = len(ref["token_ids"])
        assert n == ref["steps"] + 1  # steps forward passes after BOS
        ids[b, :n], seg[b, :n] = ref["token_ids"], 1
    pred = np.argmax(np.asarray(_logits(model, ids, seg)), axis=-1)
    for b, ref in enumerate(references):
        start, n = len(ref["prompt_token_ids"]), len(ref["token_ids"])
        np.testing.assert_array_equal(pred[b, start - 1:n - 1], ref["token_ids"][start:], err_msg=repr(ref["prompt"]))


def test_greedy_reference_with_cache(model, references):
    """The same generations through the KV cache: one prefill, then one token per step."""

    @nnx.jit
    def step(model, ids, cache):
        out = model(ids, cache=cache, return_logits=True)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    ref = references[1]  # "Zoo", 60 steps
    prompt = jnp.asarray(ref["prompt_token_ids"])[None]
    cache = model.init_cache(1, ref["steps"] + 1)
    token, cache = step(model, prompt, cache)
    tokens = list(ref["prompt_token_ids"])
    while len(tokens) < ref["steps"] + 1:
        tokens.append(int(token[0]))
        token, cache = step(model, token[:, None], cache)
    assert tokens == ref["token_ids"]


def test_hf_export_loads_back(model, stories, tmp_path):
    out = llama2c_to_hf(stories / "stories260K.bin", tmp_path / "hf")
    reloaded = load_hf(out)
    assert reloaded.config == model.config
    ids = jnp.asarray([[1, 403, 407, 261, 378]])
    np.testing.assert_array_equal(_logits(reloaded, ids, jnp.ones_like(ids)), _logits(model, ids, jnp.ones_like(ids)))


@pytest.mark.torch
def test_hf_export_matches_transformers(model, stories, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out = llama2c_to_hf(stories / "stories260K.bin", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = np.load(stories / "reference_logits_once_upon_a_time.npz")
    with torch.no_grad():
        got = hf(torch.tensor(ref["token_ids"], dtype=torch.long)[None]).logits[0].numpy()
    np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0)


def test_llama2c_spec_loads_directory_or_file(model, stories, tmp_path):
    """``llama2c:DIR`` and ``llama2c:FILE`` give the same weights as ``load_llama2c``; bad specs are SpecErrors."""
    import jax
    from flax import nnx

    from jaxpref.loading import SpecError, load_model

    want = jax.tree.leaves(nnx.state(model, nnx.Param))
    for spec in (f"llama2c:{stories}", f"llama2c:{stories / 'stories260K.bin'}"):
        got = jax.tree.leaves(nnx.state(load_model(spec).model, nnx.Param))
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, got)), spec
    with pytest.raises(SpecError, match="exactly one model .bin"):
        load_model(f"llama2c:{tmp_path}")
    with pytest.raises(SpecError, match="neither"):
        load_model(f"llama2c:{tmp_path / 'missing'}")
