"""Packing preference pairs several sequences to a row (less padding, one static shape).

A padded :class:`~jaxpref.types.PairBatch` spends most of its ``[B, 2, T]`` slots on padding
when lengths vary (HH-RLHF at T 512: 41 % real tokens, see ``bench/README.md``). A
:class:`~jaxpref.types.PackedPairBatch` instead places the ``2B`` sequences of ``B`` pairs
into ``R`` rows of ``T`` tokens by **first-fit decreasing** (sequences sorted by length,
longest first, each put into the first row with room; Johnson 1973), every sequence its own
segment, so chosen and rejected of a pair never attend to each other and positions restart at
0 per segment. ``B``, ``R`` and ``T`` are static (one compile).

Fixed ``R`` means a batch's ``B`` pairs must fit. :func:`plan_groups` builds each epoch's
batches from the shuffled order greedily: it takes pairs in order while they fit (a full
first-fit-decreasing check per candidate), *defers* a pair that does not fit to the front of
the next batch, and closes a batch when it has ``B`` pairs or once more than ``lookahead``
candidates did not fit (the rest of the batch is padding pairs). The plan is a pure function of the order, so a
resumed run sees the same batches. Pairs still queued when the epoch's batches are used up
are left out of that epoch (reported as ``left_out``); with a sensible ``R``
(:func:`auto_rows`) that is a handful.

Micro-batches: with ``groups = k`` the batch is ``k`` independent packs interleaved (row
``r`` and pair slot ``p`` belong to group ``r % k`` / ``p % k``), matching the strided
micro-batch split of :mod:`jaxpref.training.step`. Segment ids ``2p + 1`` / ``2p + 2`` use the
pair's slot in the *global* batch (``first_slot`` offsets a process's slots) so they stay unique
when processes' rows are assembled into one global array.

Shared prompts (``PackSpec.share_prompt``, ``data.share_prompt``): a pair is ONE item
``[prompt | chosen | rejected]`` of ``P + C + R`` tokens instead of two of ``P + C`` and ``P + R``,
segment ``slot + 1``, with branch ids 0 / 1 / 2 (:class:`~jaxpref.types.PackedPairBatch`): the
prompt is computed once per pair. :func:`shared_pair_batch` is the unpacked form (one pair per
row), :func:`pack_sequences` ``(share_prompt=True)`` the scoring form.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxpref.data.tokenize import TokenizedPairs
from jaxpref.types import PackedPairBatch


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Static shape of packed batches (per process).

    Attributes:
      seq_len: ``T``, tokens per row (>= the longest sequence).
      rows: ``R``, rows per (process-local) batch; a multiple of ``groups``, >= 2 per group.
      groups: interleaved packs per batch (= the gradient-accumulation micro-batches it serves).
      lookahead: a batch is closed once more than this many candidates did not fit.
      share_prompt: one item ``[prompt | chosen | rejected]`` per pair (module docstring).
    """

    seq_len: int
    rows: int
    groups: int = 1
    lookahead: int = 8
    share_prompt: bool = False

    def __post_init__(self):
        if self.seq_len < 2 or self.groups < 1 or self.lookahead < 0:
            raise ValueError(f"PackSpec needs seq_len >= 2, groups >= 1, lookahead >= 0; got {self}")
        if self.rows % self.groups or self.rows // self.groups < 2:
            raise ValueError(f"PackSpec.rows={self.rows} must be a multiple of groups={self.groups} with at least "
                             "2 rows per group (a pair's two sequences may each need a row)")

    @property
    def rows_per_group(self) -> int:
        return self.rows // self.groups


