"""Reading raw rows from a local file or a Hugging Face hub dataset.

Two kinds of failure are kept apart:

* **File-level** problems make the whole source unusable and raise ONE :class:`DataError`
  naming the file and what was expected: missing file, a directory, an unknown extension, an
  empty file (or one with no rows), a gzip stream that is cut short or corrupt, a ``.json``
  array that does not parse, an unreadable parquet file, a hub dataset that cannot be reached
  (e.g. offline mode).
* **Row-level** problems reject one row into the :class:`~jaxpref.data.validation.RejectLog`
  and the rest of the file is read: a line that is not valid JSON (``invalid_json``), has
  undecodable bytes (``invalid_utf8``), or is the unterminated, unparsable last line of a file
  that was cut short (``truncated_line``).

JSON Lines files (``.jsonl``, ``.jsonl.gz``, and ``.json``/``.json.gz`` whose content is not a
JSON array) are read line by line here rather than through ``datasets``, which would fail the
whole file on one bad line. The row index of a JSON Lines row is its 0-based line number;
blank lines are skipped and are not rows. Parquet files are read with ``pyarrow``; hub
datasets with ``datasets.load_dataset``.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import zlib
from typing import Any

from jaxpref.data.validation import RejectLog

Row = tuple[int, Any]  # (row index, parsed JSON value)

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_EXPECTED = "a .jsonl / .jsonl.gz / .json / .json.gz / .parquet file"


class DataError(ValueError):
    """A file-level problem: the source as a whole cannot be read as preference data."""


def _is_local(source: str | os.PathLike) -> bool:
    """Local path unless it looks like a hub id (``name`` or ``owner/name``, no extension)."""
    if isinstance(source, os.PathLike):
        return True
    s = str(source)
    if pathlib.Path(s).expanduser().exists():
        return True
    return (s.startswith(("/", ".", "~")) or s.lower().endswith(EXTENSIONS)
            or s.count("/") > 1 or os.sep != "/" and os.sep in s)


def _extension(path: pathlib.Path) -> str:
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return "".join(path.suffixes[-2:]) or "(none)"


def _parse_line(raw: bytes, lineno: int, rows: list[Row], rejects: RejectLog) -> bool:
    """Parses one JSON Lines line into ``rows`` or ``rejects``; False for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        rejects.add(lineno, "invalid_utf8", detail=f"byte {e.start}: {e.reason}")
        return True
    if lineno == 0:
        text = text.removeprefix("\ufeff")  # UTF-8 byte-order mark
    if not text.strip():
        return False
    try:
        rows.append((lineno, json.loads(text)))
    except (ValueError, RecursionError) as e:
        reason = "invalid_json" if raw.endswith(b"\n") else "truncated_line"
        rejects.add(lineno, reason, detail=str(e)[:200])
    return True


def _read_jsonl(path: pathlib.Path, gz: bool, rejects: RejectLog) -> list[Row]:
    rows: list[Row] = []
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f):
                rejects.n_input += _parse_line(raw, lineno, rows, rejects)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: gzip stream is cut short or corrupt ({type(e).__name__}: {e}); "
                        "expected a complete gzip-compressed JSON Lines file") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}); expected {_EXPECTED}") from e
    return rows


def _read_json(path: pathlib.Path, gz: bool, rejects: RejectLog) -> list[Row]:
    """A ``.json`` file is a JSON array of rows, or JSON Lines under another name."""
    try:
        data = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: gzip stream is cut short or corrupt ({type(e).__name__}: {e}); "
                        "expected a complete gzip-compressed JSON file") from e
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head != b"[":
        rows: list[Row] = []
        for lineno, raw in enumerate(data.splitlines(keepends=True)):
            rejects.n_input += _parse_line(raw, lineno, rows, rejects)
        return rows
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e)[:200]}); expected a JSON array of row "
                        "objects or JSON Lines (one object per line)") from e
    rejects.n_input += len(value)
    return list(enumerate(value))


def _read_parquet(path: pathlib.Path, rejects: RejectLog) -> list[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}); expected {_EXPECTED}") from e
    rows = list(enumerate(table.to_pylist()))
    rejects.n_input += len(rows)
    return rows


def _read_hub(repo_id: str, split: str | None, name: str | None, rejects: RejectLog) -> list[Row]:
    import datasets

    split = split or "train"
    try:
        ds = datasets.load_dataset(repo_id, name, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        offline = any(os.environ.get(v, "0") not in ("0", "", "false", "False")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (" Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): unset it or pass a "
                "local file path." if offline else "")
        raise DataError(f"could not load Hugging Face dataset {repo_id!r} (config={name!r}, "
                        f"split={split!r}): {type(e).__name__}: {str(e)[:300]}.{hint} Expected a hub "
                        f"dataset id or {_EXPECTED}.") from e
    rows = list(enumerate(ds))
    rejects.n_input += len(rows)
    return rows


def load_rows(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    name: str | None = None,
    rejects: RejectLog | None = None,
) -> tuple[list[Row], RejectLog]:
    """Reads the raw rows of a local file or a hub dataset.

    Args:
      source: a local ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz`` or ``.parquet`` path,
        or a Hugging Face hub dataset id (``"owner/name"``).
      split: hub split (default ``"train"``); ignored for local files.
      name: hub dataset configuration name; ignored for local files.
      rejects: log to add row-level rejects to (a new one if None).

    Returns:
      ``(rows, rejects)``: ``rows`` is a list of ``(row index, parsed value)`` in file order
      (values are usually dicts but may be any JSON value; validation comes later), and
      ``len(rows) + len(rejects) == rejects.n_input``.

    Raises:
      DataError: for file-level problems (see module docstring); the message names the file.
    """
    rejects = RejectLog(str(source)) if rejects is None else rejects
    if not rejects.source:
        rejects.source = str(source)
    if not _is_local(source):
        if split is not None and not isinstance(split, str):
            raise DataError(f"split must be a string, got {split!r}")
        return _read_hub(str(source), split, name, rejects), rejects
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected {_EXPECTED}")
    if not path.exists():
        raise DataError(f"{path}: no such file; expected {_EXPECTED} (or a hub dataset id)")
    ext = _extension(path)
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unknown extension {ext!r}; expected {_EXPECTED}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); expected {_EXPECTED} with at least one row")
    if ext == ".parquet":
        rows = _read_parquet(path, rejects)
    elif ext.startswith(".jsonl"):
        rows = _read_jsonl(path, ext.endswith(".gz"), rejects)
    else:
        rows = _read_json(path, ext.endswith(".gz"), rejects)
    if rejects.n_input == 0:
        raise DataError(f"{path} has no rows (only blank lines or an empty array); expected "
                        f"{_EXPECTED} with at least one row")
    return rows, rejects
