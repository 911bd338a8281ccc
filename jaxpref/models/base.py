"""The contract every ported causal LM follows.

A model is an ``nnx.Module`` built from a frozen :class:`~jaxpref.models.config.ModelConfig`
and called as::

    out = model(input_ids,                 # [B, T] int32
                positions=positions,       # [B, T] int32 (RoPE / learned positions); default arange
                segment_ids=segment_ids,   # [B, T] int32, 0 = padding; tokens attend causally
                                           #   within their own non-zero segment (packing)
                cache=cache,               # KVCache or None (generation)
                return_logits=False)       # logits only for eval / generation, never training
    out.hidden   # [B, T, D] final hidden states, after the final norm, before the unembedding
    out.logits   # [B, T, V] float32 or None
    out.cache    # updated KVCache or None

and exposes ``model.unembedding() -> (matrix, layout)`` where ``layout`` is ``"dv"`` for a
``[D, V]`` head or ``"vd"`` for a tied ``[V, D]`` embedding, so that
:mod:`jaxpref.logprobs` can compute log-probs chunk by chunk without ever building
``[B, T, V]`` logits.

Padding is expressed only through ``segment_ids`` (0 = pad), so left padding (generation),
right padding (training) and packed sequences share one mask rule.
"""

from __future__ import annotations

from typing import Protocol

import flax.struct
import jax


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value cache for incremental decoding.

    Attributes:
      k: [L, B, S, KV, hd] keys for ``S`` cache slots (S = max total length).
      v: [L, B, S, KV, hd] values.
      segment_ids: [B, S] int32 segment of each slot; 0 = empty / padding slot.
      positions: [B, S] int32 position id of each slot (for causal masking).
      index: [] int32 number of slots written so far (next write offset).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array


@flax.struct.dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
      hidden: [B, T, D] final hidden states (post final norm, pre unembedding).
      logits: [B, T, V] float32 logits, only when ``return_logits=True``.
      cache: the updated :class:`KVCache` when one was passed in.
    """

    hidden: jax.Array
    logits: jax.Array | None = None
    cache: KVCache | None = None


class CausalLM(Protocol):
    """Structural type of every model family (see module docstring)."""

    config: object

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_logits: bool = False,
    ) -> ModelOutput: ...

    def unembedding(self) -> tuple[jax.Array, str]: ...

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache: ...
