"""Library glue for the evaluation scripts (``python -m eval.*``): load, score, generate, judge, write.

Scoring a pair dataset::

    loaded, tok = load_model_and_tokenizer("hf:path/to/model")
    data = load_eval_pairs("pairs.jsonl", tok, limit=1000)
    scores = score_pairs(loaded.model, data.pairs, batch_size=16, with_hidden=True)
    scores.sums[:, 0] - scores.sums[:, 1]          # [N] policy log-ratio, chosen minus rejected

:func:`score_pairs` runs ONE forward per batch of ``[2B, T]`` sequences (chosen and rejected
flattened), through a function jitted once per (model structure, bucket shape), and returns host
NumPy arrays in dataset order: summed / mean response log-probs and token counts
(:mod:`jaxpref.logprobs` conventions: the response includes EOS), and optionally the float32 sums
of the final hidden states at the positions that predict response tokens (CHES) and the last such
state (the final response token's state when EOS is appended). Pairs are sorted by length so each
batch lands in a small bucket; with a mesh the batch is split over its ``batch`` axes (single
process: outputs are gathered to the host).

Generation (:func:`generate_responses`) renders prompts exactly as the training pipeline does (chat
template or plain text, via :func:`jaxpref.data.tokenize_sft`), samples with
:func:`jaxpref.generation.generate` and decodes. Judges (:func:`load_judge`) are Python callables
``module:function`` (or ``path/file.py:function``) taking ``(prompts, responses_a, responses_b)`` and
returning ``P(a ≻ b)`` per prompt, or ``rm:RUN_DIR[@STEP]``, a jaxpref reward model
(:mod:`jaxpref.reward_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref import logprobs, parallel
from jaxpref.compile_cache import CompileWatch
from jaxpref.data import formats as data_formats
from jaxpref.data import multi_response
from jaxpref.data import split as data_split
from jaxpref.data.batching import pair_batch
from jaxpref.data.packing import pack_sequences, shared_lengths
from jaxpref.data.sources import DataError, load_rows
from jaxpref.data.tokenize import TokenizeConfig, TokenizedPairs, tokenize_pairs, tokenize_sft
from jaxpref.data.validation import RejectLog
from jaxpref.loading import LoadedModel, SpecError, check_vocab, load_model, load_tokenizer
from jaxpref.training.logging import progress_bar
from jaxpref.types import PairBatch

log = logging.getLogger(__name__)

Judge = Callable[[Sequence[Any], Sequence[str], Sequence[str]], np.ndarray]


# ------------------------------------------------------------------------------------ loading


def load_model_and_tokenizer(spec: str, tokenizer: str | None = None, *, mesh=None, dtype: str | None = None,
                             seed: int = 0, overrides: dict | None = None) -> tuple[LoadedModel, Any]:
    """A model spec (``preset:``, ``hf:DIR``, ``gguf:FILE``, ``run:DIR[@STEP]``, ...) and its tokenizer.

    Args:
      spec: model spec (see :mod:`jaxpref.loading`).
      tokenizer: tokenizer spec; default: the one the model spec implies (an HF directory's files, a
        run's ``model.json``). Presets need one (e.g. ``builtin``).
      mesh: place parameters on this mesh.
      dtype: compute dtype override.
      seed: init seed of ``preset:`` models.
      overrides: ModelConfig overrides of ``preset:`` models.
    """
    loaded = load_model(spec, mesh=mesh, dtype=dtype, seed=seed, overrides=overrides)
    tok_spec = tokenizer or loaded.tokenizer_spec
    tok = load_tokenizer(tok_spec)
    check_vocab(loaded.model, tok, tok_spec)
    loaded.tokenizer_spec = tok_spec
    return loaded, tok


@dataclasses.dataclass
class EvalData:
    """Preference pairs ready to score.

    Attributes:
      source: where they came from.
      records: the normalised records that survived tokenisation, aligned with ``pairs``.
      pairs: the tokenised pairs.
      rejects: rows rejected while loading or tokenising (with reasons).
      has_votes: the source gives vote shares α (``pairs.votes``); otherwise ``votes`` is 1.0.
    """

    source: str
    records: list
    pairs: TokenizedPairs
    rejects: RejectLog
    has_votes: bool


def load_eval_pairs(source: str | os.PathLike, tokenizer, *, format: str | None = None, split: str | None = None,
                    limit: int | None = None, tokenize: TokenizeConfig | None = None,
                    fields: dict | None = None, loaded: tuple | None = None) -> EvalData:
    """Load -> normalise -> (first ``limit`` records) -> tokenise, as training does.

    Args:
      source: local file or hub id, or ``heldout:RUN_DIR``: the held-out rows of a training run
        (:func:`jaxpref.data.split.heldout_source`; ``format``, ``split`` and ``fields`` are then the run's).
      format: data format or preset (``auto``/None detects; ``pandalm`` / ``llmfao`` give votes).
      split: hub split.
      limit: keep the first N normalised records.
      tokenize: :class:`TokenizeConfig` (default: the training defaults).
      fields: field-name mapping (see :func:`jaxpref.data.format_config`).
      loaded: ``(records, rejects, run config)`` of :func:`jaxpref.data.multi_response.load_records`, to not
        read ``source`` again. Multi-response records become pairs as in training (the run's
        ``data.multi_pairs``; ``best_vs_worst`` for a file).
    """
    records, rejects, run_cfg = loaded or multi_response.load_records(source, format=format, split=split,
                                                                      fields=fields)
    if records and isinstance(records[0], data_formats.SFTRecord):
        raise DataError(f"{source}: holds demonstrations (prompt/response), not preference pairs")
    records = records[:limit] if limit else records
    mode, seed = (run_cfg.data.multi_pairs, run_cfg.train.seed) if run_cfg is not None else ("best_vs_worst", 0)
    records, pair_rejects, _ = multi_response.training_pairs(records, mode, seed, rejects, str(source))
    pairs = tokenize_pairs(records, tokenizer, tokenize or TokenizeConfig(), rejects=pair_rejects)
    if len(pairs) == 0:
        raise DataError(f"{source}: no usable pairs ({rejects.summary()})")
    by_id = {r.id: r for r in records}
    return EvalData(source=str(source), records=[by_id[i] for i in pairs.ids], pairs=pairs, rejects=rejects,
                    has_votes=any(r.alpha is not None for r in records))


def run_checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Committed checkpoint steps of a jaxpref run directory, ascending (read-only)."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(run_dir).expanduser().resolve() / "checkpoints"
    if not directory.is_dir():
        raise SpecError(f"run {run_dir}: no checkpoints/ directory")
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        return sorted(int(s) for s in mngr.all_steps())
    finally:
        mngr.close()


# ------------------------------------------------------------------------------------ batching


def _batch_multiple(mesh) -> int:
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def iterate_pair_batches(pairs: TokenizedPairs, *, batch_size: int = 8, buckets: Sequence[int] | None = None,
                         mesh=None, sort_by_length: bool = True) -> Iterator[tuple[np.ndarray, PairBatch]]:
    """Yields ``(positions, batch)``: the dataset positions of the real rows and a padded :class:`PairBatch`.

    ``batch_size`` is rounded up to a multiple of the mesh's batch devices; short batches are padded
    with masked rows, so every batch of a bucket has the same shape. With a mesh the batch is placed
    (sharded over ``batch``).
    """
    b = batch_size + (-batch_size) % _batch_multiple(mesh)
    n = len(pairs)
    order = np.argsort(pairs.lengths().max(1), kind="stable") if sort_by_length else np.arange(n)
    for lo in range(0, n, b):
        idx = order[lo:lo + b]
        batch = pair_batch(pairs, idx, buckets=buckets, batch_size=b)
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh)
        yield idx, batch


# ------------------------------------------------------------------------------------ scoring


@dataclasses.dataclass
class PairScores:
    """Per-pair outputs in dataset order (``[:, 0]`` chosen, ``[:, 1]`` rejected), host NumPy.

    Attributes:
      sums: ``[N, 2]`` float32 summed response log-probs (EOS included when it is a target).
      counts: ``[N, 2]`` float32 response token counts.
      means: ``[N, 2]`` float32 ``sums / counts``.
      hidden_sums: ``[N, 2, D]`` float32 sums of the final hidden states predicting response tokens
        (Razin's S), or None.
      last_hidden: ``[N, 2, D]`` float32 the last such state, or None.
      stats: how the scoring spent its time (:class:`ScoreStats`).
    """

    sums: np.ndarray
    counts: np.ndarray
    means: np.ndarray
    hidden_sums: np.ndarray | None = None
    last_hidden: np.ndarray | None = None
    stats: ScoreStats | None = None


@dataclasses.dataclass
class ScoreStats:
    """Compile accounting and steady-state throughput of one :func:`score_pairs` call.

    Attributes:
      layout: ``packed`` (sequences packed into rows) or ``padded`` (``[2B, T]`` buckets).
      shapes: the distinct ``[rows, T]`` input shapes the scorer ran (one program each).
      compiles: XLA compilations (shapes neither in memory nor in the persistent cache).
      cache_loads: programs loaded from the persistent compilation cache.
      compile_s: tracing, compiling and cache loading (what a warm second call would not spend).
      wall_s: the whole call; ``wall_s - compile_s`` is the steady-state time.
      real_tokens: the tokens the layout has to compute: prompt + response of every sequence, or with
        ``share_prompt`` prompt + chosen + rejected of every pair.
      computed_tokens: token slots the model computed (padding included).
      sequence_tokens: prompt + response tokens of the scored sequences (each prompt counted twice, what
        a per-sequence loop computes); ``tokens_per_s`` is in these units, so layouts compare directly.
      share_prompt: each prompt was computed once per pair.
      head_tokens: positions the LM head ran on: the predicting positions, in whole chunks of ``seq_chunk``
        per batch (None: every position).
    """

    layout: str
    shapes: list[tuple[int, int]]
    compiles: int
    cache_loads: int
    compile_s: float
    wall_s: float
    real_tokens: int
    computed_tokens: int
    sequence_tokens: int | None = None
    share_prompt: bool = False
    head_tokens: int | None = None

    def to_json(self) -> dict:
        steady = max(self.wall_s - self.compile_s, 1e-9)
        seq_tokens = self.real_tokens if self.sequence_tokens is None else self.sequence_tokens
        return {"layout": self.layout, "share_prompt": self.share_prompt, "shapes": [list(x) for x in self.shapes],
                "compiles": self.compiles, "cache_loads": self.cache_loads, "compile_s": round(self.compile_s, 3),
                "wall_s": round(self.wall_s, 3), "steady_s": round(steady, 3),
                "tokens_per_s": round(seq_tokens / steady, 1), "sequence_tokens": seq_tokens,
                "real_tokens": self.real_tokens, "computed_tokens": self.computed_tokens,
                "real_token_fraction": round(self.real_tokens / max(self.computed_tokens, 1), 4),
                "head_tokens": self.computed_tokens if self.head_tokens is None else self.head_tokens}


def _last_predictor(hidden: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[N, D] float32 state at the position before the last target (predicts the final response token)."""
    t = loss_mask.shape[1]
    last_target = (t - 1) - jnp.argmax(loss_mask[:, ::-1] > 0, axis=1)
    idx = jnp.maximum(last_target - 1, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "with_hidden", "seq_chunk", "vocab_chunk"))
def _score_batch(graphdef, params, rest, batch: PairBatch, gather=None, *, with_hidden: bool, seq_chunk: int,
                 vocab_chunk: int):
    """Padded ``[B, 2, T]`` pairs; the LM head on every position, or with ``gather`` (:func:`_row_gather`) on
    the predicting positions only."""
    b, two, t = batch.input_ids.shape
    flat = lambda x: x.reshape(b * two, t)
    model = nnx.merge(graphdef, params, rest)
    ids, mask = flat(batch.input_ids), flat(batch.loss_mask)
    hidden = model(ids, positions=flat(batch.positions), segment_ids=flat(batch.segment_ids), right_padded=True).hidden
    matrix, layout = model.unembedding()
    kw = dict(layout=layout, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk, softcap=model.config.final_logit_softcap)
    if gather is None:
        lp = logprobs.sequence_logprobs(hidden, matrix, ids, mask, **kw)
        sums, counts = lp.sums, lp.counts
    else:
        sums, counts = logprobs.gathered_target_logprobs(hidden, matrix, *gather, num_segments=b * two + 1, **kw)
        sums, counts = sums[1:], counts[1:]
    out = {"sums": sums.reshape(b, two), "counts": counts.reshape(b, two)}
    if with_hidden:
        sums, _ = logprobs.masked_hidden_sums(hidden, mask)
        out["hidden_sums"] = sums.reshape(b, two, -1)
        out["last_hidden"] = _last_predictor(hidden, mask).reshape(b, two, -1)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "num_segments", "seq_chunk", "vocab_chunk"))
