"""More than two responses per prompt (UltraFeedback style): rows, pair derivation, exact-match scoring.

Input rows (format ``"multi"`` of :mod:`jaxpref.data.formats`; presets below) hold one prompt and a list
of ``n`` responses with a score or rating each, in one of two shapes:

* **objects** (UltraFeedback): ``{"prompt": ..., "completions": [{"response": ..., "overall_score": 8.5},
  ...]}``: ``responses_field`` is the list, ``response_field`` the text key and ``scores_field`` the score
  key inside each object;
* **flat**: ``{"prompt": ..., "responses": [...], "scores": [...]}``: ``scores_field`` is a row-level
  list parallel to ``responses_field``.

Higher scores are better. A score is a finite number (or a string holding one, as UltraFeedback's
``"Rating": "4"``). A row is rejected, with its reason (:data:`~jaxpref.data.validation.REASONS`), when:
the response list is not a list of strings / objects or the flat score list does not match it
(``invalid_responses``); it has fewer than two responses (``too_few_responses``); a response has no
score (``missing_score``: absent, null, ``""`` or ``"N/A"``; an incompletely rated row cannot be ranked,
so it is not ranked on a guess); a score is not a finite number (``invalid_score``); or a response text
fails :func:`~jaxpref.data.validation.check_text` (the field is named as ``completions[2].response``).

**Pair derivation** for training (:func:`derive_pairs`, ``data.multi_pairs``), chosen = the higher score:

* ``best_vs_worst``: the first best response against the first worst one (one pair per row);
* ``best_vs_random``: the first best response against one response drawn uniformly from those scored
  strictly lower (one pair per row; the draw is seeded by ``(seed, source row)``, so a row's pair does not
  depend on the other rows, the limit or the held-out split). UltraFeedback's usual binarisation
  (Tunstall et al. 2023, Zephyr) draws from all the other responses; tied ones are excluded here;
* ``all_pairs``: every two responses with different scores (up to ``n (n - 1) / 2`` pairs per row).

Ties are never pairs: a pair the mode would consider whose scores are equal (or whose texts are
identical) is **skipped and recorded** (:attr:`DerivedPairs.skipped`, ``reason`` ``tie`` or
``identical``); a row that yields no pair at all is rejected (``all_tied``, or ``identical`` when the
only differently scored responses have the same text). So at the row level ``kept + rejected = input``
still holds. Derived pairs are new records: ``row`` is the pair's position in the derived list (several
pairs can come from one source row; :attr:`DerivedPairs.source_rows` maps them back) and ``id`` is
``"<row id>:<i>><j>"`` with the positions of the chosen and rejected responses in the row. Tokenisation
rejects of derived pairs go to the pair-level log :attr:`DerivedPairs.rejects`.

**Evaluation** (``eval.ranking`` on a multi-response file): every response is scored and the ranking
accuracy for ``n > 2`` is the exact match of the full rank vectors of model and human scores (Chen et al.
2024, arXiv 2405.19534, Def. A.8 / App. A.6, the UltraFeedback columns of Tables 2-4;
:func:`jaxpref.metrics.exact_match_ranking`). Rows of different ``n`` are padded with ``-inf`` in both
score arrays (:func:`padded_scores`): a padded entry outranks nothing and gets rank ``n_real + 1`` in both,
so the padding never changes a match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpref.data.validation import RejectLog, RowError, check_text

PAIR_MODES = ("best_vs_worst", "best_vs_random", "all_pairs")
SALT = 0x9A125  # separates the best_vs_random draws from the other seeded streams
MISSING = ("", "n/a", "na", "none", "null")  # score strings that mean "not rated"
# Score keys tried inside response objects when the configured one is absent from every object (auto).
OBJECT_SCORE_KEYS = ("overall_score", "rating", "score")


@dataclasses.dataclass(frozen=True, slots=True)
class MultiResponseRecord:
    """One prompt with ``n >= 2`` scored responses.

    Attributes:
      row: 0-based row index in the source.
      id: the row's id (``"row:<index>"`` when the source has none).
      prompt: prompt text.
      responses: the ``n`` response texts, in source order.
      scores: the ``n`` scores (higher = better).
    """

    row: int
    id: str
    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]


# ---------------------------------------------------------------- reading a row


def _score(x: Any, field: str) -> float:
    if x is None or isinstance(x, str) and x.strip().lower() in MISSING:
        raise RowError("missing_score", field, "no score for this response (absent, null or N/A)")
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            raise RowError("invalid_score", field, f"expected a number, got {x!r}"[:200]) from None
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise RowError("invalid_score", field, f"expected a finite number, got {x!r}"[:200])
    return float(x)


def read_multi(v: dict, cfg) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """``(prompt, responses, scores)`` of one row (module docstring), or RowError.

    Args:
      v: the row object.
      cfg: a :class:`~jaxpref.data.formats.DataFormatConfig` (``prompt_field``, ``responses_field``,
        ``response_field``, ``scores_field``, ``control_chars``, ``allow_empty_responses``).
    """
    if cfg.prompt_field not in v:
        raise RowError("missing_field", cfg.prompt_field, "field absent")
    prompt = check_text(v[cfg.prompt_field], cfg.prompt_field, cfg.control_chars)
    rf, sf = cfg.responses_field, cfg.scores_field
    if rf not in v:
        raise RowError("missing_field", rf, "field absent")
    items = v[rf]
    if not isinstance(items, list):
        raise RowError("invalid_responses", rf, f"expected a list of responses, got {type(items).__name__}")
    if len(items) < 2:
        raise RowError("too_few_responses", rf, f"{len(items)} response(s); ranking needs at least 2")
    blank = cfg.allow_empty_responses
    if all(isinstance(x, dict) for x in items):
        texts, scores = [], []
        for i, x in enumerate(items):
            where = f"{rf}[{i}]"
            if cfg.response_field not in x:
                raise RowError("missing_field", f"{where}.{cfg.response_field}", "field absent")
            texts.append(check_text(x[cfg.response_field], f"{where}.{cfg.response_field}", cfg.control_chars,
                                    allow_blank=blank))
            scores.append(_score(x.get(sf), f"{where}.{sf}"))
        return prompt, tuple(texts), tuple(scores)
    if not all(isinstance(x, str) for x in items):
        raise RowError("invalid_responses", rf, "expected a list of strings (with a parallel score list) or "
                                                "a list of objects holding text and score")
    if sf not in v:
        raise RowError("missing_field", sf, "field absent (a score per response)")
    raw = v[sf]
    if not isinstance(raw, list) or len(raw) != len(items):
        got = f"{len(raw)} scores" if isinstance(raw, list) else type(raw).__name__
        raise RowError("invalid_responses", sf, f"expected a list of {len(items)} scores (one per response), "
                                                f"got {got}")
    texts = [check_text(x, f"{rf}[{i}]", cfg.control_chars, allow_blank=blank) for i, x in enumerate(items)]
    return prompt, tuple(texts), tuple(_score(s, f"{sf}[{i}]") for i, s in enumerate(raw))


def object_score_key(sample: Sequence[dict], cfg) -> str | None:
    """The score key of response objects in ``sample`` rows: ``cfg.scores_field`` when any object holds it,
    else the first of :data:`OBJECT_SCORE_KEYS` some object holds, else None (flat rows, or no key)."""
    lists = [v[cfg.responses_field] for v in sample if isinstance(v.get(cfg.responses_field), list)]
    objs = [x for items in lists for x in items if isinstance(x, dict)]
    return next((key for key in (cfg.scores_field, *OBJECT_SCORE_KEYS) if any(key in x for x in objs)), None)


# ---------------------------------------------------------------- pair derivation


@dataclasses.dataclass
class DerivedPairs:
    """Training pairs derived from multi-response records (module docstring).

    Attributes:
      records: the pairs as :class:`~jaxpref.data.formats.PreferenceRecord` s (``row`` = position here).
      source_rows: ``[n_pairs]`` int64 source row of each pair.
      rejects: a pair-level :class:`RejectLog` (``n_input = n_pairs``) for the tokenisation stage.
      skipped: one ``{row, id, i, j, reason}`` per skipped response pair (``tie`` / ``identical``).
      mode: the derivation mode.
      n_rows: input records; ``n_rows_kept`` of them gave at least one pair.
    """

    records: list
    source_rows: np.ndarray
    rejects: RejectLog
    skipped: list[dict]
    mode: str
    n_rows: int
    n_rows_kept: int

    def summary(self) -> dict[str, Any]:
        """Counts: rows in / with pairs, pairs, skipped response pairs by reason, pairs rejected later."""
        reasons = [s["reason"] for s in self.skipped]
        return {"mode": self.mode, "rows": self.n_rows, "rows_with_pairs": self.n_rows_kept,
                "pairs": len(self.records), "skipped_ties": reasons.count("tie"),
                "skipped_identical": reasons.count("identical"), "pairs_rejected": len(self.rejects),
                "pairs_rejected_by_reason": self.rejects.counts()}

    def write(self, directory: str | os.PathLike, prefix: str = "pairs") -> None:
        """``PREFIX_skipped.jsonl`` (the skipped tied / identical response pairs) and ``PREFIX_rejects.jsonl``
        (pairs rejected at tokenisation; ``row`` = the pair's position, ``id`` names its source row)."""
        directory = pathlib.Path(directory)
        with open(directory / f"{prefix}_skipped.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in self.skipped)
        self.rejects.write(directory / f"{prefix}_rejects.jsonl")


def _candidates(rec: MultiResponseRecord, mode: str, seed: int) -> tuple[list[tuple[int, int]], list[tuple]]:
    """``(pairs (chosen, rejected), skipped (i, j, reason))`` of one record under ``mode``."""
    s, t, n = rec.scores, rec.responses, len(rec.scores)
    if mode == "all_pairs":
        considered = [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:
        best = max(range(n), key=lambda k: (s[k], -k))  # first of the best
        considered = [(best, k) for k in range(n) if k != best]
    pairs, skipped = [], []
    for i, j in considered:
        if s[i] == s[j]:
            skipped.append((i, j, "tie"))
        elif t[i] == t[j]:
            skipped.append((i, j, "identical"))
        else:
            pairs.append((i, j) if s[i] > s[j] else (j, i))
    if mode == "best_vs_worst" and pairs:
        worst = min(s[j] for _, j in pairs)
        pairs = [next(p for p in pairs if s[p[1]] == worst)]  # the first worst
    elif mode == "best_vs_random" and pairs:
        pairs = [pairs[int(np.random.default_rng([int(seed), SALT, int(rec.row)]).integers(len(pairs)))]]
    return pairs, skipped


def derive_pairs(records: Sequence[MultiResponseRecord], mode: str = "best_vs_worst", *, seed: int = 0,
                 rejects: RejectLog | None = None, source: str = "") -> DerivedPairs:
    """Training pairs from multi-response records (module docstring); rows without a pair go to ``rejects``.

    Args:
      records: normalised multi-response records.
      mode: one of :data:`PAIR_MODES`.
      seed: seed of ``best_vs_random``.
      rejects: the row-level log (rows with no pair are added as ``all_tied`` / ``identical``).
      source: description for the pair-level log.
    """
    from jaxpref.data.formats import PreferenceRecord

    if mode not in PAIR_MODES:
        raise ValueError(f"pair derivation mode must be one of {PAIR_MODES}, got {mode!r}")
    out, src_rows, skipped, kept = [], [], [], 0
    for rec in records:
        pairs, skips = _candidates(rec, mode, seed)
        skipped += [{"row": rec.row, "id": rec.id, "i": i, "j": j, "reason": why} for i, j, why in skips]
        if not pairs:
            if rejects is not None:
                tie = all(x == rec.scores[0] for x in rec.scores)
                rejects.add(rec.row, "all_tied" if tie else "identical", None, rec.id,
                            f"no pair of the {len(rec.scores)} responses has different scores and texts "
                            f"(scores {list(rec.scores)})"[:200])
            continue
        kept += 1
        for i, j in pairs:
            out.append(PreferenceRecord(len(out), f"{rec.id}:{i}>{j}", rec.prompt, rec.responses[i], rec.responses[j]))
            src_rows.append(rec.row)
    log = RejectLog(f"{source} ({mode} pairs)" if source else f"{mode} pairs")
    log.n_input = len(out)
    return DerivedPairs(out, np.asarray(src_rows, np.int64), log, skipped, mode, len(records), kept)


def is_multi(records: Sequence[Any]) -> bool:
    """True when ``records`` are :class:`MultiResponseRecord` s (format ``multi``)."""
    return bool(records) and isinstance(records[0], MultiResponseRecord)


def training_pairs(records: Sequence[Any], mode: str, seed: int, rejects: RejectLog, source: str = ""
                   ) -> tuple[list, RejectLog, DerivedPairs | None]:
    """``(pair records, the log their tokenisation rejects go to, DerivedPairs or None)``: multi-response
    records become :func:`derive_pairs`' pairs; pair records pass through with ``rejects`` (the trainers'
    and evaluators' one entry point)."""
    if not is_multi(records):
        return list(records), rejects, None
    derived = derive_pairs(records, mode, seed=seed, rejects=rejects, source=str(source))
    return derived.records, derived.rejects, derived


def load_records(source: str | os.PathLike, *, format: str | None = None, split: str | None = None,
                 fields: dict | None = None) -> tuple[list, RejectLog, Any]:
    """``(normalised records, rejects, run config or None)`` of a file / hub id, or of ``heldout:RUN_DIR``
    (the run's held-out records, read with its data settings; multi-response runs hold out prompts, so
    these are :class:`MultiResponseRecord` s then)."""
    from jaxpref.data import formats
    from jaxpref.data import split as data_split

    if data_split.is_heldout_spec(source):
        records, rejects, _, run_cfg = data_split.heldout_source(str(source))
        return records, rejects, run_cfg
    fmt = formats.format_config(None if format in (None, "auto") else format, fields=fields)
    data = formats.load_preferences(source, fmt, split=split)
    return data.records, data.rejects, None


# ---------------------------------------------------------------- scoring every response


@dataclasses.dataclass
class ScoringPairs:
    """Every response of multi-response records laid out as tokenised pairs, to score with
    :func:`jaxpref.evaluation.score_pairs`.

    Attributes:
      records: the records whose responses all tokenised, in order.
      pairs: ``TokenizedPairs``; record ``r``'s response ``k`` is side ``k % 2`` of pair
        ``offsets[r] + k // 2`` (an odd last response is scored on both sides of its pair).
      offsets: ``[n_records + 1]`` first pair of each record.
    """

    records: list[MultiResponseRecord]
    pairs: Any
    offsets: np.ndarray

    def response_scores(self, per_pair: np.ndarray) -> list[np.ndarray]:
        """Per record the ``[n]`` values of its responses from a ``[n_pairs, 2]`` array of pair sides."""
        return [np.asarray(per_pair[a:b]).reshape(-1)[:len(r.scores)]
                for r, a, b in zip(self.records, self.offsets[:-1], self.offsets[1:])]


def scoring_pairs(records: Sequence[MultiResponseRecord], tokenizer, config=None, *,
                  rejects: RejectLog | None = None) -> ScoringPairs:
    """Tokenises every response of each record against one shared prompt encoding (the truncation of the
    prompt follows the longest response, as for a pair) and lays them out as pairs; a record any of
    whose responses fails tokenisation is rejected into ``rejects`` (row level) with the reason."""
    from jaxpref.data import tokenize as tk

    cfg = config or tk.TokenizeConfig()
    stats = tk.TokenizeStats()
    enc = tk._encode(tokenizer, cfg, records, [list(r.responses) for r in records], rejects, stats)
    keep = [i for i, e in enumerate(enc) if e is not None]
    prompt, chosen, rejected, row, ids, offsets = [], [], [], [], [], [0]
    for i in keep:
        p, rs = enc[i]
        for k in range(0, len(rs), 2):
            prompt.append(p)
            chosen.append(rs[k])
            rejected.append(rs[k + 1] if k + 1 < len(rs) else rs[k])
            row.append(records[i].row)
            ids.append(f"{records[i].id}:{k}")
        offsets.append(len(prompt))
    n = len(prompt)
    pairs = tk.TokenizedPairs(prompt=prompt, chosen=chosen, rejected=rejected, row=np.asarray(row, np.int64),
                              ids=ids, votes=np.ones(n, np.float32), tie=np.zeros(n, bool),
                              pad_id=tk._pad_id(tokenizer), stats=stats)
    return ScoringPairs([records[i] for i in keep], pairs, np.asarray(offsets, np.int64))


def padded_scores(values: Sequence[np.ndarray]) -> np.ndarray:
    """``[N, n_max]`` float32 array of per-record ``[n_i]`` scores, padded with ``-inf`` (module docstring)."""
    n_max = max((len(v) for v in values), default=0)
    out = np.full((len(values), n_max), -np.inf, np.float32)
    for i, v in enumerate(values):
        out[i, :len(v)] = v
    return out