def first_fit_decreasing(lengths: Sequence[int], capacity: int, max_bins: int | None = None) -> np.ndarray | None:
    """Bin of each item under first-fit decreasing; None when more than ``max_bins`` are needed.

    Items are taken longest first (ties: lower index first, so the result is deterministic) and
    each goes into the lowest-numbered bin with room.

    Args:
      lengths: [n] item sizes, each in ``[0, capacity]``.
      capacity: bin size.
      max_bins: limit on bins (None: unlimited).

    Returns:
      [n] int64 bin index per item (bins numbered in opening order), or None.
    """
    lengths = [int(x) for x in lengths]
    if any(x > capacity or x < 0 for x in lengths):
        raise ValueError(f"item sizes {lengths} must lie in [0, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    limit = len(lengths) if max_bins is None else min(max_bins, len(lengths))
    rooms = _RoomTree(max(limit, 1), capacity)
    out = np.zeros(len(lengths), np.int64)
    for i in order:
        b = rooms.first_with_room(lengths[i])
        if b is None:
            return None
        rooms.take(b, lengths[i])
        out[i] = b
    return out


class _RoomTree:
    """Remaining room of ``n`` bins (unopened bins have full room, so the first bin with room is an opened
    one when any fits, else the next one to open) in a max segment tree: first-fit in O(log n) per item."""

    def __init__(self, n: int, capacity: int):
        self.size = 1 << max(0, n - 1).bit_length()
        self.tree = [0] * self.size + [capacity] * n + [-1] * (self.size - n)  # leaves at [size, 2 size)
        for i in range(self.size - 1, 0, -1):
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])

    def first_with_room(self, size: int) -> int | None:
        if self.tree[1] < size:
            return None
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= size else 2 * i + 1
        return i - self.size

    def take(self, b: int, size: int) -> None:
        i = self.size + b
        self.tree[i] -= size
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2


def shared_lengths(pairs: TokenizedPairs) -> np.ndarray:
    """[N] int32 tokens of each pair's shared-prompt row ``[prompt | chosen | rejected]``."""
    return np.asarray([len(p) + len(c) + len(r) for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected)],
                      np.int32).reshape(-1)


def item_lengths(pairs: TokenizedPairs, spec: PackSpec) -> np.ndarray:
    """[N, k] sizes of the items a pair packs into: ``[N, 2]`` sequence lengths, or ``[N, 1]`` shared rows."""
    return shared_lengths(pairs)[:, None] if spec.share_prompt else pairs.lengths()


def _write_shared(arrays, row: int, lo: int, prompt, chosen, rejected, seg: int) -> int:
    """Writes ``[prompt | chosen | rejected]`` at ``row, lo`` (segment ``seg``); returns the end column."""
    input_ids, loss_mask, segment_ids, positions, branch_ids = arrays
    n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
    c0, r0 = lo + n_p, lo + n_p + n_c
    hi = r0 + n_r
    input_ids[row, lo:c0], input_ids[row, c0:r0], input_ids[row, r0:hi] = prompt, chosen, rejected
    loss_mask[row, c0:hi] = 1
    loss_mask[row, lo] = 0  # a segment's first token is never a target
    segment_ids[row, lo:hi] = seg
    positions[row, lo:r0] = np.arange(n_p + n_c)
    positions[row, r0:hi] = n_p + np.arange(n_r)  # rejected continues the prompt, as in its own sequence
    branch_ids[row, c0:r0], branch_ids[row, r0:hi] = 1, 2
    return hi


def _fits(seq_lengths: list[int], spec: PackSpec) -> bool:
    if sum(seq_lengths) > spec.rows_per_group * spec.seq_len:
        return False
    return first_fit_decreasing(seq_lengths, spec.seq_len, spec.rows_per_group) is not None


