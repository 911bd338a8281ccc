"""The converted-GGUF cache (``jaxpref.models.gguf_cache``): what a second load reads equals what the
first converted, entries follow the file and the converter, and the cache can be moved or disabled.

The tokenizer round trip uses the real SmolLM2 GGUF (49,152 tokens, merges, special tokens, chat
template) on real HH-RLHF text: the reloaded tokenizer must encode every text and render the chat
template exactly as the converted one does.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from jaxpref.models import gguf_cache, gguf_io


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_cache.ENV, str(root))
    return root


@pytest.fixture(scope="module")
def smollm():
    from jaxpref.loading import SpecError, packaged_gguf

    try:
        return packaged_gguf("smollm2-135m-instruct")
    except SpecError as err:
        if os.environ.get("JAXPREF_REQUIRE_SHARED") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))


def _hh_texts(shared_data, n=60) -> list[str]:
    rows = [json.loads(x) for x in (shared_data / "hh_rlhf_helpful_base_test_2k.jsonl").read_text().splitlines()[:n]]
    return [r[k] for r in rows for k in ("chosen", "rejected") if isinstance(r.get(k), str)]


def test_tokenizer_round_trip_encodes_identically(cache, smollm, shared_data):
    converted = gguf_io.convert_tokenizer(smollm)
    stored = gguf_cache.tokenizer(smollm, lambda p: converted)  # a miss: stores what the converter gave
    assert stored is converted
    calls = []
    again = gguf_cache.tokenizer(smollm, lambda p: calls.append(p))  # a hit: the converter is not called
    assert calls == [] and again is not converted
    texts = _hh_texts(shared_data) + ["<|im_start|>user\nhi<|im_end|>", " leading  spaces\ttabs\n\nünïcödé 🙂"]
    for text in texts:
        assert again(text)["input_ids"] == converted(text)["input_ids"], text[:80]
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert again.apply_chat_template(chat, tokenize=False) == converted.apply_chat_template(chat, tokenize=False)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id, len(again)) == \
        (converted.bos_token_id, converted.eos_token_id, converted.pad_token_id, len(converted))


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"hidden_size": 8}, {"a.weight": rng.standard_normal((4, 8)).astype(np.float32)}


def test_tensors_are_stored_once_and_read_back_bitwise(cache, tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"x" * 10)
    reads = []

    def read(p):
        reads.append(p)
        return _tensors()

    first = gguf_cache.tensors(src, read)
    second = gguf_cache.tensors(src, read)
    assert len(reads) == 1 and second[0] == first[0]
    np.testing.assert_array_equal(second[1]["a.weight"], first[1]["a.weight"])
    assert [p.name for p in cache.iterdir()] == [gguf_cache.entry_key(src)]
    os.utime(src, ns=(1, 1))  # another file as far as the cache knows: a new entry, read again
    gguf_cache.tensors(src, read)
    assert len(reads) == 2 and len(list(cache.iterdir())) == 2
    assert not [p for p in cache.rglob(".*")]  # no temporary directory left behind


def test_large_models_keep_only_the_tokenizer(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_cache, "MAX_TENSOR_BYTES", 64)  # the 128-byte tensor is "large"
    src = tmp_path / "m.gguf"
    src.write_bytes(b"y")
    reads = []
    for _ in range(2):
        gguf_cache.tensors(src, lambda p: reads.append(p) or _tensors())
    assert len(reads) == 2 and not (cache / gguf_cache.entry_key(src) / gguf_cache.TENSORS_DIR).exists()


def test_disabled_and_unwritable(tmp_path, monkeypatch, caplog):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"z")
    monkeypatch.setenv(gguf_cache.ENV, "off")
    assert gguf_cache.cache_root() is None
    reads = []
    for _ in range(2):
        gguf_cache.tensors(src, lambda p: reads.append(p) or _tensors())
    assert len(reads) == 2
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv(gguf_cache.ENV, str(blocker))  # cannot hold entries: the load still works, with a warning
    with caplog.at_level(logging.WARNING, logger="jaxpref.models.gguf_cache"):
        config, sd = gguf_cache.tensors(src, lambda p: _tensors())
    assert config == {"hidden_size": 8} and "could not store" in caplog.text and gguf_cache.ENV in caplog.text


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / "jaxpref" / "gguf"
