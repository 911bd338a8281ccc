"""Multi-annotator files (LLMFAO crowd, PandaLM): pairs load with the vote share alpha.

The majority response becomes chosen and alpha is its share of the votes (>= 0.5); ties
(share exactly 0.5) are kept with a flag unless ``drop_ties``. Rows whose responses are blank
(LLMFAO) or booleans (PandaLM parsed ``True`` answers) are rejected with their reasons.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jaxpref import data
from jaxpref.testing.tokenizers import make_tokenizer

FILES = {
    "llmfao": ("llmfao_crowd_multiannotator.jsonl", "response_x", "response_y", "p_x_preferred", "pair_id"),
    "pandalm": ("pandalm_testset_v1_multiannotator.jsonl", "response1", "response2", "p_response1_preferred", "idx"),
}


def _raw(shared_data, name):
    with open(shared_data / FILES[name][0], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", sorted(FILES))
def test_votes_alpha_and_majority(shared_data, name):
    fname, a, b, share, id_field = FILES[name]
    raw = _raw(shared_data, name)
    prefs = data.load_preferences(shared_data / fname)  # auto-detects the preset
    assert prefs.config == data.PRESETS[name]
    assert len(prefs.records) + len(prefs.rejects) == len(raw) == prefs.rejects.n_input
    for rec in prefs.records:
        row = raw[rec.row]
        p = row[share]
        assert rec.id == str(row[id_field]) and rec.prompt == row["prompt"]
        assert rec.alpha == pytest.approx(max(p, 1 - p)) and 0.5 <= rec.alpha <= 1
        assert rec.tie == (p == 0.5)
        if p >= 0.5:
            assert (rec.chosen, rec.rejected) == (row[a], row[b])
        else:
            assert (rec.chosen, rec.rejected) == (row[b], row[a])
    n_ties = sum(r[share] == 0.5 for i, r in enumerate(raw) if i not in prefs.rejects)
    assert sum(r.tie for r in prefs.records) == n_ties > 0
    dropped = data.load_preferences(shared_data / fname, data.format_config(name, drop_ties=True))
    assert dropped.rejects.counts()["tie"] == n_ties
    assert len(dropped.records) == len(prefs.records) - n_ties


def test_llmfao_blank_responses_rejected_or_kept(shared_data):
    raw = _raw(shared_data, "llmfao")
    prefs = data.load_preferences(shared_data / FILES["llmfao"][0], "llmfao")
    blank = {i for i, r in enumerate(raw) if not r["response_x"].strip() or not r["response_y"].strip()}
    assert prefs.rejects.rows == blank
    assert set(prefs.rejects.counts()) == {"whitespace_only", "empty_field"}
    kept_all = data.load_preferences(shared_data / FILES["llmfao"][0],
                                     data.format_config("llmfao", allow_empty_responses=True))
    assert len(kept_all.records) == len(raw) - sum(r["response_x"] == r["response_y"] for r in raw)


def test_pandalm_non_text_responses(shared_data):
    raw = _raw(shared_data, "pandalm")
    prefs = data.load_preferences(shared_data / FILES["pandalm"][0], "pandalm")
    reasons = collections.Counter((r.reason, r.field) for r in prefs.rejects)
    n_bool = sum(isinstance(r["response1"], bool) or isinstance(r["response2"], bool) for r in raw)
    assert n_bool > 0 and reasons[("not_text", "response1")] + reasons[("not_text", "response2")] == n_bool
    assert set(dict(reasons)) <= {("not_text", "response1"), ("not_text", "response2"),
                                  ("empty_field", "response1"), ("empty_field", "response2")}


def test_votes_reach_the_batch(shared_data):
    prefs = data.load_preferences(shared_data / FILES["pandalm"][0])
    tok = make_tokenizer()
    pairs = data.tokenize_pairs(prefs.records[:64], tok, data.TokenizeConfig(max_length=256))
    assert len(pairs) == 64
    batch = data.pair_batch(pairs, np.arange(16), batch_size=20)
    alphas = [prefs.records[i].alpha for i in range(16)]
    np.testing.assert_allclose(batch.votes[:16], alphas, rtol=1e-6)
    np.testing.assert_array_equal(batch.votes[16:], 1.0)  # padding rows
    assert batch.votes.dtype == np.float32 and not batch.example_mask[16:].any()
    np.testing.assert_array_equal(batch.index[:16], [r.row for r in prefs.records[:16]])
