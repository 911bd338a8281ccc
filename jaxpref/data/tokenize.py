"""Tokenising preference pairs (and SFT demonstrations) with a ``transformers`` tokenizer.

Two ways to build a sequence ``prompt + response + EOS``:

* **Chat template** (``TokenizeConfig.chat_template`` and the tokenizer has one). The prompt
  turns are rendered with ``add_generation_prompt=True``; the full conversation (prompt turns +
  response turns) without it. String prompts become one user turn, and HH transcripts
  (``"\\n\\nHuman: ...\\n\\nAssistant:"``) are split into their turns (``hh_turns``). The
  response tokens are the full conversation's tokens after the prompt's. **Prompt-prefix
  check:** the tokenised prompt must be a prefix of the tokenised full conversation. Templates
  and BPE merges can break this (e.g. a generation prompt ending in a space that merges with the
  response's first word). Then, with ``prefix_mismatch="separate"`` (default), if the rendered
  prompt *string* is a prefix of the rendered conversation, the rest of the string is tokenised
  separately and concatenated (counted in ``stats.prefix_fixed``), so the model is trained on
  exactly the prompt tokens it will see at generation time; otherwise, or with
  ``prefix_mismatch="reject"``, the pair is rejected (``prompt_prefix_mismatch``). EOS is
  appended when the rendered response does not already contain it.
* **Plain concatenation** (no template): ``tokenizer(prompt)`` (with the tokenizer's special
  tokens, e.g. BOS, when ``add_special_tokens``) + ``tokenizer(response)`` (none) + EOS. The two
  parts are tokenised separately by definition, so there is nothing to check.

Truncation (``max_length`` counts prompt + response + EOS of each sequence;
``max_prompt_length`` optionally caps the prompt):

* ``"keep_end"``: drop the *oldest* prompt tokens (a leading BOS is kept) until the prompt fits
  ``max_prompt_length`` and the longer response fits ``max_length``, keeping at least
  ``min_prompt_tokens``; responses still too long are then cut at the end (EOS lost).
* ``"truncate_response"``: a prompt over ``max_prompt_length`` (or leaving no room for one
  response token) is rejected (``prompt_too_long``); responses are cut at the end.
* ``"drop"``: any pair over a limit is rejected (``prompt_too_long`` / ``too_long``).

A pair whose chosen and rejected token ids are equal after truncation is rejected
(``identical_after_truncation``). Counts of truncations and rejects are in
:class:`TokenizeStats`. Tokenizer calls are batched over the whole dataset.

A chat template that cannot run in this environment is one :class:`TokenizerError`, not one reject per
row: an ``ImportError`` while rendering (e.g. transformers' "apply_chat_template requires jinja2"), or
the same exception (type and message) on each of the first :data:`ENV_CHECK_ROWS` records (all of
them when there are fewer) before any record rendered.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpref.data.formats import PreferenceRecord, SFTRecord, Text, transcript_to_messages
from jaxpref.data.validation import RejectLog, RowError

TRUNCATION = ("keep_end", "truncate_response", "drop")
_CHUNK = 8192  # texts per tokenizer call
ENV_CHECK_ROWS = 16  # identical template failures on this many first records, none rendered: not the data


class TokenizerError(RuntimeError):
    """The tokenizer cannot work in this environment (a missing package, a template that fails on every
    record); raised once instead of rejecting every row. The message names the tokenizer and the cause."""


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """How records become token ids.

    Attributes:
      max_length: most tokens of prompt + response + EOS in one sequence.
      max_prompt_length: most prompt tokens (None: only ``max_length`` applies).
      truncation: ``"keep_end"``, ``"truncate_response"`` or ``"drop"`` (module docstring).
      chat_template: use the tokenizer's chat template when it has one.
      prefix_mismatch: ``"separate"`` (fix by tokenising the response separately) or ``"reject"``.
      add_eos: end every response with EOS (a target token).
      add_special_tokens: plain mode: let the tokenizer add its special tokens (BOS) to prompts.
      hh_turns: chat mode: split HH ``Human:``/``Assistant:`` transcripts into turns.
      min_prompt_tokens: ``keep_end`` never cuts the prompt below this many tokens.
    """

    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: str = "keep_end"
    chat_template: bool = True
    prefix_mismatch: str = "separate"
    add_eos: bool = True
    add_special_tokens: bool = True
    hh_turns: bool = True
    min_prompt_tokens: int = 1

    def __post_init__(self):
        if self.truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {self.truncation!r}")
        if self.prefix_mismatch not in ("separate", "reject"):
            raise ValueError(f"prefix_mismatch must be 'separate' or 'reject', got {self.prefix_mismatch!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length), got {self.max_prompt_length}")
        if not 1 <= self.min_prompt_tokens < self.max_length:
            raise ValueError(f"min_prompt_tokens must be in [1, max_length), got {self.min_prompt_tokens}")


@dataclasses.dataclass
class TokenizeStats:
    """What tokenisation did (counts of records).

    Attributes:
      n_input: records given.
      n_kept: records kept.
      prompt_truncated: kept records whose prompt lost its oldest tokens (``keep_end``).
      response_truncated: kept records with at least one response cut at the end.
      prefix_fixed: records whose response was tokenised separately (prefix mismatch).
      rejected: reason -> number of records rejected here.
    """

    n_input: int = 0
    n_kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    prefix_fixed: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in self.rejected.items()) or "none"
        return (f"tokenised {self.n_kept} of {self.n_input} records; prompt truncated {self.prompt_truncated}, "
                f"response truncated {self.response_truncated}, prefix fixed {self.prefix_fixed}; rejected: {rej}")


@dataclasses.dataclass
class TokenizedPairs:
    """Token ids of kept pairs, the prompt stored once per pair.

    Sequence ``s`` of pair ``i`` is ``concat(prompt[i], chosen[i] or rejected[i])``; its loss
    mask is 1 on the response part (EOS included).

    Attributes:
      prompt: per pair, [P_i] int32 prompt ids.
      chosen: per pair, [C_i] int32 chosen response ids (EOS included).
      rejected: per pair, [R_i] int32 rejected response ids (EOS included).
      row: [N] int64 source row of each pair.
      ids: per pair, the record id.
      votes: [N] float32 share of votes for chosen (1.0 without votes).
      tie: [N] bool, votes split evenly.
      pad_id: token id used for padding.
      stats: :class:`TokenizeStats`.
    """

    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    row: np.ndarray
    ids: list[str]
    votes: np.ndarray
    tie: np.ndarray
    pad_id: int
    stats: TokenizeStats

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def responses(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self.chosen, self.rejected

    def lengths(self) -> np.ndarray:
        """[N, 2] int32 full sequence lengths (prompt + response) of chosen and rejected."""
        return _lengths(self)


@dataclasses.dataclass
class TokenizedSFT:
    """Token ids of kept demonstrations (sequence = ``prompt[i] + response[i]``).

    Attributes:
      prompt: per example, [P_i] int32 prompt ids.
      response: per example, [R_i] int32 response ids (EOS included).
      row: [N] int64 source row of each example.
      ids: per example, the record id.
      pad_id: token id used for padding.
      stats: :class:`TokenizeStats`.
    """

    prompt: list[np.ndarray]
    response: list[np.ndarray]
    row: np.ndarray
    ids: list[str]
    pad_id: int
    stats: TokenizeStats

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def responses(self) -> tuple[list[np.ndarray]]:
        return (self.response,)

    def lengths(self) -> np.ndarray:
        """[N, 1] int32 full sequence lengths."""
        return _lengths(self)


def _lengths(data: TokenizedPairs | TokenizedSFT) -> np.ndarray:
    """[N, K] prompt + response lengths, computed once (the token lists are never mutated)."""
    cached = data.__dict__.get("_lengths_cache")
    if cached is None or len(cached) != len(data):
        n = len(data)
        p = np.fromiter(map(len, data.prompt), np.int32, n)
        cached = np.stack([p + np.fromiter(map(len, r), np.int32, n) for r in data.responses], axis=1)
        cached.setflags(write=False)
        data.__dict__["_lengths_cache"] = cached
    return cached


# ---------------------------------------------------------------- rendering


def _is_hh(text: str) -> bool:
    return "\n\nHuman:" in text and text.rstrip().endswith("\n\nAssistant:")


def _conversation(prompt: Text, responses: Sequence[Text], hh_turns: bool):
    """(prompt turns, [response turns, ...]) for the chat template."""
    if isinstance(prompt, list):
        pm = prompt
    elif hh_turns and _is_hh(prompt):
        pm = transcript_to_messages(prompt)[:-1]  # drop the empty assistant turn at the end
    else:
        pm = [{"role": "user", "content": prompt}]
    out = []
    for r in responses:
        if isinstance(r, list):
            out.append(r)
        elif hh_turns and isinstance(prompt, str) and _is_hh(prompt):
            out.append(transcript_to_messages(prompt + r)[len(pm):])
        else:
            out.append([{"role": "assistant", "content": r}])
    return pm, out


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def _render(tokenizer, conversation: list, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _encode_batch(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Batched tokenizer calls, in chunks so peak memory stays bounded on big datasets."""
    out: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        out.extend(tokenizer(texts[start:start + _CHUNK], add_special_tokens=special)["input_ids"])
    return out


