"""Row-level validation: the reasons a row is rejected and the log that records them.

Every stage of the data pipeline (parsing a line, normalising a record, tokenising a pair)
either keeps a row or rejects it into one shared :class:`RejectLog`, with a reason from
:data:`REASONS`. A row is rejected at most once, so at every stage

    kept rows + rejected rows == input rows.

``RejectLog.write`` saves the rejects as ``rejects.jsonl`` (one ``{row, id, reason, field,
detail}`` object per line) and ``RejectLog.summary`` gives the counts per reason.

Text policy (:func:`check_text`): a text field must be a ``str`` (``null``, numbers, booleans,
lists and objects are ``not_text``), non-empty (``empty_field``), not whitespace-only
(``whitespace_only``), encodable as UTF-8 (lone surrogates from ``"\\ud800"`` escapes are
``invalid_utf8``, like undecodable bytes in a file), and free of control characters. Control
characters (C0 except tab, newline and carriage return; DEL; C1) are **rejected by default**
(``control_characters``): preference text is never altered silently, and in real corpora such
characters mark corruption (none of the shared HH-RLHF, LLMFAO or PandaLM records has one). With
``control_chars="strip"`` they are removed instead and the row is kept unless it becomes empty.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterator

# Every reason a row can be rejected for, with what it means.
REASONS: dict[str, str] = {
    # parsing (sources.py)
    "invalid_json": "the line is not valid JSON",
    "invalid_utf8": "undecodable bytes, or a lone surrogate that cannot be encoded as UTF-8",
    "truncated_line": "the last line has no newline and does not parse (file cut short)",
    "not_an_object": "the row is valid JSON but not an object",
    # normalising (formats.py)
    "missing_field": "a required field is absent",
    "not_text": "a text field holds null, a number, a boolean, a list or an object",
    "empty_field": "a text field is the empty string",
    "whitespace_only": "a text field holds only whitespace",
    "control_characters": "a text field contains control characters (policy 'reject')",
    "identical": "chosen and rejected are the same",
    "invalid_vote": "the vote share is not a number in [0, 1]",
    "tie": "the vote share is exactly 0.5 and ties are dropped",
    "invalid_id": "the id field is not a string or an integer",
    "duplicate_id": "another kept row has the same id",
    "invalid_messages": "a message list is malformed (not a list of {role, content} objects)",
    "no_common_prompt": "the two transcripts share no prefix ending in an assistant tag",
    # multi-response rows (multi_response.py)
    "invalid_responses": "the response list is not a list of strings or objects, or its score list does not match",
    "too_few_responses": "fewer than two responses: nothing to rank or pair",
    "missing_score": "a response has no score or rating (absent, null or N/A)",
    "invalid_score": "a score or rating is not a finite number",
    "all_tied": "every response has the same score: no preference to learn",
    # tokenising (tokenize.py)
    "prompt_too_long": "the tokenised prompt is longer than the limit",
    "too_long": "prompt + response is longer than max_length (policy 'drop')",
    "prompt_prefix_mismatch": "the chat-template prompt is not a prefix of prompt + response",
    "template_error": "the chat template failed to render the conversation",
    "identical_after_truncation": "chosen and rejected token ids are equal after truncation",
}

# C0 controls except \t \n \r, DEL, C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class Reject:
    """One rejected row.

    Attributes:
      row: 0-based row index in the source (the line number for JSON Lines files).
      id: the row's id when it could be read, else None.
      reason: a key of :data:`REASONS`.
      field: the source field the reason is about (None for whole-row reasons).
      detail: a short human-readable explanation.
    """

    row: int
    id: str | None
    reason: str
    field: str | None = None
    detail: str = ""


class RejectLog:
    """Collects rejected rows across the pipeline stages.

    Attributes:
      n_input: number of input rows seen (set by the loader).
      source: description of where the rows came from (for messages).
    """

    def __init__(self, source: str = ""):
        self.source = source
        self.n_input = 0
        self._rejects: list[Reject] = []
        self._rows: set[int] = set()

    def add(self, row: int, reason: str, field: str | None = None, id: str | None = None,
            detail: str = "") -> None:
        """Records that ``row`` is rejected; a row may be rejected only once."""
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; known: {sorted(REASONS)}")
        if row in self._rows:
            first = next(r.reason for r in self._rejects if r.row == row)
            raise ValueError(f"row {row} rejected twice ({first!r}, then {reason!r}): use one RejectLog per "
                             "pipeline run (load -> normalise -> tokenise)")
        self._rows.add(row)
        self._rejects.append(Reject(row, id, reason, field, detail))

    def __len__(self) -> int:
        return len(self._rejects)

    def __iter__(self) -> Iterator[Reject]:
        return iter(self._rejects)

    def __contains__(self, row: int) -> bool:
        return row in self._rows

    @property
    def rows(self) -> set[int]:
        """The rejected row indices."""
        return set(self._rows)

    def by_row(self) -> dict[int, Reject]:
        """Rejected row index -> :class:`Reject`."""
        return {r.row: r for r in self._rejects}

    def counts(self) -> dict[str, int]:
        """Reason -> number of rows rejected for it (most frequent first)."""
        return dict(collections.Counter(r.reason for r in self._rejects).most_common())

    def first(self) -> str:
        """The first reject as ``"row R (id I) key K: reason: detail"``, or ``"no rejects"``."""
        if not self._rejects:
            return "no rejects"
        r = min(self._rejects, key=lambda x: x.row)
        ident = f" (id {r.id})" if r.id is not None else ""
        key = f" key {r.field}" if r.field else ""
        return f"row {r.row}{ident}{key}: {r.reason}" + (f": {r.detail}" if r.detail else "")

    def summary(self) -> str:
        """One line per reason, e.g. ``"rejected 4 of 2000 rows: identical 1, whitespace_only 3"``."""
        parts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        where = f" of {self.source}" if self.source else ""
        return f"rejected {len(self)} of {self.n_input} rows{where}" + (f": {parts}" if parts else "")

    def write(self, path: str | os.PathLike) -> None:
        """Writes ``rejects.jsonl``: one ``{row, id, reason, field, detail}`` object per line."""
        with open(path, "w", encoding="utf-8") as f:
            for r in sorted(self._rejects, key=lambda r: r.row):
                f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n")


class RowError(Exception):
    """Raised inside the pipeline to reject the current row (caught, never escapes)."""

    def __init__(self, reason: str, field: str | None = None, detail: str = ""):
        super().__init__(f"{reason} ({field}): {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


def check_text(value: object, field: str, control_chars: str = "reject", allow_blank: bool = False) -> str:
    """Validates one text field and returns it (control characters stripped if so configured).

    Args:
      value: the raw value read from the row.
      field: the source field name (for the reject record).
      control_chars: ``"reject"`` (default) or ``"strip"``.
      allow_blank: accept empty and whitespace-only strings (for responses, on request).

    Returns:
      The text, unchanged unless ``control_chars="strip"`` removed characters.

    Raises:
      RowError: with reason ``not_text``, ``empty_field``, ``whitespace_only``,
        ``invalid_utf8`` or ``control_characters``.
    """
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise RowError("not_text", field, f"expected a string, got {kind}")
    if _SURROGATE.search(value):
        raise RowError("invalid_utf8", field, "lone surrogate (cannot be encoded as UTF-8)")
    if _CONTROL.search(value):
        if control_chars == "reject":
            ch = _CONTROL.search(value).group()
            raise RowError("control_characters", field, f"contains control character U+{ord(ch):04X}")
        if control_chars != "strip":
            raise ValueError(f"control_chars must be 'reject' or 'strip', got {control_chars!r}")
        value = _CONTROL.sub("", value)
    if allow_blank:
        return value
    if value == "":
        raise RowError("empty_field", field, "empty string")
    if not value.strip():
        raise RowError("whitespace_only", field, f"only whitespace ({value!r})")
    return value
