"""Batch records that flow from the data pipeline into the train and eval steps.

The records are ``flax.struct.dataclass`` pytrees, so they pass through ``jax.jit``,
``jax.tree.map`` and ``jax.make_array_from_process_local_data`` unchanged. The data pipeline
builds them from NumPy arrays on the host; the step sees ``jax.Array`` leaves.

Conventions shared by :class:`PairBatch` and :class:`SFTBatch` (:class:`PackedPairBatch` packs
several sequences per row instead; see its docstring):

* **Right padding.** Real tokens occupy positions ``[0, length)``; padding follows. Padding is
  marked only by ``segment_ids == 0`` (the model's mask rule, see
  :mod:`jaxpref.models.base`); padded ``input_ids`` hold the tokenizer's pad id.
* **Targets at their own position.** ``loss_mask[..., t] == 1`` marks ``input_ids[..., t]`` as a
  response (target) token, EOS included; prompt tokens and padding are 0. This is the
  convention of :mod:`jaxpref.logprobs` (which shifts by one internally).
* **Static shapes.** ``T`` is one of a few bucket lengths (see :mod:`jaxpref.data.batching`) and
  ``B`` is the configured batch size: a short last batch is padded with rows whose
  ``example_mask`` is False (all-padding sequences, ``index == -1``).
"""

from __future__ import annotations

import flax.struct
import jax
import numpy as np

Array = jax.Array | np.ndarray


@flax.struct.dataclass
class ReferenceSampleBatch:
    """Responses sampled from the frozen reference for each pair's prompt, ``S`` per pair (TYPO's
    unsupervised term; see :mod:`jaxpref.training.reference_samples`). Same conventions as the pairs.

    Attributes:
      input_ids: [B, S, T] int32 prompt + sampled response, right padded (``T`` has its own buckets).
      loss_mask: [B, S, T] int32, 1 on the sampled response tokens (EOS included when generated).
      segment_ids: [B, S, T] int32, 1 for real tokens, 0 for padding (and on batch-padding rows).
      positions: [B, S, T] int32 position ids ``0..length-1`` (0 on padding).
      reference_logps: [B, S] float32 summed log-prob of each sample under the reference that drew it
        (0 on padding rows); a diagnostic, never differentiated.
    """

    input_ids: Array
    loss_mask: Array
    segment_ids: Array
    positions: Array
    reference_logps: Array


@flax.struct.dataclass
class PairBatch:
    """A batch of preference pairs on a pair axis of size 2 (chosen first).

    Attributes:
      input_ids: [B, 2, T] int32 token ids; ``[:, 0]`` chosen, ``[:, 1]`` rejected, right padded.
      loss_mask: [B, 2, T] int32, 1 where ``input_ids`` is a response target token (incl. EOS).
      segment_ids: [B, 2, T] int32, 1 for real tokens, 0 for padding.
      positions: [B, 2, T] int32 position ids ``0..length-1`` (0 on padding).
      example_mask: [B] bool, False for batch-padding rows (all of whose arrays are padding).
      votes: [B] float32 share of annotators preferring the chosen response (alpha in
        [0.5, 1]); 1.0 for pairs without votes (a hard label) and for padding rows.
      index: [B] int32 row id of each pair in its source file (-1 on padding rows).
      ref_samples: optional :class:`ReferenceSampleBatch` of the same pairs (``[B, S, T']``), present
        when a loss term needs reference samples (TYPO); None otherwise (no leaves).
    """

    input_ids: Array
    loss_mask: Array
    segment_ids: Array
    positions: Array
    example_mask: Array
    votes: Array
    index: Array
    ref_samples: ReferenceSampleBatch | None = None

    @property
    def lengths(self) -> Array:
        """[B, 2] int32 number of real tokens of each sequence."""
        return (self.segment_ids != 0).sum(-1).astype(np.int32)


@flax.struct.dataclass
class SFTBatch:
    """A batch of single prompt+response sequences (supervised fine-tuning).

    Attributes:
      input_ids: [B, T] int32 token ids, right padded.
      loss_mask: [B, T] int32, 1 where ``input_ids`` is a response target token (incl. EOS).
      segment_ids: [B, T] int32, 1 for real tokens, 0 for padding.
      positions: [B, T] int32 position ids ``0..length-1`` (0 on padding).
      example_mask: [B] bool, False for batch-padding rows.
      index: [B] int32 row id of each example in its source file (-1 on padding rows).
    """

    input_ids: Array
    loss_mask: Array
    segment_ids: Array
    positions: Array
    example_mask: Array
    index: Array

    @property
    def lengths(self) -> Array:
        """[B] int32 number of real tokens of each sequence."""
        return (self.segment_ids != 0).sum(-1).astype(np.int32)


@flax.struct.dataclass
class PackedPairBatch:
    """Preference pairs packed several sequences to a row (see :mod:`jaxpref.data.packing`).

    Chosen and rejected of a pair are two separate *segments* (never in the same segment, so
    they never attend to each other: the model's attention is block-diagonal by segment id).
    Pair slot ``p`` of the whole (global) batch owns segment ids ``2p + 1`` (chosen) and
    ``2p + 2`` (rejected); 0 is padding. Positions restart at 0 in every segment, and the first
    token of a segment is never a target (as position 0 of an unpacked row). Log-prob sums per
    sequence come from one chunked pass over ``[R, T]`` followed by a segment sum
    (:func:`jaxpref.logprobs.segment_logprobs`), gathered per pair with ``pair_segments``.

    Attributes:
      input_ids: [R, T] int32 token ids of the packed rows (pad id after the last segment).
      loss_mask: [R, T] int32, 1 on response (target) tokens.
      segment_ids: [R, T] int32 segment of each token (``2p + 1`` / ``2p + 2``), 0 on padding.
      positions: [R, T] int32 position inside the segment (0 on padding).
      pair_segments: [B, 2] int32 segment ids of the pair's chosen and rejected sequence (0 on
        padding pairs).
      example_mask: [B] bool, False for padding pairs.
      votes: [B] float32 share of annotators preferring chosen (1.0 without votes / padding).
      index: [B] int32 row id of each pair in its source file (-1 on padding pairs).
      groups: static; the rows and pairs form ``groups`` interleaved micro-batches (row ``r`` and
        pair slot ``p`` belong to group ``r % groups`` / ``p % groups``, and a pair's segments
        lie in rows of its own group), so the batch can be split into any divisor of ``groups``
        strided micro-batches for gradient accumulation.
      branch_ids: None, or (shared-prompt pairs, ``data.share_prompt``) [R, T] int32 branch of each
        token: a pair is ONE segment ``p + 1`` laid out ``[prompt | chosen | rejected]`` with branch
        ids 0 / 1 / 2; the rejected tokens attend to the prompt and themselves, never to chosen, and
        their positions restart after the prompt (the separate layout's positions).
        ``pair_segments`` then holds the *sequence* ids ``2p + 1`` / ``2p + 2``
        (:func:`jaxpref.logprobs.pair_sequence_ids`), so the per-pair outputs are unchanged.
    """

    input_ids: Array
    loss_mask: Array
    segment_ids: Array
    positions: Array
    pair_segments: Array
    example_mask: Array
    votes: Array
    index: Array
    branch_ids: Array | None = None
    groups: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def num_segments(self) -> int:
        """Static size of per-segment outputs: ``2 B + 1`` (segment 0 is padding)."""
        return 2 * self.example_mask.shape[0] + 1