# ---------------------------------------------------------------- truncation


def _keep_tail(p: list[int], budget: int, bos: int | None) -> list[int]:
    if len(p) <= budget:
        return p
    if bos is not None and p and p[0] == bos and budget >= 2:
        return [bos] + p[len(p) - budget + 1:]
    return p[len(p) - budget:]


def _truncate(p: list[int], rs: list[list[int]], cfg: TokenizeConfig, bos: int | None, stats: dict):
    """Applies the truncation policy; returns (prompt, responses) or raises RowError."""
    L, mp = cfg.max_length, cfg.max_prompt_length
    longest = max(map(len, rs))
    if cfg.truncation == "keep_end":
        budget = min(L - 1, mp if mp is not None else L, max(cfg.min_prompt_tokens, L - longest))
        if len(p) > budget:
            p = _keep_tail(p, budget, bos)
            stats["prompt_truncated"] = True
    else:
        limit = min(L - 1, mp if mp is not None else L)
        if len(p) > limit:
            raise RowError("prompt_too_long", "prompt", f"{len(p)} prompt tokens > limit {limit}")
        if cfg.truncation == "drop" and len(p) + longest > L:
            raise RowError("too_long", None, f"{len(p)} + {longest} tokens > max_length {L}")
    room = L - len(p)
    if longest > room:
        rs = [r[:room] for r in rs]
        stats["response_truncated"] = True
    return p, rs


