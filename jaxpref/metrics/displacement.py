"""Likelihood displacement (Razin et al. 2025, arXiv 2410.08847, Def. 1, §3, §5-6).

* **Dataset displacement** (Def. 1): the loss fell but the mean ``ln π_fin(y⁺|x)`` is below the mean
  ``ln π_init(y⁺|x)``. :func:`displacement_stats` gives the mean change of the chosen log-prob (Razin's
  ``preferred_logprobs_change_mean``), per-example changes and flags (``lp_fin < lp_init``) and the share
  of displaced examples; :func:`is_displaced` adds the loss condition.
* **Single-token metric** (§3, Tables 1-3): the largest drop of ``π(y⁺|x)`` between any two steps
  ``t < t'``, ``max_{t<t'} [π_t − π_{t'}]`` (:func:`max_drop`; 0 when the probability never falls).
* **Token risers** (§3): the tokens whose probability rose most between two steps
  (:func:`token_risers`), and the predictor of Thm 2: tokens rise in proportion to
  ``⟨W_z, W_{y⁺} − W_{y⁻}⟩`` (:func:`riser_predictor`, rows of the unembedding ``W [V, D]``).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from jaxpref.metrics.ranking import Tally, tally


@flax.struct.dataclass
class Displacement:
    """Change of the chosen log-prob between two checkpoints.

    Attributes:
      change: ``[B]`` ``lp_final − lp_init`` per example.
      displaced: ``[B]`` bool ``lp_final < lp_init``.
      change_tally: :class:`Tally` of ``change`` (its mean is the mean change).
      displaced_tally: :class:`Tally` of ``displaced`` (its mean is the fraction displaced).
    """

    change: jax.Array
    displaced: jax.Array
    change_tally: Tally
    displaced_tally: Tally


@jax.jit
def displacement_stats(lp_init: jax.Array, lp_final: jax.Array, mask: jax.Array | None = None) -> Displacement:
    """Per-example and dataset displacement of ``[B]`` chosen log-probs (summed over response tokens)."""
    change = jnp.asarray(lp_final, jnp.float32) - jnp.asarray(lp_init, jnp.float32)
    displaced = change < 0
    return Displacement(change=change, displaced=displaced, change_tally=tally(change, mask),
                        displaced_tally=tally(displaced, mask))


@jax.jit
def is_displaced(mean_change: jax.Array, loss_init: jax.Array, loss_final: jax.Array) -> jax.Array:
    """Razin Def. 1: the loss decreased and the mean chosen log-prob decreased."""
    return (loss_final < loss_init) & (mean_change < 0)


@flax.struct.dataclass
class MaxDrop:
    """``max_{t<t'} [π_t − π_{t'}]`` over the last axis.

    Attributes:
      drop: ``[...]`` the largest drop (≥ 0).
      start: ``[...]`` int32 the step ``t`` of the drop.
      end: ``[...]`` int32 the step ``t'`` of the drop (``start == end == 0`` when there is none).
    """

    drop: jax.Array
    start: jax.Array
    end: jax.Array


@jax.jit
def max_drop(probs: jax.Array) -> MaxDrop:
    """Largest drop of a probability tracked over steps ``probs [..., S]`` (Razin §3 / Table 1).

    Done with a running (exclusive) maximum: the best drop ending at ``t'`` is ``max_{t<t'} π_t − π_{t'}``.
    """
    probs = jnp.asarray(probs, jnp.float32)
    run_max = jax.lax.cummax(probs, axis=probs.ndim - 1)
    before = jnp.concatenate([jnp.full_like(probs[..., :1], -jnp.inf), run_max[..., :-1]], axis=-1)
    drops = before - probs  # [..., S]; -inf at step 0
    end = jnp.argmax(drops, axis=-1)
    drop = jnp.maximum(jnp.take_along_axis(drops, end[..., None], -1)[..., 0], 0.0)
    # the first step achieving the running maximum before `end`
    s = probs.shape[-1]
    idx = jnp.arange(s)
    masked = jnp.where(idx < end[..., None], probs, -jnp.inf)
    start = jnp.argmax(masked, axis=-1)
    none = drop <= 0
    return MaxDrop(drop=drop, start=jnp.where(none, 0, start).astype(jnp.int32),
                   end=jnp.where(none, 0, end).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("k",))
def token_risers(probs_before: jax.Array, probs_after: jax.Array, k: int = 3) -> tuple[jax.Array, jax.Array]:
    """The ``k`` tokens whose probability rose most: ``(indices [..., k], increases [..., k])`` from ``[..., V]``."""
    increase = jnp.asarray(probs_after, jnp.float32) - jnp.asarray(probs_before, jnp.float32)
    values, indices = jax.lax.top_k(increase, k)
    return indices, values


@functools.partial(jax.jit, static_argnames=("layout",))
def riser_predictor(unembedding: jax.Array, y_pos: int | jax.Array, y_neg: int | jax.Array, layout: str = "dv"
                    ) -> jax.Array:
    """``[V]`` ``⟨W_z, W_{y⁺} − W_{y⁻}⟩`` for every token z (Razin Thm 2: predicts which tokens rise).

    Args:
      unembedding: ``[D, V]`` (``layout="dv"``) or a tied ``[V, D]`` embedding (``"vd"``), as returned
        by ``model.unembedding()``.
      y_pos, y_neg: the preferred and dispreferred token ids.
    """
    if layout not in ("dv", "vd"):
        raise ValueError(f"layout must be 'dv' or 'vd', got {layout!r}")
    w = jnp.asarray(unembedding, jnp.float32)
    w_vd = w.T if layout == "dv" else w
    return w_vd @ (w_vd[y_pos] - w_vd[y_neg])