def plan_groups(lengths: np.ndarray, order: np.ndarray, spec: PackSpec, *, pairs_per_group: int,
                num_groups: int) -> tuple[np.ndarray, int]:
    """Cuts ``order`` into ``num_groups`` packable groups of at most ``pairs_per_group`` pairs.

    Args:
      lengths: [N, k] item sizes of each pair (:func:`item_lengths`: chosen and rejected sequence
        lengths, or the shared-prompt row).
      order: [M] pair positions in the order they should be consumed (an epoch's permutation).
      spec: the row shape (``seq_len``, ``rows_per_group``, ``lookahead``).
      pairs_per_group: ``B / groups``.
      num_groups: groups to fill.

    Returns:
      ([num_groups, pairs_per_group] int64 pair positions, -1 = padding pair; number of pairs
      of ``order`` that were left out because the groups ran out).
    """
    lengths = np.asarray(lengths)
    if len(order) and int(lengths[order].max()) > spec.seq_len:
        raise ValueError(f"a sequence of {int(lengths[order].max())} tokens does not fit packed rows of "
                         f"seq_len {spec.seq_len}")
    seq = lengths.tolist()
    queue = collections.deque(int(i) for i in order)
    plan = np.full((num_groups, pairs_per_group), -1, np.int64)
    for g in range(num_groups):
        if not queue:
            break
        chosen: list[int] = []
        items: list[int] = []
        deferred: list[int] = []
        while queue and len(chosen) < pairs_per_group and len(deferred) <= spec.lookahead:
            cand = queue.popleft()
            trial = items + seq[cand]
            if _fits(trial, spec):
                chosen.append(cand)
                items = trial
            else:
                deferred.append(cand)
        queue.extendleft(reversed(deferred))  # deferred pairs open the next group
        plan[g, :len(chosen)] = chosen
    return plan, len(queue)


