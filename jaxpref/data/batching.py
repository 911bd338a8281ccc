"""Padding tokenised pairs (or SFT examples) into fixed-shape batches.

A :class:`~jaxpref.types.PairBatch` holds ``[B, 2, T]`` arrays (chosen at index 0 of the pair
axis), right padded. ``T`` is not the longest sequence of the batch but the smallest **bucket
length** that fits it, from a short list (by default powers of two from 16 up to the
``max_length`` cap), so a jitted step compiles once per bucket rather than once per batch.
A batch with fewer rows than ``batch_size`` is padded with masked rows (``example_mask``
False, ``index`` -1, all tokens padding), so ``B`` is static too.

Arrays are NumPy on the host; the train step moves them to devices (e.g. with
``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxpref.data.tokenize import TokenizedPairs, TokenizedSFT
from jaxpref.types import PairBatch, SFTBatch


def bucket_lengths(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself.

    >>> bucket_lengths(1000)
    (16, 32, 64, 128, 256, 512, 1000)
    """
    if max_length < 1 or min_length < 1:
        raise ValueError(f"max_length and min_length must be positive, got {max_length}, {min_length}")
    out, b = [], min_length
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``; ValueError when none fits."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"sequence length {length} exceeds the largest bucket {max(buckets)}; "
                     "raise the buckets or lower TokenizeConfig.max_length")


def _default_buckets(data: TokenizedPairs | TokenizedSFT) -> tuple[int, ...]:
    longest = int(data.lengths().max()) if len(data) else 1
    return bucket_lengths(1 << max(0, longest - 1).bit_length())


def _fill(data: TokenizedPairs | TokenizedSFT, indices: Sequence[int], seq_len: int | None,
          buckets: Sequence[int] | None, batch_size: int | None):
    """Builds the [B, K, T] arrays shared by pair (K=2) and SFT (K=1) batches."""
    idx = np.asarray(indices, np.int64).reshape(-1)  # [b]; -1 = padding row
    b = len(idx) if batch_size is None else batch_size
    if len(idx) > b:
        raise ValueError(f"{len(idx)} indices do not fit batch_size {b}")
    if np.any(idx >= len(data)) or np.any(idx < -1):
        raise IndexError(f"indices out of range for {len(data)} examples")
    idx = np.concatenate([idx, np.full(b - len(idx), -1, np.int64)])
    real = idx >= 0
    lengths = data.lengths()[idx[real]]  # [b_real, K]
    longest = int(lengths.max()) if lengths.size else 1
    if seq_len is None:
        seq_len = choose_bucket(longest, buckets if buckets is not None else _default_buckets(data))
    elif longest > seq_len:
        raise ValueError(f"a sequence of {longest} tokens does not fit seq_len {seq_len}")
    responses = data.responses
    k = len(responses)
    input_ids = np.full((b, k, seq_len), data.pad_id, np.int32)  # [B, K, T]
    loss_mask = np.zeros((b, k, seq_len), np.int32)  # [B, K, T]
    segment_ids = np.zeros((b, k, seq_len), np.int32)  # [B, K, T]
    for row in np.flatnonzero(real):
        p = data.prompt[idx[row]]
        for s, resp in enumerate(responses):
            r = resp[idx[row]]
            n_p, n = len(p), len(p) + len(r)
            input_ids[row, s, :n_p] = p
            input_ids[row, s, n_p:n] = r
            loss_mask[row, s, n_p:n] = 1
            segment_ids[row, s, :n] = 1
    positions = np.where(segment_ids != 0, np.arange(seq_len, dtype=np.int32), 0).astype(np.int32)
    source_row = np.where(real, data.row[np.maximum(idx, 0)] if len(data) else -1, -1).astype(np.int32)
    return idx, real, input_ids, loss_mask, segment_ids, positions, source_row


def pair_batch(
    pairs: TokenizedPairs,
    indices: Sequence[int],
    *,
    seq_len: int | None = None,
    buckets: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> PairBatch:
    """Pads the pairs ``indices`` (positions in ``pairs``; -1 = padding row) into a batch.

    Args:
      pairs: tokenised pairs.
      indices: [b] which pairs, in batch order.
      seq_len: ``T``; if None, the smallest of ``buckets`` that fits the longest sequence.
      buckets: allowed ``T`` values; None: :func:`bucket_lengths` up to the power of two above
        the dataset's longest sequence.
      batch_size: ``B`` >= b; missing rows are padding (``example_mask`` False).

    Returns:
      :class:`~jaxpref.types.PairBatch` of NumPy arrays ``[B, 2, T]`` / ``[B]``.
    """
    idx, real, ids, mask, seg, pos, source_row = _fill(pairs, indices, seq_len, buckets, batch_size)
    votes = np.where(real, pairs.votes[np.maximum(idx, 0)] if len(pairs) else 1.0, 1.0).astype(np.float32)
    return PairBatch(input_ids=ids, loss_mask=mask, segment_ids=seg, positions=pos, example_mask=real,
                     votes=votes, index=source_row)


def sft_batch(
    examples: TokenizedSFT,
    indices: Sequence[int],
    *,
    seq_len: int | None = None,
    buckets: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> SFTBatch:
    """Pads SFT examples into a :class:`~jaxpref.types.SFTBatch` (``[B, T]``); as :func:`pair_batch`."""
    _, real, ids, mask, seg, pos, source_row = _fill(examples, indices, seq_len, buckets, batch_size)
    return SFTBatch(input_ids=ids[:, 0], loss_mask=mask[:, 0], segment_ids=seg[:, 0], positions=pos[:, 0],
                    example_mask=real, index=source_row)


def make_batch(data: TokenizedPairs | TokenizedSFT, indices: Sequence[int], **kw) -> PairBatch | SFTBatch:
    """:func:`pair_batch` or :func:`sft_batch`, by the type of ``data``."""
    return sft_batch(data, indices, **kw) if isinstance(data, TokenizedSFT) else pair_batch(data, indices, **kw)
