"""Normalising raw rows of many shapes into preference records, rejecting bad rows.

Supported input formats (``DataFormatConfig.format``):

* ``"explicit"``: ``prompt`` / ``chosen`` / ``rejected`` strings.
* ``"hh"``: Anthropic HH-RLHF full transcripts ``chosen`` / ``rejected``
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is the longest common (character)
  prefix of the two transcripts, cut after the last ``"\\n\\nAssistant:"`` inside it; each
  response is the rest of its transcript, leading space kept, so ``prompt + chosen`` is the raw
  chosen transcript exactly. Unlike "split at each transcript's last assistant tag", this gives
  one prompt even when the transcripts diverge at an earlier turn (then a response holds
  further turns).
* ``"messages"``: conversational ``chosen`` / ``rejected`` lists of ``{role, content}``. With a
  ``prompt`` field (a string or a message list) the prompt is that (and is removed from the
  front of chosen/rejected if they repeat it); without, the prompt is the longest shared
  prefix of turns that is followed by an assistant turn in both.
* ``"votes"``: ``response_a`` / ``response_b`` plus the share of annotators preferring a. The
  majority response becomes chosen and ``alpha`` = its vote share (in [0.5, 1]). A tie
  (share exactly 0.5) is kept with ``tie=True`` (a before b) unless ``drop_ties``.
* presets ``"llmfao"`` and ``"pandalm"``: the votes format with the field names of the shared
  multi-annotator files.
* ``"multi"``: one prompt with ``n >= 2`` scored responses (UltraFeedback style), as a list of
  ``{response, score}`` objects or flat ``responses`` / ``scores`` lists; gives
  :class:`~jaxpref.data.multi_response.MultiResponseRecord` s, from which training pairs are derived
  (best vs worst, best vs random, all pairs; :mod:`jaxpref.data.multi_response`). Presets
  ``"ultrafeedback"`` (``instruction`` + ``completions[].response`` / ``.overall_score``),
  ``"completions"`` (``prompt`` + ``completions``; the score key ``overall_score``, ``rating`` or
  ``score`` is picked from the rows) and ``"ratings"`` (flat ``responses`` / ``ratings``).
* ``"sft"`` (demonstrations, not pairs): ``prompt`` / ``response`` strings, or a ``messages``
  list whose last turn is the assistant's response; gives :class:`SFTRecord` s.

With ``format="auto"`` the format is detected from the fields of the first rows; when nothing
fits, a :class:`~jaxpref.data.sources.DataError` lists the fields seen.

Every row is either kept as a :class:`PreferenceRecord` or rejected into the
:class:`~jaxpref.data.validation.RejectLog` with a reason (see
:mod:`jaxpref.data.validation` for the text rules). Duplicate ids: the first kept row wins.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxpref.data import multi_response
from jaxpref.data.multi_response import MultiResponseRecord
from jaxpref.data.sources import DataError, Row, load_rows
from jaxpref.data.validation import RejectLog, RowError, check_text

Message = dict[str, str]
Text = str | list[Message]  # a plain string or a conversation

FORMATS = ("explicit", "hh", "messages", "votes", "multi", "sft")


@dataclasses.dataclass(frozen=True)
class DataFormatConfig:
    """How to read preference rows.

    Attributes:
      format: ``"auto"``, one of :data:`FORMATS`, or a preset name (``"llmfao"``,
        ``"pandalm"``, ``"ultrafeedback"``, ``"completions"``, ``"ratings"``; resolved by
        :func:`format_config`).
      prompt_field: prompt text (explicit, votes, optional for messages).
      chosen_field: chosen response / transcript / message list.
      rejected_field: rejected response / transcript / message list.
      response_a_field: first response of a voted pair.
      response_b_field: second response of a voted pair.
      vote_field: share of annotators preferring response a, in [0, 1].
      response_field: the demonstration of an ``sft`` row; the text key of ``multi`` response objects.
      responses_field: the response list of a ``multi`` row (strings or objects).
      scores_field: the score list of a flat ``multi`` row, or the score key inside its response objects.
      messages_field: the conversation of an ``sft`` row (instead of prompt/response).
      alpha_field: optional vote share for chosen in the explicit / hh / messages formats.
      id_field: field holding a row id (str or int); rows without one get ``"row:<index>"``.
      assistant_tag: the HH turn marker the prompt is cut after.
      drop_ties: reject (reason ``tie``) instead of keeping pairs with a vote share of 0.5.
      control_chars: ``"reject"`` (default) or ``"strip"``, see :mod:`jaxpref.data.validation`.
      allow_empty_responses: keep empty / whitespace-only *responses* (a judged empty answer is
        still a preference; 269 LLMFAO and 54 PandaLM pairs have one). Off by default: such
        rows are rejected as ``empty_field`` / ``whitespace_only``. Prompts must never be blank.
    """

    format: str = "auto"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    response_a_field: str = "response_a"
    response_b_field: str = "response_b"
    vote_field: str = "p_a_preferred"
    response_field: str = "response"
    responses_field: str = "responses"
    scores_field: str = "scores"
    messages_field: str = "messages"
    alpha_field: str | None = None
    id_field: str | None = "id"
    assistant_tag: str = "\n\nAssistant:"
    drop_ties: bool = False
    control_chars: str = "reject"
    allow_empty_responses: bool = False

    def __post_init__(self):
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"format must be 'auto', one of {FORMATS} or a preset {sorted(PRESETS)} "
                             f"(through format_config), got {self.format!r}")
        if self.control_chars not in ("reject", "strip"):
            raise ValueError(f"control_chars must be 'reject' or 'strip', got {self.control_chars!r}")
        if not self.assistant_tag:
            raise ValueError("assistant_tag must be non-empty")


PRESETS: dict[str, DataFormatConfig] = {
    # shared/data/llmfao_crowd_multiannotator.jsonl: crowd votes, x = "left".
    "llmfao": DataFormatConfig(format="votes", response_a_field="response_x", response_b_field="response_y",
                               vote_field="p_x_preferred", id_field="pair_id"),
    # shared/data/pandalm_testset_v1_multiannotator.jsonl: 3 human annotators.
    "pandalm": DataFormatConfig(format="votes", response_a_field="response1", response_b_field="response2",
                                vote_field="p_response1_preferred", id_field="idx"),
    # openbmb/UltraFeedback: instruction + completions[{response, overall_score, ...}].
    "ultrafeedback": DataFormatConfig(format="multi", prompt_field="instruction", responses_field="completions",
                                      scores_field="overall_score"),
    # prompt + completions[{response, overall_score | rating | score}] (the key is picked from the rows).
    "completions": DataFormatConfig(format="multi", responses_field="completions", scores_field="overall_score"),
    # flat prompt + responses[...] + ratings[...].
    "ratings": DataFormatConfig(format="multi", scores_field="ratings"),
}


def format_config(spec: str | DataFormatConfig | None = None, fields: dict[str, str] | None = None,
                  **overrides: Any) -> DataFormatConfig:
    """Resolves a format name, preset name or config, plus overrides, to a config.

    Args:
      spec: None (auto), a format name, a preset name or a :class:`DataFormatConfig`.
      fields: short field mapping, e.g. ``{"prompt": "question", "chosen": "good"}``; the keys are
        the ``*_field`` attribute names without the suffix (``prompt``, ``chosen``, ``rejected``,
        ``response_a``, ``response_b``, ``vote``, ``alpha``, ``id``, ``response``, ``messages``, ``responses``,
        ``scores``).
      **overrides: any other :class:`DataFormatConfig` attribute.
    """
    for key, value in (fields or {}).items():
        attr = f"{key}_field"
        if attr not in DataFormatConfig.__dataclass_fields__:
            known = sorted(k[:-6] for k in DataFormatConfig.__dataclass_fields__ if k.endswith("_field"))
            raise ValueError(f"unknown field mapping key {key!r}; known: {known}")
        overrides[attr] = value
    if spec is None:
        cfg = DataFormatConfig()
    elif isinstance(spec, DataFormatConfig):
        cfg = spec
    elif spec in PRESETS:
        cfg = PRESETS[spec]
    else:
        cfg = DataFormatConfig(format=spec)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclasses.dataclass(frozen=True, slots=True)
class PreferenceRecord:
    """One normalised preference pair.

    Attributes:
      row: 0-based row index in the source.
      id: the row's id (``"row:<index>"`` when the source has none).
      prompt: prompt text, or the prompt turns of a conversation.
      chosen: preferred response text (appended to the prompt verbatim), or response turns.
      rejected: dispreferred response, same type as ``chosen``.
      alpha: share of annotators preferring ``chosen`` (None when the source has no votes).
      tie: True when the votes were split exactly evenly (then ``alpha == 0.5``).
    """

    row: int
    id: str
    prompt: Text
    chosen: Text
    rejected: Text
    alpha: float | None = None
    tie: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class SFTRecord:
    """One normalised demonstration (format ``"sft"``).

    Attributes:
      row: 0-based row index in the source.
      id: the row's id (``"row:<index>"`` when the source has none).
      prompt: prompt text, or the prompt turns of a conversation.
      response: the response text, or the final assistant turn(s).
    """

    row: int
    id: str
    prompt: Text
    response: Text


@dataclasses.dataclass
class PreferenceData:
    """Normalised records plus the log of rejected rows.

    Attributes:
      records: kept records in source order.
      rejects: the :class:`RejectLog`; ``len(records) + len(rejects) == rejects.n_input``.
      config: the resolved format config (``format`` is never ``"auto"`` here).
    """

    records: list[PreferenceRecord] | list[SFTRecord] | list[MultiResponseRecord]
    rejects: RejectLog
    config: DataFormatConfig


# ---------------------------------------------------------------- field helpers


def _text(v: dict, field: str, cfg: DataFormatConfig, response: bool = False) -> str:
    if field not in v:
        raise RowError("missing_field", field, "field absent")
    return check_text(v[field], field, cfg.control_chars, allow_blank=response and cfg.allow_empty_responses)


def _share(v: dict, field: str) -> float:
    if field not in v:
        raise RowError("missing_field", field, "field absent")
    x = v[field]
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or not 0 <= x <= 1:
        raise RowError("invalid_vote", field, f"expected a number in [0, 1], got {x!r}"[:200])
    return float(x)


def _optional_alpha(v: dict, cfg: DataFormatConfig) -> float | None:
    return _share(v, cfg.alpha_field) if cfg.alpha_field else None


def _messages(value: Any, field: str, cfg: DataFormatConfig) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError("invalid_messages", field, "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise RowError("invalid_messages", f"{field}[{i}]", "expected an object with a string role and content")
        out.append({"role": m["role"], "content": check_text(m["content"], f"{field}[{i}].content",
                                                             cfg.control_chars)})
    return out


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_hh(chosen: str, rejected: str, assistant_tag: str = "\n\nAssistant:") -> tuple[str, str, str] | None:
    """Splits two HH transcripts into ``(prompt, chosen_response, rejected_response)``.

    The prompt is the longest common prefix, cut after the last ``assistant_tag`` inside it.
    Returns None when the common prefix holds no assistant tag.
    """
    common = os.path.commonprefix([chosen, rejected])
    k = common.rfind(assistant_tag)
    if k < 0:
        return None
    k += len(assistant_tag)
    return chosen[:k], chosen[k:], rejected[k:]


_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def transcript_to_messages(text: str) -> list[Message]:
    """Parses an HH transcript into ``{role, content}`` turns (contents stripped).

    ``"\\n\\nHuman: hi\\n\\nAssistant:"`` gives ``[user "hi", assistant ""]``: a trailing empty
    assistant turn marks where the model's response goes. Text before the first tag becomes a
    ``system`` turn when it is not blank.
    """
    parts = _TURN.split(text)
    out = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for tag, content in zip(parts[1::2], parts[2::2]):
        out.append({"role": "user" if "Human" in tag else "assistant", "content": content.strip()})
    return out


# ---------------------------------------------------------------- per-format readers
# Each returns (prompt, chosen, rejected, alpha, tie) or raises RowError.


def _read_explicit(v: dict, cfg: DataFormatConfig):
    prompt = _text(v, cfg.prompt_field, cfg)
    chosen = _text(v, cfg.chosen_field, cfg, response=True)
    rejected = _text(v, cfg.rejected_field, cfg, response=True)
    alpha = _optional_alpha(v, cfg)
    if chosen == rejected:
        raise RowError("identical", None, "chosen == rejected")
    return prompt, chosen, rejected, alpha, False


def _read_hh(v: dict, cfg: DataFormatConfig):
    raw_c = _text(v, cfg.chosen_field, cfg)
    raw_r = _text(v, cfg.rejected_field, cfg)
    alpha = _optional_alpha(v, cfg)
    if raw_c == raw_r:
        raise RowError("identical", None, "chosen == rejected")
    split = split_hh(raw_c, raw_r, cfg.assistant_tag)
    if split is None:
        raise RowError("no_common_prompt", None, f"no {cfg.assistant_tag!r} in the common prefix")
    prompt, chosen, rejected = split
    check_text(chosen, cfg.chosen_field, allow_blank=cfg.allow_empty_responses)
    check_text(rejected, cfg.rejected_field, allow_blank=cfg.allow_empty_responses)
    return prompt, chosen, rejected, alpha, False


def _read_messages(v: dict, cfg: DataFormatConfig):
    chosen = _messages(v.get(cfg.chosen_field), cfg.chosen_field, cfg) if cfg.chosen_field in v else None
    rejected = _messages(v.get(cfg.rejected_field), cfg.rejected_field, cfg) if cfg.rejected_field in v else None
    if chosen is None or rejected is None:
        raise RowError("missing_field", cfg.chosen_field if chosen is None else cfg.rejected_field, "field absent")
    alpha = _optional_alpha(v, cfg)
    if chosen == rejected:
        raise RowError("identical", None, "chosen == rejected")
    p = v.get(cfg.prompt_field)
    if p is not None:
        prompt = ([{"role": "user", "content": _text(v, cfg.prompt_field, cfg)}] if isinstance(p, str)
                  else _messages(p, cfg.prompt_field, cfg))
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:  # full conversations that repeat the prompt
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        k = _common_prefix_len(chosen, rejected)
        # Cut back to a point where both continue with an assistant turn.
        while k > 0 and not (k < len(chosen) and k < len(rejected)
                             and chosen[k]["role"] == rejected[k]["role"] == "assistant"):
            k -= 1
        if k == 0:
            raise RowError("no_common_prompt", None, "no shared turns followed by an assistant turn")
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if not chosen or not rejected:
        field = cfg.chosen_field if not chosen else cfg.rejected_field
        raise RowError("empty_field", field, "no response turns after the prompt")
    if chosen == rejected:
        raise RowError("identical", None, "chosen == rejected after removing the prompt")
    return prompt, chosen, rejected, alpha, False


def _read_votes(v: dict, cfg: DataFormatConfig):
    prompt = _text(v, cfg.prompt_field, cfg)
    a = _text(v, cfg.response_a_field, cfg, response=True)
    b = _text(v, cfg.response_b_field, cfg, response=True)
    share = _share(v, cfg.vote_field)
    if a == b:
        raise RowError("identical", None, f"{cfg.response_a_field} == {cfg.response_b_field}")
    if share == 0.5:
        if cfg.drop_ties:
            raise RowError("tie", cfg.vote_field, "vote share 0.5")
        return prompt, a, b, 0.5, True
    return (prompt, a, b, share, False) if share > 0.5 else (prompt, b, a, 1.0 - share, False)


def _read_sft(v: dict, cfg: DataFormatConfig):
    if cfg.messages_field in v and cfg.prompt_field not in v:
        msgs = _messages(v[cfg.messages_field], cfg.messages_field, cfg)
        k = len(msgs)
        while k > 0 and msgs[k - 1]["role"] == "assistant":
            k -= 1
        if k == 0 or k == len(msgs):
            raise RowError("invalid_messages", cfg.messages_field, "expected prompt turns then assistant turn(s)")
        return msgs[:k], msgs[k:], None, None, False
    return _text(v, cfg.prompt_field, cfg), _text(v, cfg.response_field, cfg), None, None, False


def _read_multi(v: dict, cfg: DataFormatConfig):
    prompt, responses, scores = multi_response.read_multi(v, cfg)
    return prompt, responses, scores, None, False


_READERS: dict[str, Callable] = {
    "explicit": _read_explicit, "hh": _read_hh, "messages": _read_messages, "votes": _read_votes,
    "multi": _read_multi, "sft": _read_sft,
}


# ---------------------------------------------------------------- detection and driver


def detect_format(rows: Sequence[Row], cfg: DataFormatConfig | None = None, source: str = "") -> DataFormatConfig:
    """Picks a format from the fields of the first 200 object rows (see module docstring).

    Raises:
      DataError: when no format fits; the message lists the fields seen.
    """
    cfg = cfg or DataFormatConfig()
    sample = [v for _, v in rows[:200] if isinstance(v, dict)]
    keys = set().union(*(v.keys() for v in sample)) if sample else set()
    for preset in PRESETS.values():
        if preset.format == "votes" and {preset.prompt_field, preset.response_a_field, preset.response_b_field,
                                         preset.vote_field} <= keys:
            return preset
    if {cfg.prompt_field, cfg.responses_field} <= keys:
        flat = cfg.scores_field if cfg.scores_field in keys or "ratings" not in keys else "ratings"
        return dataclasses.replace(cfg, format="multi", scores_field=flat)
    for preset in PRESETS.values():
        if preset.format == "multi" and {preset.prompt_field, preset.responses_field} <= keys:
            return preset
    if {cfg.response_a_field, cfg.response_b_field, cfg.vote_field} <= keys:
        return dataclasses.replace(cfg, format="votes")
    if {cfg.chosen_field, cfg.rejected_field} <= keys:
        kinds = [type(v[cfg.chosen_field]) for v in sample if isinstance(v.get(cfg.chosen_field), str | list)]
        if kinds and kinds[0] is list:
            return dataclasses.replace(cfg, format="messages")
        return dataclasses.replace(cfg, format="explicit" if cfg.prompt_field in keys else "hh")
    if {cfg.prompt_field, cfg.response_field} <= keys or cfg.messages_field in keys:
        return dataclasses.replace(cfg, format="sft")
    where = f"{source}: " if source else ""
    seen = sorted(map(str, keys))[:50] if keys else "none (no JSON object rows)"
    raise DataError(
        f"{where}cannot detect the preference data format; fields seen: {seen}. Expected "
        f"{cfg.prompt_field}/{cfg.chosen_field}/{cfg.rejected_field} (explicit), "
        f"{cfg.chosen_field}/{cfg.rejected_field} transcripts (hh) or message lists (messages), "
        f"{cfg.prompt_field}/{cfg.response_a_field}/{cfg.response_b_field}/{cfg.vote_field} (votes), "
        f"{cfg.prompt_field}/{cfg.responses_field}/{cfg.scores_field} (multi), "
        f"{cfg.prompt_field}/{cfg.response_field} or {cfg.messages_field} (sft), "
        f"or a preset {sorted(PRESETS)}; pass a DataFormatConfig with your field names.")


def _row_id(v: dict, row: int, cfg: DataFormatConfig) -> str:
    if cfg.id_field is None or v.get(cfg.id_field) is None:
        return f"row:{row}"
    x = v[cfg.id_field]
    if isinstance(x, bool) or not isinstance(x, str | int):
        raise RowError("invalid_id", cfg.id_field, f"expected a string or integer, got {type(x).__name__}")
    return str(x)


def normalize(
    rows: Sequence[Row],
    format: str | DataFormatConfig | None = None,
    *,
    rejects: RejectLog | None = None,
) -> tuple[list[PreferenceRecord] | list[SFTRecord] | list[MultiResponseRecord], RejectLog, DataFormatConfig]:
    """Turns raw rows into preference records, rejecting bad rows with a reason.

    Args:
      rows: ``(row index, value)`` pairs as returned by :func:`~jaxpref.data.sources.load_rows`.
      format: a :class:`DataFormatConfig`, a format or preset name, or None (auto-detect).
      rejects: the log to add to (a new one whose ``n_input`` is ``len(rows)`` if None).

    Returns:
      ``(records, rejects, config)`` with the resolved config.
    """
    if rejects is None:
        rejects = RejectLog()
        rejects.n_input = len(rows)
    cfg = format_config(format)
    if cfg.format == "auto":
        cfg = dataclasses.replace(detect_format(rows, cfg, rejects.source), drop_ties=cfg.drop_ties,
                                  control_chars=cfg.control_chars, alpha_field=cfg.alpha_field,
                                  allow_empty_responses=cfg.allow_empty_responses)
    if cfg.format == "multi":  # the score key of response objects, when the configured one is not in the rows
        key = multi_response.object_score_key([v for _, v in rows[:200] if isinstance(v, dict)], cfg)
        cfg = dataclasses.replace(cfg, scores_field=key) if key else cfg
    read = _READERS[cfg.format]
    first_row: dict[str, int] = {}
    records: list[PreferenceRecord] = []
    for row, v in rows:
        rid = None
        try:
            if not isinstance(v, dict):
                raise RowError("not_an_object", None, f"expected a JSON object, got {type(v).__name__}")
            rid = _row_id(v, row, cfg)
            prompt, chosen, rejected, alpha, tie = read(v, cfg)
            if rid in first_row:
                raise RowError("duplicate_id", cfg.id_field, f"id first kept at row {first_row[rid]}")
        except RowError as e:
            rejects.add(row, e.reason, e.field, rid, e.detail)
            continue
        first_row[rid] = row
        if cfg.format == "sft":
            records.append(SFTRecord(row, rid, prompt, chosen))
        elif cfg.format == "multi":  # (prompt, responses, scores)
            records.append(MultiResponseRecord(row, rid, prompt, chosen, rejected))
        else:
            records.append(PreferenceRecord(row, rid, prompt, chosen, rejected, alpha, tie))
    return records, rejects, cfg


def load_preferences(
    source: str | os.PathLike,
    format: str | DataFormatConfig | None = None,
    *,
    split: str | None = None,
    name: str | None = None,
    rejects_path: str | os.PathLike | None = None,
) -> PreferenceData:
    """Loads and normalises preference pairs from a local file or a hub dataset.

    Args:
      source: local ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.parquet`` path or hub id.
      format: :class:`DataFormatConfig`, format name, preset name, or None (auto-detect).
      split: hub split (default ``"train"``).
      name: hub configuration name.
      rejects_path: if given, the rejected rows are written there as JSON Lines.

    Returns:
      :class:`PreferenceData` (records in source order, rejects, resolved config).

    Raises:
      DataError: for file-level problems (missing, empty, corrupt file; undetectable format).
    """
    rows, rejects = load_rows(source, split=split, name=name)
    records, rejects, cfg = normalize(rows, format, rejects=rejects)
    if rejects_path is not None:
        rejects.write(rejects_path)
    return PreferenceData(records, rejects, cfg)