def pack_pairs(pairs: TokenizedPairs, indices: Sequence[int], spec: PackSpec, *,
               first_slot: int = 0) -> PackedPairBatch:
    """Packs the pairs ``indices`` (positions in ``pairs``; -1 = padding pair) into ``spec.rows`` rows.

    Pair slot ``p`` (its position in ``indices``) belongs to group ``p % spec.groups`` and is
    placed, by first-fit decreasing over its group's sequences, into rows ``r`` with
    ``r % spec.groups`` equal to its group; its chosen / rejected sequences become segments
    ``2 (first_slot + p) + 1`` / ``+ 2``.

    Args:
      pairs: tokenised pairs.
      indices: [B] pair positions (B a multiple of ``spec.groups``).
      spec: row shape.
      first_slot: global slot of ``indices[0]`` (process ``i`` of a multi-process batch passes
        ``i * B``), so segment ids are unique in the assembled global batch.

    Returns:
      :class:`~jaxpref.types.PackedPairBatch` of NumPy arrays ``[R, T]`` / ``[B, 2]`` / ``[B]``.

    Raises:
      ValueError: when a group's sequences do not fit its rows, or on bad indices.
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    b, k, t = len(idx), spec.groups, spec.seq_len
    if b % k:
        raise ValueError(f"{b} pairs cannot form {k} interleaved groups")
    if np.any(idx >= len(pairs)) or np.any(idx < -1):
        raise IndexError(f"indices out of range for {len(pairs)} pairs")
    input_ids = np.full((spec.rows, t), pairs.pad_id, np.int32)
    loss_mask = np.zeros((spec.rows, t), np.int32)
    segment_ids = np.zeros((spec.rows, t), np.int32)
    positions = np.zeros((spec.rows, t), np.int32)
    branch_ids = np.zeros((spec.rows, t), np.int32)
    pair_segments = np.zeros((b, 2), np.int32)
    fill = np.zeros(spec.rows, np.int64)  # next free column of each row
    for group in range(k):
        slots = [p for p in range(group, b, k) if idx[p] >= 0]
        if spec.share_prompt:  # one item per pair: [prompt | chosen | rejected]
            seqs = [(p, -1) for p in slots]
            sizes = [len(pairs.prompt[idx[p]]) + len(pairs.chosen[idx[p]]) + len(pairs.rejected[idx[p]])
                     for p in slots]
        else:
            seqs = [(p, s) for p in slots for s in (0, 1)]
            sizes = [len(pairs.prompt[idx[p]]) + len(pairs.responses[s][idx[p]]) for p, s in seqs]
        bins = first_fit_decreasing(sizes, t, spec.rows_per_group) if seqs else np.zeros(0, np.int64)
        if bins is None:
            raise ValueError(f"pairs {idx[slots].tolist()} (group {group}) need more than {spec.rows_per_group} rows "
                             f"of {t} tokens; raise PackSpec.rows or use plan_groups to choose packable batches")
        for (p, s), row_in_group in sorted(zip(seqs, bins.tolist()), key=lambda x: (x[1], x[0])):
            row = group + k * row_in_group
            if s < 0:
                i, slot = idx[p], first_slot + p
                fill[row] = _write_shared((input_ids, loss_mask, segment_ids, positions, branch_ids), row,
                                          int(fill[row]), pairs.prompt[i], pairs.chosen[i], pairs.rejected[i],
                                          slot + 1)
                pair_segments[p] = (2 * slot + 1, 2 * slot + 2)
                continue
            prompt, resp = pairs.prompt[idx[p]], pairs.responses[s][idx[p]]
            lo, n_p = int(fill[row]), len(prompt)
            hi = lo + n_p + len(resp)
            seg = 2 * (first_slot + p) + 1 + s
            input_ids[row, lo:lo + n_p] = prompt
            input_ids[row, lo + n_p:hi] = resp
            loss_mask[row, lo + n_p:hi] = 1
            loss_mask[row, lo] = 0  # a segment's first token is never a target (its predictor is another segment)
            segment_ids[row, lo:hi] = seg
            positions[row, lo:hi] = np.arange(hi - lo)
            pair_segments[p, s] = seg
            fill[row] = hi
    real = idx >= 0
    votes = np.where(real, pairs.votes[np.maximum(idx, 0)] if len(pairs) else 1.0, 1.0).astype(np.float32)
    source_row = np.where(real, pairs.row[np.maximum(idx, 0)] if len(pairs) else -1, -1).astype(np.int32)
    return PackedPairBatch(input_ids=input_ids, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions,
                           pair_segments=pair_segments, example_mask=real, votes=votes, index=source_row,
                           branch_ids=branch_ids if spec.share_prompt else None, groups=k)


def shared_pair_batch(pairs: TokenizedPairs, indices: Sequence[int], seq_len: int, *,
                      first_slot: int = 0) -> PackedPairBatch:
    """Shared-prompt pairs without packing: pair slot ``p`` alone in row ``p`` as ``[prompt | chosen |
    rejected]`` (segment ``first_slot + p + 1``), right padded to ``seq_len``; -1 = padding pair.

    One pair per row, so any divisor of ``B`` micro-batches splits it (``groups = B``).
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    b = len(idx)
    if np.any(idx >= len(pairs)) or np.any(idx < -1):
        raise IndexError(f"indices out of range for {len(pairs)} pairs")
    arrays = (np.full((b, seq_len), pairs.pad_id, np.int32), *(np.zeros((b, seq_len), np.int32) for _ in range(4)))
    pair_segments = np.zeros((b, 2), np.int32)
    for p, i in enumerate(idx.tolist()):
        if i < 0:
            continue
        need = len(pairs.prompt[i]) + len(pairs.chosen[i]) + len(pairs.rejected[i])
        if need > seq_len:
            raise ValueError(f"pair {i}: its shared-prompt row has {need} tokens, more than seq_len {seq_len}")
        slot = first_slot + p
        _write_shared(arrays, p, 0, pairs.prompt[i], pairs.chosen[i], pairs.rejected[i], slot + 1)
        pair_segments[p] = (2 * slot + 1, 2 * slot + 2)
    real = idx >= 0
    votes = np.where(real, pairs.votes[np.maximum(idx, 0)] if len(pairs) else 1.0, 1.0).astype(np.float32)
    source_row = np.where(real, pairs.row[np.maximum(idx, 0)] if len(pairs) else -1, -1).astype(np.int32)
    input_ids, loss_mask, segment_ids, positions, branch_ids = arrays
    return PackedPairBatch(input_ids=input_ids, loss_mask=loss_mask, segment_ids=segment_ids, positions=positions,
                           pair_segments=pair_segments, example_mask=real, votes=votes, index=source_row,
                           branch_ids=branch_ids, groups=max(b, 1))


