"""The bad-input corpus (tests/data/bad/): every file is a row-level reject or one clear error.

Row-level: the listed rows are rejected with the listed reason and field, the others are kept,
and kept + rejected == input rows. File-level: one DataError whose message names the file and
says what was expected. A hypothesis fuzz test throws random JSON rows (and random bytes) at
the loader: the only exception it may raise is DataError.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpref import data
from jaxpref.testing.tokenizers import make_tokenizer

BAD = pathlib.Path(__file__).parent / "data" / "bad"
FUZZ_EXAMPLES = int(os.environ.get("JAXPREF_FUZZ_EXAMPLES", "100"))  # a long run: 3000 passed (~90 s)


def _load(name, fmt=None, **kw):
    prefs = data.load_preferences(BAD / name, data.format_config(fmt, **kw) if kw else fmt)
    assert len(prefs.records) + len(prefs.rejects) == prefs.rejects.n_input
    return prefs


def _reasons(prefs):
    return {r.row: (r.reason, r.field) for r in prefs.rejects}


# file -> (format, {row: (reason, field)}, n_input)
ROW_LEVEL = {
    "missing_field.jsonl": (None, {1: ("missing_field", "chosen"), 2: ("missing_field", "prompt")}, 4),
    "non_text.jsonl": (None, {1: ("not_text", "prompt"), 2: ("not_text", "chosen"), 3: ("not_text", "rejected"),
                              4: ("not_text", "chosen"), 5: ("not_text", "rejected")}, 7),
    "empty_responses.jsonl": (None, {1: ("empty_field", "chosen"), 2: ("whitespace_only", "rejected"),
                                     3: ("whitespace_only", "prompt")}, 5),
    "identical.jsonl": (None, {1: ("identical", None)}, 3),
    "invalid_utf8.jsonl": (None, {1: ("invalid_utf8", None), 2: ("invalid_utf8", "prompt")}, 4),
    "control_chars.jsonl": (None, {1: ("control_characters", "prompt"), 2: ("control_characters", "rejected"),
                                   3: ("control_characters", "chosen")}, 5),
    "truncated_last_line.jsonl": (None, {2: ("truncated_line", None)}, 3),
    "bad_votes.jsonl": ("votes", {1: ("invalid_vote", "p_a_preferred"), 2: ("invalid_vote", "p_a_preferred"),
                                  3: ("invalid_vote", "p_a_preferred"), 4: ("invalid_vote", "p_a_preferred"),
                                  5: ("invalid_vote", "p_a_preferred"), 8: ("missing_field", "p_a_preferred"),
                                  9: ("invalid_vote", "p_a_preferred")}, 10),
    "duplicate_ids.jsonl": (None, {2: ("duplicate_id", "id"), 3: ("empty_field", "chosen"),
                                   5: ("duplicate_id", "id"), 6: ("invalid_id", "id")}, 7),
    "invalid_json.jsonl": (None, {1: ("invalid_json", None), 2: ("not_an_object", None),
                                  4: ("not_an_object", None), 5: ("invalid_json", None)}, 6),
    "hh_no_common_prompt.jsonl": ("hh", {1: ("no_common_prompt", None)}, 2),
    "bad_messages.jsonl": ("messages", {1: ("invalid_messages", "chosen[0]"), 2: ("invalid_messages", "chosen"),
                                        3: ("no_common_prompt", None)}, 4),
}


@pytest.mark.parametrize("name", sorted(ROW_LEVEL))
def test_row_level_rejects(name, tmp_path):
    fmt, expected, n_input = ROW_LEVEL[name]
    prefs = _load(name, fmt)
    assert prefs.rejects.n_input == n_input
    assert _reasons(prefs) == expected
    rows = set(range(n_input + 1)) - {3} if name == "invalid_json.jsonl" else set(range(n_input))  # line 3 blank
    assert sorted(r.row for r in prefs.records) == sorted(rows - set(expected))
    # rejects.jsonl: one {row, id, reason, field, detail} per rejected row
    prefs.rejects.write(tmp_path / "rejects.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(x["row"], x["reason"], x["field"]) for x in lines] == [(r, *expected[r]) for r in sorted(expected)]
    assert set(lines[0]) == {"row", "id", "reason", "field", "detail"}
    assert sum(prefs.rejects.counts().values()) == len(expected)
    assert f"rejected {len(expected)} of {n_input} rows" in prefs.rejects.summary()


FILE_LEVEL = {
    "cut_short.jsonl.gz": "gzip stream is cut short or corrupt",
    "corrupt.jsonl.gz": "gzip stream is cut short or corrupt",
    "empty.jsonl": "is empty (0 bytes)",
    "blank_lines.jsonl": "has no rows",
    "unknown_ext.csv": "unknown extension '.csv'",
    "undetectable.jsonl": "cannot detect the preference data format; fields seen: ['bad', 'good', 'question']",
    "directory.jsonl": "is a directory",
    "does_not_exist.jsonl": "no such file",
}


@pytest.mark.parametrize("name", sorted(FILE_LEVEL))
def test_file_level_errors(name):
    with pytest.raises(data.DataError) as err:
        data.load_preferences(BAD / name)
    msg = str(err.value)
    assert name in msg and FILE_LEVEL[name] in msg
    assert "expected" in msg.lower() or "Expected" in msg


def test_data_error_is_value_error():
    assert issubclass(data.DataError, ValueError)


def test_row_ids_and_kept_content():
    prefs = _load("duplicate_ids.jsonl")
    assert [r.id for r in prefs.records] == ["g0", "g1", "7"]
    by_row = {r.row: r for r in prefs.rejects}
    assert by_row[2].id == "g0" and "row 0" in by_row[2].detail
    utf8 = _load("invalid_utf8.jsonl")
    assert utf8.records[-1].prompt == "caf\u00e9 \u4e2d\u6587 \U0001f642"


def test_control_chars_strip_policy():
    prefs = _load("control_chars.jsonl", control_chars="strip")
    assert len(prefs.rejects) == 0
    texts = {r.row: r for r in prefs.records}
    assert texts[0].chosen == " tab\tand\nnewline\r\nare fine"  # \t \n \r are never touched
    assert texts[1].prompt == "nul  byte" and texts[2].rejected == " escape [31m red"
    assert texts[3].chosen == " C1  next line"


def test_empty_responses_allowed_on_request():
    prefs = _load("empty_responses.jsonl", allow_empty_responses=True)
    assert _reasons(prefs) == {3: ("whitespace_only", "prompt")}  # a blank prompt is never allowed


def test_votes_kept_rows_and_ties():
    prefs = _load("bad_votes.jsonl", "votes")
    got = {r.id: (r.chosen, r.rejected, r.alpha, r.tie) for r in prefs.records}
    assert got == {"v0": (" a", " b", 0.75, False), "v6": (" a", " b", 0.5, True),
                   "v7": (" b", " a", pytest.approx(0.8), False)}
    dropped = _load("bad_votes.jsonl", "votes", drop_ties=True)
    assert _reasons(dropped)[6] == ("tie", "p_a_preferred")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(template=None)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("policy", ["truncate_response", "drop", "keep_end"])
def test_long_prompt(policy, tokenizer):
    prefs = _load("long_prompt.jsonl")
    cfg = data.TokenizeConfig(max_length=64, truncation=policy)
    pairs = data.tokenize_pairs(prefs.records, tokenizer, cfg, rejects=prefs.rejects)
    assert len(pairs) + len(prefs.rejects) == prefs.rejects.n_input == 3
    if policy == "keep_end":
        assert len(pairs) == 3 and pairs.stats.prompt_truncated == 1
        assert pairs.lengths().max() <= 64
    else:
        assert _reasons(prefs) == {1: ("prompt_too_long", "prompt")}
        assert pairs.stats.rejected == {"prompt_too_long": 1}


# ---------------------------------------------------------------- fuzz

_KEYS = ["id", "prompt", "chosen", "rejected", "response_a", "response_b", "p_a_preferred", "messages", "response"]
_scalars = (st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=12) | st.sampled_from(["\n\nHuman: hi\n\nAssistant:", " \x00", "\ud800", ""]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=3), max_leaves=8)
_row = st.dictionaries(st.sampled_from(_KEYS), _json, max_size=7) | _json
_line = st.builds(lambda v: json.dumps(v).encode() + b"\n", _row) | st.binary(max_size=30).map(lambda b: b + b"\n")


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, min_size=1, max_size=8), fmt=st.sampled_from([None, *data.FORMATS]),
       cut=st.booleans())
def test_fuzz_loader_never_crashes(chat_tokenizer, lines, fmt, cut):
    raw = b"".join(lines)
    if cut and len(raw) > 2:
        raw = raw[:-2]  # a truncated last line
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "fuzz.jsonl"
        path.write_bytes(raw)
        try:
            prefs = data.load_preferences(path, fmt)
        except data.DataError as e:
            assert "fuzz.jsonl" in str(e)
            return
    rejects = prefs.rejects
    assert len(prefs.records) + len(rejects) == rejects.n_input
    for r in prefs.records:
        if r.alpha is not None:
            assert 0.5 <= r.alpha <= 1 and math.isfinite(r.alpha)
    sft = prefs.config.format == "sft"
    out = (data.tokenize_sft if sft else data.tokenize_pairs)(
        prefs.records, chat_tokenizer, data.TokenizeConfig(max_length=32), rejects=rejects)
    assert len(out) + len(rejects) == rejects.n_input
    assert out.lengths().max(initial=0) <= 32