def _score_packed(graphdef, params, rest, ids, segments, positions, branches, gather, *, num_segments: int,
                  seq_chunk: int, vocab_chunk: int):
    """``(sums, counts)`` [num_segments] of the segments of packed rows ``[R, T]`` (segment 0 = padding);
    with ``branches`` (shared-prompt rows; else None) per sequence id :func:`jaxpref.logprobs.pair_sequence_ids`.
    The LM head runs only on the predicting positions ``gather`` (:func:`jaxpref.logprobs.predictor_index`)."""
    model = nnx.merge(graphdef, params, rest)
    branch = {} if branches is None else {"branch_ids": branches}
    hidden = model(ids, positions=positions, segment_ids=segments, **branch).hidden
    matrix, layout = model.unembedding()
    return logprobs.gathered_target_logprobs(hidden, matrix, *gather, num_segments=num_segments, layout=layout,
                                             seq_chunk=seq_chunk, vocab_chunk=vocab_chunk,
                                             softcap=model.config.final_logit_softcap)


def _head_gathers(packed, seq_chunk: int) -> list[tuple[np.ndarray, ...]]:
    """Per batch :func:`jaxpref.logprobs.predictor_index` arrays. Their size ``K`` is one per batch shape
    (no new shapes): the most targets in a batch of that many rows, rounded up to a multiple of
    ``seq_chunk``; the LM head stops after each batch's own last target chunk."""
    most: dict[int, int] = {}
    for k in range(packed.num_batches):
        _, mask, segments, _ = packed.batch(k)
        n = int(logprobs.segment_target_mask(mask, segments, packed.branches(k)).sum())
        most[packed.batch_rows(k)] = max(most.get(packed.batch_rows(k), 1), n)
    size = {rows: -(-n // seq_chunk) * seq_chunk for rows, n in most.items()}
    gathers = []
    for k in range(packed.num_batches):
        ids, mask, segments, _ = packed.batch(k)
        gathers.append(logprobs.predictor_index(ids, mask, segments, packed.branches(k),
                                                size=size[packed.batch_rows(k)]))
    return gathers


def _row_gather(batch: PairBatch) -> tuple[np.ndarray, ...]:
    """:func:`jaxpref.logprobs.predictor_index` of a padded batch, row ``i`` of ``[2B, T]`` as sequence
    ``i + 1``, sized ``2B * T`` (one size per bucket shape; the LM head stops after the last target)."""
    ids, mask, seg = (np.asarray(jax.device_get(x)).reshape(-1, x.shape[-1])
                      for x in (batch.input_ids, batch.loss_mask, batch.segment_ids))
    rows = np.where(seg != 0, np.arange(1, len(seg) + 1, dtype=np.int32)[:, None], 0)
    return logprobs.predictor_index(ids, mask, rows, size=ids.size)


MIN_REAL_FRACTION = 0.9


def _pack_for_scoring(pairs: TokenizedPairs, batch_size: int, row_multiple: int, share_prompt: bool):
    """Packs for :func:`score_pairs`: rows of :func:`ladder_length` of the longest item, or of the next ladder
    length when that fills the rows better and the first falls short of :data:`MIN_REAL_FRACTION` (items
    that are large next to the row, e.g. long shared-prompt rows, leave first-fit gaps)."""
    lengths = shared_lengths(pairs) if share_prompt else pairs.lengths()
    n = len(pairs)
    per_pair = float(lengths.reshape(n, -1).sum(1).mean()) if n else 1.0  # tokens of a pair's items
    t = ladder_length(int(lengths.max()) if n else 2)
    best = None
    for length in (t, 2 * t):
        rows = max(1, round(batch_size * per_pair / length))
        packed = pack_sequences(pairs, length, rows, row_multiple=row_multiple, share_prompt=share_prompt)
        if best is None or packed.efficiency() > best.efficiency():
            best = packed
        if best.efficiency() >= MIN_REAL_FRACTION or length >= SEQ_LADDER[-1]:
            break
    return best


SEQ_LADDER = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def ladder_length(n: int) -> int:
    """The smallest row length of :data:`SEQ_LADDER` that holds ``n`` tokens (a few shapes for every dataset)."""
    for t in SEQ_LADDER:
        if t >= n:
            return t
    raise ValueError(f"a sequence of {n} tokens is longer than the longest row length {SEQ_LADDER[-1]}")


def score_pairs(model, pairs: TokenizedPairs, *, batch_size: int = 8, buckets: Sequence[int] | None = None,
                mesh=None, with_hidden: bool = False, packing: bool | None = None, share_prompt: bool | None = None,
                seq_chunk: int = 128, vocab_chunk: int = 8192, progress: bool = True, desc: str = "score"
                ) -> PairScores:
    """Scores every pair under ``model`` (module docstring); returns :class:`PairScores` in dataset order.

    By default the ``2N`` sequences are **packed** (:func:`jaxpref.data.packing.pack_sequences`): first-fit
    decreasing over the whole dataset into rows of :func:`ladder_length` tokens, each sequence its own
    segment (block-diagonal attention, positions restarting at 0), one forward and one chunked log-prob
    pass per batch of rows, then a segment sum (:func:`jaxpref.logprobs.segment_logprobs`). Batches hold
    about the real tokens of ``batch_size`` pairs, and a dataset costs at most two shapes (the full batch
    and the cut last one); the row length is the ladder length of the longest item, doubled once when that
    fills rows to less than :data:`MIN_REAL_FRACTION` and the double does better. The padded ``[2B, T]``
    layout (``packing=False``, and always with ``with_hidden``) sorts pairs by length into power-of-two
    buckets.

    With ``share_prompt`` (the default when packing) the packed items are the pairs' ``[prompt | chosen |
    rejected]`` rows (:class:`~jaxpref.types.PackedPairBatch`'s shared-prompt layout): each prompt is
    computed once per pair, the rejected response attends to the prompt and itself only, with the
    positions of its own sequence, so the log-probs equal the separate layout's.

    Args:
      model: a jaxpref causal LM (place it on ``mesh`` first when one is given, e.g. ``load_model(mesh=)``).
      pairs: tokenised pairs.
      batch_size: pairs per forward (padded: exactly; packed: their real tokens, on average).
      buckets: padded lengths (None: powers of two up to the longest sequence); padded layout only.
      mesh: shard each batch over the mesh's ``batch`` axes.
      with_hidden: also return the hidden-state sums and last predictor states (CHES); padded layout.
      packing: pack sequences (default: True unless ``with_hidden``).
      share_prompt: one shared-prompt row per pair (default: ``packing``; packed layout only).
      seq_chunk, vocab_chunk: chunking of :func:`jaxpref.logprobs.sequence_logprobs`.
      progress: show a progress bar.
    """
    packing = (not with_hidden) if packing is None else packing
    share_prompt = packing if share_prompt is None else share_prompt
    if packing and with_hidden:
        raise ValueError("score_pairs: with_hidden needs the padded layout (packing=False)")
    if share_prompt and not packing:
        raise ValueError("score_pairs: share_prompt needs the packed layout (packing=True)")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = len(pairs)
    d = model.config.hidden_size
    sums, counts = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
    hs = np.zeros((n, 2, d), np.float32) if with_hidden else None
    lh = np.zeros((n, 2, d), np.float32) if with_hidden else None
    shapes: list[tuple[int, int]] = []
    computed = 0
    head = None
    start = time.perf_counter()
    with CompileWatch() as watch:
        if packing:
            packed = _pack_for_scoring(pairs, batch_size, _batch_multiple(mesh), share_prompt)
            seg_sums = np.zeros((packed.num_batches, packed.num_segments), np.float32)
            seg_counts = np.zeros_like(seg_sums)
            gathers = _head_gathers(packed, seq_chunk)
            head = sum(-(-int(g[3].sum()) // seq_chunk) * seq_chunk for g in gathers)  # chunks the head ran
            bar = progress_bar(packed.num_batches, enabled=progress, desc=desc)
            try:
                for k in range(packed.num_batches):
                    ids, _, segments, positions = packed.batch(k)
                    arrays = (ids, segments, positions, packed.branches(k))
                    if mesh is not None:
                        arrays = parallel.shard_batch(arrays, mesh)
                    out = _score_packed(graphdef, params, rest, *arrays, gathers[k], num_segments=packed.num_segments,
                                        seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)
                    seg_sums[k], seg_counts[k] = jax.device_get(out)
                    shapes.append(tuple(arrays[0].shape))
                    computed += arrays[0].size
                    bar.update(1)
            finally:
                bar.close()
            sums = seg_sums[packed.batch_of, packed.segment_of]
            counts = seg_counts[packed.batch_of, packed.segment_of]
        else:
            b = batch_size + (-batch_size) % _batch_multiple(mesh)
            bar = progress_bar(math.ceil(n / b), enabled=progress, desc=desc)
            try:
                head = 0
                for idx, batch in iterate_pair_batches(pairs, batch_size=batch_size, buckets=buckets, mesh=mesh):
                    gather = _row_gather(batch)
                    used = None if gather is None else int(gather[3].sum())  # None: every position
                    head += batch.input_ids.size if used is None else -(-used // seq_chunk) * seq_chunk
                    out = jax.device_get(_score_batch(graphdef, params, rest, batch, gather, with_hidden=with_hidden,
                                                      seq_chunk=seq_chunk, vocab_chunk=vocab_chunk))
                    k = len(idx)
                    sums[idx], counts[idx] = out["sums"][:k], out["counts"][:k]
                    if with_hidden:
                        hs[idx], lh[idx] = out["hidden_sums"][:k], out["last_hidden"][:k]
                    bsz, two, t = batch.input_ids.shape
                    shapes.append((bsz * two, t))
                    computed += bsz * two * t
                    bar.update(1)
            finally:
                bar.close()
    real = (shared_lengths(pairs) if share_prompt else pairs.lengths()).sum() if n else 0
    stats = ScoreStats(layout="packed" if packing else "padded", shapes=sorted(set(shapes)),
                       compiles=watch.compiles, cache_loads=watch.cache_loads, compile_s=watch.seconds,
                       wall_s=time.perf_counter() - start, real_tokens=int(real), computed_tokens=int(computed),
                       sequence_tokens=int(pairs.lengths().sum()) if n else 0, share_prompt=bool(share_prompt),
                       head_tokens=head)
    log.info("%s: %d pairs, %s layout%s, %d shape(s) %s, %d compile(s) + %d cache load(s) in %.1f s, %.0f tokens/s, "
             "real/computed tokens %.3f", desc, n, stats.layout, " (shared prompts)" if share_prompt else "",
             len(stats.shapes), stats.shapes, stats.compiles,
             stats.cache_loads, stats.compile_s, stats.to_json()["tokens_per_s"],
             stats.to_json()["real_token_fraction"])
    return PairScores(sums=sums, counts=counts, means=sums / np.maximum(counts, 1.0), hidden_sums=hs,
                      last_hidden=lh, stats=stats)


# ------------------------------------------------------------------------------------ prompts and generation


def load_prompts(source: str | os.PathLike, *, format: str | None = None, split: str | None = None,
                 limit: int | None = None, prompt_field: str = "prompt") -> tuple[list[str], list[Any]]:
    """``(ids, prompts)`` from a ``.txt`` file (one prompt per line), rows with a ``prompt`` field, any
    preference / SFT dataset the data pipeline reads (its normalised prompts), or ``heldout:RUN_DIR`` (the
    prompts of a run's held-out rows)."""
    path = pathlib.Path(source)
    if data_split.is_heldout_spec(source):  # the prompts of a run's held-out rows
        records = data_split.heldout_source(str(source))[0]
        ids, prompts = [r.id for r in records], [r.prompt for r in records]
    elif path.suffix == ".txt" and path.is_file():
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        ids, prompts = [f"line:{i}" for i in range(len(lines))], lines
    else:
        rows, _ = load_rows(source, split=split)
        objs = [(r, v) for r, v in rows if isinstance(v, dict)]
        if format in (None, "auto") and objs and all(isinstance(v.get(prompt_field), str | list) for _, v in objs):
            ids = [str(v.get("id", f"row:{r}")) for r, v in objs]
            prompts = [v[prompt_field] for _, v in objs]
        else:
            records, _, _ = data_formats.normalize(rows, None if format in (None, "auto") else format)
            ids, prompts = [r.id for r in records], [r.prompt for r in records]
    if limit:
        ids, prompts = ids[:limit], prompts[:limit]
    if not prompts:
        raise DataError(f"{source}: no prompts found")
    return ids, prompts


def encode_prompts(tokenizer, prompts: Sequence[Any], tokenize: TokenizeConfig | None = None
                   ) -> list[np.ndarray | None]:
    """Prompt token ids rendered as in training (generation prompt of the chat template, or plain text
    with BOS), truncated to ``max_length - 1`` from the left; None for prompts the pipeline rejects."""
    from jaxpref.data.formats import SFTRecord

    cfg = tokenize or TokenizeConfig()
    records = [SFTRecord(row=i, id=str(i), prompt=p, response=".") for i, p in enumerate(prompts)]
    out = tokenize_sft(records, tokenizer, dataclasses.replace(cfg, add_eos=False))
    ids: list[np.ndarray | None] = [None] * len(prompts)
    for row, p in zip(out.row, out.prompt):
        ids[int(row)] = p
    return ids


def _bucket(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def generate_responses(model, tokenizer, prompts: Sequence[Any], *, max_new_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                       batch_size: int = 8, tokenize: TokenizeConfig | None = None, progress: bool = True,
                       desc: str = "generate") -> list[str]:
    """Samples one response per prompt (row ``i`` uses ``fold_in(key(seed), i)``, independent of batching).

    Prompts are left padded to power-of-two lengths (few compilations); prompts the pipeline rejects
    get an empty response. Responses are decoded without special tokens (EOS removed).
    """
    from jaxpref.generation import SamplingConfig, generate, left_pad

    eos = [t for t in (tokenizer.eos_token_id,) if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         eos_token_ids=tuple(eos), pad_token_id=int(pad))
    encoded = encode_prompts(tokenizer, prompts, tokenize)
    live = [i for i, e in enumerate(encoded) if e is not None and len(e) > 0]
    live.sort(key=lambda i: len(encoded[i]))
    out = [""] * len(prompts)
    base = jax.random.key(seed)
    bar = progress_bar(math.ceil(len(live) / batch_size), enabled=progress, desc=desc)
    try:
        for lo in range(0, len(live), batch_size):
            rows = live[lo:lo + batch_size]
            seqs = [encoded[i].tolist() for i in rows]
            seqs += [seqs[0]] * (batch_size - len(seqs))  # static batch size; extra rows discarded
            ids, mask = left_pad(seqs, pad_id=int(pad), length=_bucket(max(map(len, seqs))))
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(
                jnp.asarray(rows + [rows[0]] * (batch_size - len(rows)), jnp.int32))
            res = jax.device_get(generate(model, ids, mask, key=keys, config=cfg))
            for j, i in enumerate(rows):
                toks = res.completion[j][res.completion_mask[j] > 0].tolist()
                while toks and toks[-1] in eos:
                    toks.pop()
                out[i] = tokenizer.decode(toks, skip_special_tokens=True)
            bar.update(1)
    finally:
        bar.close()
    return out


# ------------------------------------------------------------------------------------ judges


def _import_callable(spec: str) -> Callable:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise SpecError(f"judge {spec!r}: expected module:function, path/file.py:function or rm:RUN_DIR")
    if target.endswith(".py"):
        path = pathlib.Path(target).expanduser()
        if not path.is_file():
            raise SpecError(f"judge {spec!r}: file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise SpecError(f"judge {spec!r}: cannot import {target!r}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SpecError(f"judge {spec!r}: {target!r} has no callable {name!r}")
    return fn


def load_judge(spec: str, **kwargs) -> Judge:
    """A judge from a spec: ``rm:RUN_DIR[@STEP]`` (a reward model; ``kwargs`` go to it) or a callable.

    Every judge is called as ``judge(prompts, responses_a, responses_b)`` and returns ``[N]`` P(a ≻ b).
    """
    if spec.startswith("rm:"):
        from jaxpref.reward_model import RewardModelJudge

        return RewardModelJudge(spec[3:], **kwargs)
    fn = _import_callable(spec)

    def judge(prompts, a, b):
        p = np.asarray(fn(list(prompts), list(a), list(b)), np.float64).reshape(-1)
        if p.shape[0] != len(prompts):
            raise ValueError(f"judge {spec!r} returned {p.shape[0]} values for {len(prompts)} prompts")
        if np.any((p < 0) | (p > 1)):
            raise ValueError(f"judge {spec!r} returned values outside [0, 1]")
        return p

    return judge


# ------------------------------------------------------------------------------------ output helpers


def describe(x: np.ndarray) -> dict[str, float]:
    """Mean, std, min, quartiles and max of a 1-D array (NaN-free; empty -> all NaN)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {k: float("nan") for k in ("mean", "std", "min", "q25", "median", "q75", "max")}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(q[0]), "q25": float(q[1]),
            "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        x = float(x)
        return x if math.isfinite(x) else None  # strict JSON: NaN / inf -> null
    return x


def write_json(path: str | os.PathLike, obj: dict) -> pathlib.Path:
    """Writes strict JSON (NaN -> null), creating the parent directory."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> pathlib.Path:
    """One strict-JSON object per line."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(_jsonable(row)) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