def auto_rows(lengths: np.ndarray, pairs_per_batch: int, seq_len: int, *, groups: int = 1, devices: int = 1,
              fill: float = 0.9) -> int:
    """Rows per batch for ``pairs_per_batch`` pairs of average length at ``fill`` row occupancy.

    ``ceil(pairs_per_batch * mean(chosen + rejected length) / (fill * seq_len))``, at least 2 per
    group, rounded up to a multiple of ``groups x devices`` (micro-batch groups, and the
    data-parallel devices the rows are sharded over).
    """
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    mean_pair = float(np.asarray(lengths).sum(1).mean()) if len(lengths) else float(seq_len)
    rows = max(math.ceil(pairs_per_batch * mean_pair / (fill * seq_len)), 2 * groups)
    unit = groups * devices
    return -(-rows // unit) * unit


def efficiency(batch: PackedPairBatch) -> float:
    """Real tokens / row slots of a packed batch (the padding-efficiency statistic)."""
    seg = np.asarray(batch.segment_ids)
    return float((seg != 0).sum() / seg.size)


# ------------------------------------------------------------------------------ packing for scoring


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Every sequence of a pair dataset packed into rows for scoring (no training order to keep).

    The ``2N`` sequences (pair ``i``'s chosen is sequence ``2i``, its rejected ``2i + 1``) are packed by
    first-fit decreasing into rows of ``seq_len`` tokens over the WHOLE dataset, and the rows are cut into
    batches of ``rows_per_batch`` (the last batch is padded with empty rows), so all batches share one
    shape. Inside a batch every sequence is its own segment ``1, 2, ...``; positions restart at 0 per
    segment, and a segment's first token is never a target, as in :func:`pack_pairs`.

    With ``share_prompt`` the items are the ``N`` pairs' ``[prompt | chosen | rejected]`` rows instead (one
    segment each, ``branch_ids`` 0 / 1 / 2, each prompt computed once), and ``segment_of`` holds the
    *sequence* ids ``2s - 1`` / ``2s`` of segment ``s`` (:func:`jaxpref.logprobs.pair_sequence_ids`).

    Attributes:
      input_ids, loss_mask, segment_ids, positions: [num_batches * rows_per_batch, seq_len] int32.
      batch_of: [N, 2] int32 batch of each sequence; segment_of: [N, 2] int32 its segment (sequence id) in
        that batch.
      rows_per_batch: rows per batch; num_segments: static size of per-batch segment outputs (max + 1).
      used_rows: rows that hold tokens (the rest of the last batch is empty).
      row_multiple: batches keep a multiple of this many rows.
      branch_ids: None, or (shared prompts) [num_batches * rows_per_batch, seq_len] int32.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    batch_of: np.ndarray
    segment_of: np.ndarray
    rows_per_batch: int
    num_segments: int
    used_rows: int
    row_multiple: int = 1
    branch_ids: np.ndarray | None = None

    @property
    def num_batches(self) -> int:
        return len(self.input_ids) // self.rows_per_batch

    def batch_rows(self, k: int) -> int:
        """Rows of batch ``k``: ``rows_per_batch``, except the last batch, cut to the power of two (times
        ``row_multiple``) that holds its used rows, so a dataset costs at most two shapes."""
        if k < self.num_batches - 1:
            return self.rows_per_batch
        used = max(1, self.used_rows - int(k) * self.rows_per_batch)
        units = -(-used // self.row_multiple)
        return min(self.rows_per_batch, (1 << (units - 1).bit_length()) * self.row_multiple)

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, loss_mask, segment_ids, positions)`` of batch ``k``, each [batch_rows(k), seq_len]."""
        sl = self._rows(k)
        return self.input_ids[sl], self.loss_mask[sl], self.segment_ids[sl], self.positions[sl]

    def branches(self, k: int) -> np.ndarray | None:
        """Branch ids of batch ``k`` (shared prompts), or None."""
        return None if self.branch_ids is None else self.branch_ids[self._rows(k)]

    def _rows(self, k: int) -> slice:
        lo = k * self.rows_per_batch
        return slice(lo, lo + self.batch_rows(k))

    def computed_tokens(self) -> int:
        return sum(self.batch_rows(k) for k in range(self.num_batches)) * self.input_ids.shape[1]

    def efficiency(self) -> float:
        """Real tokens / computed token slots over all batches."""
        return float((self.segment_ids != 0).sum() / max(self.computed_tokens(), 1))


def pack_sequences(pairs: TokenizedPairs, seq_len: int, rows_per_batch: int, *, row_multiple: int = 1,
                   share_prompt: bool = False) -> PackedSequences:
    """Packs all sequences of ``pairs`` (with ``share_prompt``: all shared-prompt pair rows) into batches of
    ``rows_per_batch`` rows of ``seq_len`` tokens (:class:`PackedSequences`); ``rows_per_batch`` is rounded
    up to a multiple of ``row_multiple`` (the data-parallel devices the rows are split over)."""
    lengths = shared_lengths(pairs) if share_prompt else pairs.lengths().reshape(-1)
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit rows of {seq_len}")
    rows_per_batch = max(1, rows_per_batch) + (-max(1, rows_per_batch)) % row_multiple
    bins = first_fit_decreasing(lengths, seq_len) if len(lengths) else np.zeros(0, np.int64)
    n_rows = int(bins.max()) + 1 if len(bins) else 0
    n_batches = max(1, -(-n_rows // rows_per_batch))
    shape = (n_batches * rows_per_batch, seq_len)
    input_ids = np.full(shape, pairs.pad_id, np.int32)
    loss_mask, segment_ids, positions = (np.zeros(shape, np.int32) for _ in range(3))
    batch_of, segment_of = np.zeros((len(pairs), 2), np.int32), np.zeros((len(pairs), 2), np.int32)
    fill = np.zeros(shape[0], np.int64)
    next_segment = np.ones(n_batches, np.int64)
    branch_ids = np.zeros(shape, np.int32) if share_prompt else None
    for j in sorted(range(len(lengths)), key=lambda j: (int(bins[j]), j)):
        if share_prompt:
            row = int(bins[j])
            k = row // rows_per_batch
            seg = int(next_segment[k])
            next_segment[k] += 1
            fill[row] = _write_shared((input_ids, loss_mask, segment_ids, positions, branch_ids), row, int(fill[row]),
                                      pairs.prompt[j], pairs.chosen[j], pairs.rejected[j], seg)
            batch_of[j], segment_of[j] = k, (2 * seg - 1, 2 * seg)
            continue
        row, (i, s) = int(bins[j]), divmod(j, 2)
        prompt, resp = pairs.prompt[i], pairs.responses[s][i]
        lo, n_p = int(fill[row]), len(prompt)
        hi = lo + n_p + len(resp)
        k = row // rows_per_batch
        seg = int(next_segment[k])
        next_segment[k] += 1
        input_ids[row, lo:lo + n_p], input_ids[row, lo + n_p:hi] = prompt, resp
        loss_mask[row, lo + n_p:hi] = 1
        loss_mask[row, lo] = 0
        segment_ids[row, lo:hi] = seg
        positions[row, lo:hi] = np.arange(hi - lo)
        batch_of[i, s], segment_of[i, s] = k, seg
        fill[row] = hi
    num_segments = int(next_segment.max())
    if share_prompt:  # sequence ids 2s - 1, 2s of segments s < next_segment
        num_segments = 2 * num_segments - 1
    return PackedSequences(input_ids, loss_mask, segment_ids, positions, batch_of, segment_of, rows_per_batch,
                           num_segments, used_rows=n_rows, row_multiple=row_multiple, branch_ids=branch_ids)
