"""A *description* of an attention mask, which every backend turns into what it needs.

No backend receives a dense ``[B, 1, T, S]`` array: the :mod:`~jaxpref.models.attention.xla`
backend builds one from this description, the :mod:`~jaxpref.models.attention.blocked` backend
builds ``[B, block_q, block_kv]`` tiles and skips tiles that are entirely masked, and kernel
backends (cuDNN sequence lengths, splash segment ids) read the fields they support.

The rule (one for training, packing, left/right padding and KV-cache decoding): query ``i``
sees key ``j`` iff

* ``kv_segment_ids[j] != 0`` (0 = padding or an empty cache slot),
* ``q_segment_ids[i] == kv_segment_ids[j]`` (packing: never across segments),
* ``kv_positions[j] <= q_positions[i]`` when ``causal``,
* ``q_positions[i] - kv_positions[j] < sliding_window`` when a window is set (HF Mistral:
  the query and the ``W - 1`` keys before it).

* with branch ids (shared-prompt pairs, ``data.share_prompt``): ``kv_branch_ids[j] == 0`` or
  ``kv_branch_ids[j] == q_branch_ids[i]``. Branch 0 is a segment's shared prompt, visible to every
  branch of the segment; a branch ``b > 0`` (a response) sees branch 0 and itself, never another
  response. Its positions continue the prompt's (rejected position = prompt length + j, as in the
  separate layout), so ``causal`` still compares positions, not places in the row.

A query with segment id 0 (a pad) sees nothing; every backend returns exact zeros for it
(finite, and ignored downstream by the loss mask). ``softcap`` is not a mask but a property of
the logits every backend must apply the same way (Gemma 2: ``c * tanh(s / c)`` on the scaled
scores, before masking), so it travels with the description.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class MaskSpec:
    """Which keys each query may attend to (a frozen pytree: arrays are leaves, flags are static).

    Attributes:
      q_segment_ids: [B, T] int32, 0 = padding query.
      q_positions: [B, T] int32 position ids of the queries.
      kv_segment_ids: [B, S] int32, 0 = padding key / empty cache slot.
      kv_positions: [B, S] int32 position ids of the keys.
      causal: keys at later positions are hidden.
      sliding_window: W or None; a query sees keys fewer than W positions back.
      softcap: logit soft-cap ``c`` (scores become ``c * tanh(s / c)``) or None.
      right_padded: a promise by the caller (not checked) that every row holds ONE sequence at
        positions ``0 .. n-1`` in slots ``0 .. n-1`` (segment id 1) followed by padding (segment id
        0), for queries and keys alike: the padded ``[2B, T]`` training and scoring layout. Kernels
        that only take sequence lengths (cuDNN) serve a mask only under this promise; the rule
        itself (:meth:`visible`) does not depend on it.
      q_branch_ids, kv_branch_ids: None, or [B, T] / [B, S] int32 branch of each token inside its
        segment (0 = shared prompt, b > 0 = a response that sees branch 0 and itself); both or neither.
    """

    q_segment_ids: jax.Array
    q_positions: jax.Array
    kv_segment_ids: jax.Array
    kv_positions: jax.Array
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)
    softcap: float | None = flax.struct.field(pytree_node=False, default=None)
    right_padded: bool = flax.struct.field(pytree_node=False, default=False)
    q_branch_ids: jax.Array | None = None
    kv_branch_ids: jax.Array | None = None

    @classmethod
    def self_attention(cls, segment_ids: jax.Array, positions: jax.Array, branch_ids: jax.Array | None = None,
                       **flags) -> MaskSpec:
        """Queries and keys are the same ``[B, T]`` tokens (training, scoring, prefill without cache)."""
        segment_ids, positions = jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)
        if branch_ids is not None:
            branch_ids = jnp.asarray(branch_ids, jnp.int32)
            flags = {**flags, "q_branch_ids": branch_ids, "kv_branch_ids": branch_ids}
        return cls(segment_ids, positions, segment_ids, positions, **flags)

    @property
    def has_branches(self) -> bool:
        """True when the description carries branch ids (shared-prompt pairs)."""
        return self.q_branch_ids is not None

    @property
    def q_len(self) -> int:
        return self.q_segment_ids.shape[1]

    @property
    def kv_len(self) -> int:
        return self.kv_segment_ids.shape[1]

    def visible(self, q_seg, q_pos, kv_seg, kv_pos, q_branch=None, kv_branch=None) -> jax.Array:
        """The mask rule on broadcastable pieces: ``[..., Tq, 1]`` queries x ``[..., 1, Sk]`` keys -> bool.

        Backends call this on whatever tile they work on, so the rule lives in one place. The branch
        pieces (same broadcasting) are given exactly when :attr:`has_branches`.
        """
        if (q_branch is None) != (kv_branch is None) or (q_branch is not None) != self.has_branches:
            raise ValueError("MaskSpec.visible: pass q_branch and kv_branch exactly when the spec has branch ids")
        ok = (kv_seg != 0) & (q_seg == kv_seg)
        if q_branch is not None:
            ok &= (kv_branch == 0) | (kv_branch == q_branch)
        if self.causal:
            ok &= kv_pos <= q_pos
        if self.sliding_window is not None:
            ok &= q_pos - kv_pos < self.sliding_window
        return ok

    def validate(self, q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> None:
        """Raises ValueError when the description does not fit ``q [B, T, H, hd]`` / ``k [B, S, KV, hd]``."""
        b, t = q_shape[:2]
        s = k_shape[1]
        for name, arr, want in (("q_segment_ids", self.q_segment_ids, (b, t)),
                                ("q_positions", self.q_positions, (b, t)),
                                ("kv_segment_ids", self.kv_segment_ids, (b, s)),
                                ("kv_positions", self.kv_positions, (b, s)),
                                ("q_branch_ids", self.q_branch_ids, (b, t)),
                                ("kv_branch_ids", self.kv_branch_ids, (b, s))):
            if arr is None:
                continue
            if tuple(arr.shape) != want:
                raise ValueError(f"MaskSpec.{name} has shape {tuple(arr.shape)}, expected {want} for "
                                 f"q {tuple(q_shape)} and k {tuple(k_shape)}")
        if (self.q_branch_ids is None) != (self.kv_branch_ids is None):
            raise ValueError("MaskSpec: q_branch_ids and kv_branch_ids go together (both or neither)")
        if q_shape[2] % k_shape[2]:
            raise ValueError(f"{q_shape[2]} query heads are not a multiple of {k_shape[2]} kv heads")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be positive, got {self.softcap}")


def soft_cap(scores: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2 logit soft-capping ``cap * tanh(scores / cap)`` (identity for None)."""
    return scores if cap is None else cap * jnp.tanh(scores / cap)
