"""Batch records that flow from the data pipeline into the train and eval steps.

Both records are ``flax.struct.dataclass`` pytrees, so they pass through ``jax.jit``,
``jax.tree.map`` and ``jax.make_array_from_process_local_data`` unchanged. The data pipeline
builds them from NumPy arrays on the host; the step sees ``jax.Array`` leaves.

Conventions shared by both records:

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
    """

    input_ids: Array
    loss_mask: Array
    segment_ids: Array
    positions: Array
    example_mask: Array
    votes: Array
    index: Array

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
