"""HH-RLHF: the loader of the raw upstream transcripts reproduces the shared 2k split exactly.

``hh_rlhf_helpful_base_test_2k.jsonl`` holds, for the first 2000 upstream records, the prompt /
chosen / rejected made by the common-prefix rule (shared/data/README.md). The loader of the raw
``.jsonl.gz`` must give the same strings for every record it keeps and reject exactly the known
bad rows: 721 (chosen == rejected) and 120, 740, 1214 (whitespace-only rejected response).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from jaxpref import data
from jaxpref.testing.tokenizers import make_tokenizer

KNOWN_BAD = {120: ("whitespace_only", "rejected"), 721: ("identical", None),
             740: ("whitespace_only", "rejected"), 1214: ("whitespace_only", "rejected")}
COMMON_PREFIX_LINES = {168, 354, 567, 743, 960, 1011, 1166, 1307, 1450}


@pytest.fixture(scope="module")
def reference(shared_data):
    with open(shared_data / "hh_rlhf_helpful_base_test_2k.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def raw(shared_data):
    return data.load_preferences(shared_data / "hh_rlhf_helpful_base_test.jsonl.gz")


def test_split_rule_reproduces_all_2000(reference):
    for ref in reference:
        assert data.split_hh(ref["raw_chosen"], ref["raw_rejected"]) == (ref["prompt"], ref["chosen"], ref["rejected"])


def test_raw_loader_reproduces_reference(raw, reference):
    assert raw.config.format == "hh"  # auto-detected: chosen/rejected strings, no prompt
    assert raw.rejects.n_input == 2354
    assert len(raw.records) + len(raw.rejects) == 2354
    kept = {r.row: r for r in raw.records}
    rejected = {r.row: (r.reason, r.field) for r in raw.rejects}
    assert {k: v for k, v in rejected.items() if k < 2000} == KNOWN_BAD
    for ref in reference:
        line = ref["source_line"]
        if line in KNOWN_BAD:
            assert line not in kept
            continue
        rec = kept[line]
        assert (rec.prompt, rec.chosen, rec.rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])
        assert rec.prompt + rec.chosen == ref["raw_chosen"] and rec.prompt + rec.rejected == ref["raw_rejected"]
        assert rec.id == f"row:{line}" and rec.alpha is None
    # the 9 records where the transcripts diverge before the last assistant turn
    assert {ref["source_line"] for ref in reference if ref["split_method"] == "common_prefix"} == COMMON_PREFIX_LINES
    for line in COMMON_PREFIX_LINES:
        rec = kept[line]
        assert any(tag in rec.chosen + rec.rejected for tag in ("\n\nHuman:", "\n\nAssistant:"))


def test_whitespace_rows_kept_when_allowed(shared_data, reference):
    prefs = data.load_preferences(shared_data / "hh_rlhf_helpful_base_test.jsonl.gz",
                                  data.format_config("hh", allow_empty_responses=True))
    kept = {r.row: r for r in prefs.records}
    assert {r.row for r in prefs.rejects if r.row < 2000} == {721}
    for line in (120, 740, 1214):
        ref = reference[line]
        assert (kept[line].prompt, kept[line].rejected) == (ref["prompt"], " ")


def test_split_file_loads_as_explicit_with_same_rejects(shared_data, tmp_path):
    prefs = data.load_preferences(shared_data / "hh_rlhf_helpful_base_test_2k.jsonl",
                                  rejects_path=tmp_path / "rejects.jsonl")
    assert prefs.config.format == "explicit"
    assert {r.row: (r.reason, r.field) for r in prefs.rejects} == KNOWN_BAD
    assert len(prefs.records) == 1996
    assert prefs.records[0].id == "hh-rlhf/helpful-base/test/0"
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(x["row"], x["id"], x["reason"]) for x in lines] == [
        (r, f"hh-rlhf/helpful-base/test/{r}", KNOWN_BAD[r][0]) for r in sorted(KNOWN_BAD)]
    assert prefs.rejects.counts() == {"whitespace_only": 3, "identical": 1}


def test_transcript_to_messages():
    msgs = data.transcript_to_messages("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}, {"role": "assistant", "content": ""}]


def test_load_and_tokenize_2000_pairs_in_seconds(shared_data):
    start = time.perf_counter()
    prefs = data.load_preferences(shared_data / "hh_rlhf_helpful_base_test_2k.jsonl")
    pairs = data.tokenize_pairs(prefs.records, make_tokenizer(template=None), data.TokenizeConfig(max_length=4096),
                                rejects=prefs.rejects)
    seconds = time.perf_counter() - start
    assert len(pairs) + len(prefs.rejects) == 2000 and pairs.stats.rejected == {}
    assert seconds < 30, f"loading + tokenising 2000 HH pairs took {seconds:.1f} s"  # ~2-4 s on 2 loaded cores
    # plain concatenation: BOS + prompt, response + EOS, each tokenised on its own
    tok = make_tokenizer(template=None)
    rec = prefs.records[0]
    assert pairs.prompt[0].tolist() == tok(rec.prompt)["input_ids"]
    assert pairs.chosen[0].tolist() == tok(rec.chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_tokenize_hh_with_chat_template(raw):
    records = [r for r in raw.records if r.row < 300 or r.row in COMMON_PREFIX_LINES]
    tok = make_tokenizer()
    pairs = data.tokenize_pairs(records, tok, data.TokenizeConfig(max_length=4096))
    assert len(pairs) == len(records) and pairs.stats.prefix_fixed == 0
    by_row = {r.row: r for r in records}
    # HH transcripts become turns; the prompt ends with the template's generation prompt
    i = int(np.flatnonzero(pairs.row == 0)[0])
    assert tok.decode(pairs.prompt[i]) == ("<s><|user|>Do you know why turkeys became the official food of "
                                           "thanksgiving?<|end|><|assistant|>")
    assert tok.decode(pairs.chosen[i]) == by_row[0].chosen.strip() + "<|end|></s>"
    # a response with an extra (consecutive) assistant turn keeps it as a turn
    j = int(np.flatnonzero(pairs.row == 168)[0])
    rejected = tok.decode(pairs.rejected[j])
    assert rejected.count("<|end|><|assistant|>") == 1 and rejected.endswith("<|end|></s>")
