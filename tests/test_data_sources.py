"""Local file kinds (jsonl, jsonl.gz, json array, json lines named .json, parquet) and hub ids."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from jaxpref import data

ROWS = [{"id": f"x{i}", "prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(5)]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.gz", "p.json", "p_lines.json", "p.json.gz", "p.parquet"])
def test_local_kinds_give_the_same_rows(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif name == "p.json":
        path.write_text(json.dumps(ROWS, indent=1))
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(_jsonl(ROWS)))
    else:
        path.write_bytes(_jsonl(ROWS))
    rows, rejects = data.load_rows(path)
    assert rows == list(enumerate(ROWS)) and len(rejects) == 0 and rejects.n_input == 5
    prefs = data.load_preferences(path)
    assert [r.id for r in prefs.records] == [r["id"] for r in ROWS]


def test_bom_and_blank_lines(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(ROWS[:2]) + b"\n  \n" + _jsonl(ROWS[2:3]))
    rows, rejects = data.load_rows(path)
    assert [i for i, _ in rows] == [0, 1, 4] and rejects.n_input == 3


def test_json_array_errors_are_file_level(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a"}, {"prompt": ')
    with pytest.raises(data.DataError, match="broken.json: not valid JSON"):
        data.load_rows(path)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(data.DataError, match="bad.parquet: not a readable parquet file"):
        data.load_rows(bad)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(data.DataError) as err:
        data.load_preferences("jaxpref-tests/no-such-dataset", split="test")
    msg = str(err.value)
    assert "'jaxpref-tests/no-such-dataset'" in msg and "split='test'" in msg and "Offline mode is on" in msg
    assert time.perf_counter() - start < 30
