"""Multi-response rows (issue 18 item 4): reading, rejects, pair derivation and exact-match ranking accuracy.

Everything here is host-side data handling on hand-built rows; the expected rows, reasons, pairs and
accuracies are written out by hand below (not recomputed with the library's own rules). The tiny training
and ``eval.ranking`` runs are in ``tests/test_multi_response_e2e.py``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jaxpref.data import formats, multi_response
from jaxpref.data.multi_response import PAIR_MODES, derive_pairs

# Flat rows: prompt / responses / scores. Row index -> (row, expected outcome by hand).
FLAT = [
    {"id": "three", "prompt": "p0", "responses": ["a", "b", "c"], "scores": [1, 3, 2]},
    {"id": "four_ties", "prompt": "p1", "responses": ["a", "b", "c", "d"], "scores": [5, 5, 2, 2]},
    {"id": "five", "prompt": "p2", "responses": ["a", "b", "c", "d", "e"], "scores": [1, 2, 3, 4, 5]},
    {"id": "missing", "prompt": "p3", "responses": ["a", "b", "c"], "scores": [3, None, 1]},
    {"id": "single", "prompt": "p4", "responses": ["a"], "scores": [4]},
    {"id": "tied", "prompt": "p5", "responses": ["a", "b", "c"], "scores": [2, 2, 2]},
    {"id": "mismatch", "prompt": "p6", "responses": ["a", "b", "c"], "scores": [1, 2]},
    {"id": "na", "prompt": "p7", "responses": ["a", "b"], "scores": ["N/A", 2]},
    {"id": "word", "prompt": "p8", "responses": ["a", "b"], "scores": ["good", 2]},
    {"id": "same_text", "prompt": "p9", "responses": ["a", "a"], "scores": [1, 2]},
    ["not", "an", "object"],
    {"id": "no_responses", "prompt": "p11", "scores": [1, 2]},
    {"id": "nan", "prompt": "p12", "responses": ["a", "b"], "scores": [float("nan"), 1]},
    {"id": "empty_text", "prompt": "p13", "responses": ["a", " "], "scores": [1, 2]},
]
# Rejected while reading (any mode): row -> (reason, key).
READ_REJECTS = {3: ("missing_score", "scores[1]"), 4: ("too_few_responses", "responses"),
                6: ("invalid_responses", "scores"), 7: ("missing_score", "scores[0]"),
                8: ("invalid_score", "scores[0]"), 10: ("not_an_object", None), 11: ("missing_field", "responses"),
                12: ("invalid_score", "scores[0]"), 13: ("whitespace_only", "responses[1]")}
# Rejected by the pair derivation (every mode): row -> reason.
DERIVE_REJECTS = {5: "all_tied", 9: "identical"}
# (id, chosen, rejected) per mode, by hand.
PAIRS = {
    "best_vs_worst": [("three:1>0", "b", "a"), ("four_ties:0>2", "a", "c"), ("five:4>0", "e", "a")],
    "all_pairs": [("three:1>0", "b", "a"), ("three:2>0", "c", "a"), ("three:1>2", "b", "c"),
                  ("four_ties:0>2", "a", "c"), ("four_ties:0>3", "a", "d"), ("four_ties:1>2", "b", "c"),
                  ("four_ties:1>3", "b", "d")]
                 + [(f"five:{j}>{i}", "abcde"[j], "abcde"[i]) for i in range(5) for j in range(i + 1, 5)],
}
# Skipped response pairs (row id, reason) by hand: ties and identical texts the mode looked at.
SKIPPED = {
    "best_vs_worst": {("four_ties", "tie"): 1, ("tied", "tie"): 2, ("same_text", "identical"): 1},
    "best_vs_random": {("four_ties", "tie"): 1, ("tied", "tie"): 2, ("same_text", "identical"): 1},
    "all_pairs": {("four_ties", "tie"): 2, ("tied", "tie"): 3, ("same_text", "identical"): 1},
}


def _write(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def flat(tmp_path) -> formats.PreferenceData:
    return formats.load_preferences(_write(tmp_path / "flat.jsonl", FLAT))


def test_flat_rows_are_read_or_rejected_with_reason_and_key(flat):
    assert flat.config.format == "multi"  # auto-detected from prompt / responses
    got = {r.row: (r.reason, r.field) for r in flat.rejects}
    assert got == READ_REJECTS
    kept = {r.row: r for r in flat.records}
    assert sorted(kept) == sorted(set(range(len(FLAT))) - set(READ_REJECTS))
    assert kept[1].responses == ("a", "b", "c", "d") and kept[1].scores == (5.0, 5.0, 2.0, 2.0)
    assert len(flat.records) + len(flat.rejects) == flat.rejects.n_input == len(FLAT)
    assert "p3" not in [r.prompt for r in flat.records]  # a missing rating is never filled in


@pytest.mark.parametrize("mode", PAIR_MODES)
def test_pair_derivation_accounts_for_every_row(flat, mode):
    derived = derive_pairs(flat.records, mode, seed=3, rejects=flat.rejects)
    rows_with_pairs = {int(r) for r in derived.source_rows}
    rejected = {r.row: r.reason for r in flat.rejects}
    assert {k: v for k, v in rejected.items() if k not in READ_REJECTS} == DERIVE_REJECTS
    # every input row: kept (gave a pair) or rejected once, with a reason
    assert rows_with_pairs.isdisjoint(rejected) and len(rows_with_pairs) + len(rejected) == len(FLAT)
    assert rows_with_pairs == {0, 1, 2} and derived.n_rows_kept == 3
    got = [(r.id, r.chosen, r.rejected) for r in derived.records]
    if mode in PAIRS:
        assert got == PAIRS[mode]
    else:  # one pair per row: chosen = the first best, rejected drawn among the strictly lower (by hand)
        lower = {"three": "ac", "four_ties": "cd", "five": "abcd"}
        assert [(i[:i.index(">")], c) for i, c, _ in got] == [("three:1", "b"), ("four_ties:0", "a"), ("five:4", "e")]
        assert all(r in lower[i.split(":")[0]] and i.endswith(f">{'abcde'.index(r)}") for i, _, r in got)
    skipped: dict = {}
    for s in derived.skipped:
        skipped[(s["id"], s["reason"])] = skipped.get((s["id"], s["reason"]), 0) + 1
    assert skipped == SKIPPED[mode]
    summary = derived.summary()
    assert summary["pairs"] == len(got) and summary["skipped_ties"] == sum(
        v for (_, why), v in SKIPPED[mode].items() if why == "tie")
    assert [r.row for r in derived.records] == list(range(len(got)))  # pair rows: positions in the pair list
    assert derived.rejects.n_input == len(got) and len(derived.rejects) == 0


def test_best_vs_random_is_seeded_per_row_and_draws_every_lower_response():
    rec = multi_response.MultiResponseRecord(7, "r", "p", ("a", "b", "c", "d", "e"), (1, 5, 3, 5, 2))
    other = multi_response.MultiResponseRecord(8, "s", "q", ("x", "y"), (0, 1))
    draws = {s: derive_pairs([rec], "best_vs_random", seed=s).records[0].rejected for s in range(200)}
    # the first best is "b" (5); "d" ties with it and is never drawn; a, c, e all are
    assert set(draws.values()) == {"a", "c", "e"}
    counts = np.array([list(draws.values()).count(x) for x in "ace"])
    assert counts.min() > 200 / 3 - 4 * np.sqrt(200 * (1 / 3) * (2 / 3))  # roughly uniform (4 sigma)
    again = derive_pairs([other, rec], "best_vs_random", seed=11).records[1]
    assert again.rejected == draws[11] and again.chosen == "b"  # independent of the other rows


def test_ultrafeedback_objects_presets_and_score_keys(tmp_path):
    uf = [{"instruction": "q0", "completions": [{"model": "m", "response": "r0", "overall_score": 7.5},
                                                  {"model": "m", "response": "r1", "overall_score": 3}]},
          {"instruction": "q1", "completions": [{"response": "r0", "overall_score": 2},
                                                  {"response": "r1"}]},
          {"instruction": "q2", "completions": [{"response": "r0", "overall_score": 2}, "plain text"]}]
    data = formats.load_preferences(_write(tmp_path / "uf.jsonl", uf))
    assert (data.config.format, data.config.prompt_field, data.config.scores_field) == \
        ("multi", "instruction", "overall_score")
    assert [r.scores for r in data.records] == [(7.5, 3.0)]
    assert {r.row: (r.reason, r.field) for r in data.rejects} == {
        1: ("missing_score", "completions[1].overall_score"), 2: ("invalid_responses", "completions")}
    # the same rows through the named preset
    assert formats.load_preferences(tmp_path / "uf.jsonl", "ultrafeedback").records == data.records
    # prompt + completions with a per-completion "rating" (string ratings as in UltraFeedback's annotations)
    rated = [{"prompt": "q", "completions": "not a list"},
             {"prompt": "q", "completions": [{"response": "x", "rating": "4"}, {"response": "y", "rating": 2},
                                             {"response": "z", "rating": "5"}]}]
    got = formats.load_preferences(_write(tmp_path / "rated.jsonl", rated))
    assert got.config.scores_field == "rating" and got.records[0].scores == (4.0, 2.0, 5.0)
    assert [(r.row, r.reason, r.field) for r in got.rejects] == [(0, "invalid_responses", "completions")]
    # flat responses / ratings, detected and through the preset
    flat = [{"prompt": "q", "responses": ["x", "y", "z"], "ratings": [1, 3, 2]}]
    path = _write(tmp_path / "ratings.jsonl", flat)
    for spec in (None, "ratings"):
        got = formats.load_preferences(path, spec)
        assert got.config.scores_field == "ratings" and got.records[0].scores == (1.0, 3.0, 2.0)
    # field names mapped by hand
    odd = [{"question": "q", "answers": ["x", "y"], "marks": [2, 1]}]
    cfg = formats.format_config("multi", fields={"prompt": "question", "responses": "answers", "scores": "marks"})
    assert formats.load_preferences(_write(tmp_path / "odd.jsonl", odd), cfg).records[0].responses == ("x", "y")


def test_exact_match_equals_a_hand_count():
    """Chen et al. Def. A.8: a prompt counts only when the model's full ranking equals the human one
    (ties in the human scores need exactly equal model scores). Rows of 3, 4 and 5 responses, padded."""
    from eval.ranking import compute_multi

    human = [[3, 2, 1], [1, 2, 3, 4], [5, 5, 1], [5, 5, 1], [2, 9, 4, 4, 0], [1, 2, 3]]
    model = [[-1.0, -2.0, -3.0],  # same order: match
             [-9.0, -7.0, -5.0, -4.0],  # same order: match
             [-2.0, -2.0, -8.0],  # human tie reproduced exactly: match
             [-2.0, -2.5, -8.0],  # human tie broken: no match
             [-5.0, -1.0, -3.0, -3.0, -9.0],  # same order and tie: match
             [-1.0, -1.0, -1.0]]  # model tie where humans rank: no match
    hand = [True, True, True, False, True, False]  # 4 of 6
    summary, cols = compute_multi([np.array(m, np.float32) for m in model], [np.array(m, np.float32) for m in model],
                                  [np.array(h, np.float32) for h in human])
    assert summary["ranking_accuracy"] == pytest.approx(4 / 6) and list(cols["correct"]) == hand
    assert summary["responses_per_prompt"] == {"3": 4, "4": 1, "5": 1}
    assert summary["prompts_with_tied_human_scores"] == 3
    assert list(cols["human_rank"][4]) == [4, 1, 2, 2, 5]  # 1 + number of strictly better responses
    assert list(cols["human_rank"][0]) == [1, 2, 3, 4, 4]  # padded slots: rank n + 1 on both sides


def test_training_pairs_pass_pair_records_through(tmp_path):
    pairs = formats.load_preferences(_write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    records, log, derived = multi_response.training_pairs(pairs.records, "all_pairs", 0, pairs.rejects)
    assert records == pairs.records and log is pairs.rejects and derived is None


def test_bad_mode_and_config_key():
    from jaxpref.config import ConfigError, DataConfig

    with pytest.raises(ValueError, match="best_vs_worst"):
        derive_pairs([], "best_vs_best")
    with pytest.raises(ConfigError, match=r"data.multi_pairs='pairs'.*best_vs_random"):
        DataConfig(multi_pairs="pairs")