# ---------------------------------------------------------------- driver


def _chat_ids(tokenizer, cfg: TokenizeConfig, records: Sequence[Any], responses: list[list[Text]]):
    """Chat-template token ids with the prompt-prefix check (module docstring).

    Returns:
      ``(prompt_ids, response_ids, errors, fixed)``: per record the prompt ids and the ids of
      each response (None where rejected), record index -> RowError, and the records whose
      response was tokenised separately.
    """
    n = len(records)
    errors: dict[int, RowError] = {}
    p_text, f_text = [""] * n, [[""] * len(rs) for rs in responses]
    leading: set[str] = set()  # distinct failures before the first record that rendered
    n_leading, rendered = 0, False
    for i, rec in enumerate(records):
        try:
            pm, rms = _conversation(rec.prompt, responses[i], cfg.hh_turns)
            p_text[i] = _render(tokenizer, pm, True)
            f_text[i] = [_render(tokenizer, pm + rm, False) for rm in rms]
            rendered = True
        except ImportError as e:  # a package the template needs (jinja2) is missing: no row can render
            raise TokenizerError(f"tokenizer {_name(tokenizer)}: its chat template cannot run here: "
                                 f"{type(e).__name__}: {e}") from None
        except Exception as e:  # a template may raise anything (jinja errors, role checks)
            what = f"{type(e).__name__}: {e}"
            errors[i] = RowError("template_error", None, what[:200])
            if not rendered:
                leading.add(what)
                n_leading += 1
                if n_leading == min(n, ENV_CHECK_ROWS) >= 2 and len(leading) == 1:
                    raise TokenizerError(
                        f"tokenizer {_name(tokenizer)}: its chat template fails the same way on the first "
                        f"{n_leading} records ({what[:300]}); fix the template or tokenizer, or render without "
                        "it (data.chat_template=false / --no-chat-template)") from None
    ok = [i for i in range(n) if i not in errors]
    # Templates render their own BOS, so no special tokens are added here.
    enc = _encode_batch(tokenizer, [p_text[i] for i in ok] + [t for i in ok for t in f_text[i]], special=False)
    prompt_ids: list[list[int] | None] = [None] * n
    resp_ids: list[list[list[int] | None]] = [[None] * len(rs) for rs in responses]
    pending = []  # (record, response, response text) to tokenise on its own
    full_ids = iter(enc[len(ok):])
    for i, p in zip(ok, enc[:len(ok)]):
        prompt_ids[i] = p
        for j in range(len(responses[i])):
            full = next(full_ids)
            if full[:len(p)] == p:
                resp_ids[i][j] = full[len(p):]
            elif cfg.prefix_mismatch == "separate" and f_text[i][j].startswith(p_text[i]):
                pending.append((i, j, f_text[i][j][len(p_text[i]):]))
            else:
                errors.setdefault(i, RowError("prompt_prefix_mismatch", None,
                                              "tokenised prompt is not a prefix of prompt + response"))
    for (i, j, _), ids in zip(pending, _encode_batch(tokenizer, [t for *_, t in pending], special=False)):
        resp_ids[i][j] = ids
    return prompt_ids, resp_ids, errors, {i for i, *_ in pending}


def _plain_ids(tokenizer, cfg: TokenizeConfig, records: Sequence[Any], responses: list[list[Text]]):
    """Plain concatenation: prompt ids (with special tokens) and response ids (without)."""
    if any(not isinstance(r.prompt, str) for r in records) or any(
            not isinstance(x, str) for rs in responses for x in rs):
        raise ValueError("records hold message lists but no chat template is used; use a tokenizer "
                         "with a chat template (and TokenizeConfig.chat_template=True)")
    prompt_ids = _encode_batch(tokenizer, [r.prompt for r in records], special=cfg.add_special_tokens)
    flat = iter(_encode_batch(tokenizer, [x for rs in responses for x in rs], special=False))
    return prompt_ids, [[next(flat) for _ in rs] for rs in responses]


def _encode(tokenizer, cfg: TokenizeConfig, records: Sequence[Any], responses: list[list[Text]],
            rejects: RejectLog | None, stats: TokenizeStats) -> list[tuple[np.ndarray, list[np.ndarray]] | None]:
    """Core shared by pairs (2 responses per record) and SFT (1): one entry per record."""
    n = len(records)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if cfg.add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    use_chat = cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        prompt_ids, resp_ids, errors, fixed = _chat_ids(tokenizer, cfg, records, responses)
    else:
        (prompt_ids, resp_ids), errors, fixed = _plain_ids(tokenizer, cfg, records, responses), {}, set()

    out: list[tuple[np.ndarray, list[np.ndarray]] | None] = [None] * n
    for i, rec in enumerate(records):
        try:
            if i in errors:
                raise errors[i]
            p, rs = prompt_ids[i], resp_ids[i]
            if cfg.add_eos:
                rs = [r + [eos] if not use_chat or eos not in r else r for r in rs]
            if not p:
                raise RowError("empty_field", "prompt", "the prompt has no tokens")
            flags: dict[str, bool] = {}
            p, rs = _truncate(p, rs, cfg, bos, flags)
            if len(rs) == 2 and rs[0] == rs[1]:
                raise RowError("identical_after_truncation", None, "chosen and rejected token ids are equal")
        except RowError as e:
            stats.rejected[e.reason] = stats.rejected.get(e.reason, 0) + 1
            if rejects is not None:
                rejects.add(rec.row, e.reason, e.field, rec.id, e.detail)
            continue
        stats.prompt_truncated += flags.get("prompt_truncated", False)
        stats.response_truncated += flags.get("response_truncated", False)
        stats.prefix_fixed += i in fixed
        out[i] = (np.asarray(p, np.int32), [np.asarray(r, np.int32) for r in rs])
    stats.n_input, stats.n_kept = n, sum(o is not None for o in out)
    stats.rejected = dict(collections.Counter(stats.rejected).most_common())
    return out


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenize_pairs(
    records: Sequence[PreferenceRecord],
    tokenizer,
    config: TokenizeConfig | None = None,
    *,
    rejects: RejectLog | None = None,
) -> TokenizedPairs:
    """Tokenises preference pairs (module docstring: template, prefix check, truncation).

    Args:
      records: normalised :class:`~jaxpref.data.formats.PreferenceRecord` s.
      tokenizer: a ``transformers`` tokenizer (fast tokenizers are much quicker).
      config: :class:`TokenizeConfig` (defaults if None).
      rejects: log to add the rejected pairs to (e.g. ``PreferenceData.rejects``).

    Returns:
      :class:`TokenizedPairs` of the kept pairs in record order.

    Raises:
      TokenizerError: the chat template cannot run here (module docstring), instead of rejecting every row.
    """
    cfg = config or TokenizeConfig()
    stats = TokenizeStats()
    out = _encode(tokenizer, cfg, records, [[r.chosen, r.rejected] for r in records], rejects, stats)
    keep = [i for i, o in enumerate(out) if o is not None]
    return TokenizedPairs(
        prompt=[out[i][0] for i in keep],
        chosen=[out[i][1][0] for i in keep],
        rejected=[out[i][1][1] for i in keep],
        row=np.array([records[i].row for i in keep], np.int64),
        ids=[records[i].id for i in keep],
        votes=np.array([1.0 if records[i].alpha is None else records[i].alpha for i in keep], np.float32),
        tie=np.array([records[i].tie for i in keep], bool),
        pad_id=_pad_id(tokenizer),
        stats=stats,
    )


def tokenize_sft(
    records: Sequence[SFTRecord | PreferenceRecord],
    tokenizer,
    config: TokenizeConfig | None = None,
    *,
    rejects: RejectLog | None = None,
) -> TokenizedSFT:
    """Tokenises demonstrations: :class:`SFTRecord` ``response``, or a pair's ``chosen``.

    Same rules as :func:`tokenize_pairs` with one response per prompt.
    """
    cfg = config or TokenizeConfig()
    stats = TokenizeStats()
    responses = [[r.response if isinstance(r, SFTRecord) else r.chosen] for r in records]
    out = _encode(tokenizer, cfg, records, responses, rejects, stats)
    keep = [i for i, o in enumerate(out) if o is not None]
    return TokenizedSFT(
        prompt=[out[i][0] for i in keep],
        response=[out[i][1][0] for i in keep],
        row=np.array([records[i].row for i in keep], np.int64),
        ids=[records[i].id for i in keep],
        pad_id=_pad_id(tokenizer),
        stats=stats,
    )
