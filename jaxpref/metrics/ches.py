"""CHES and length-normalised CHES (Razin et al. 2025, arXiv 2410.08847, Def. 2/3) and their baselines.

Inputs are the float32 sums of the final hidden states (the vectors the unembedding is applied to)
at the positions that **predict** each response token, EOS included when it is a target; they come
from :func:`jaxpref.logprobs.masked_hidden_sums` (``S [N, D]`` and the counts ``|y|``). With a
sequence ``prompt + y + EOS`` this is the set of |y| + 1 vectors Razin et al.'s per-example script
sums (``hidden_states[-1][query_len - 1:]`` of ``prompt + y``, no EOS), so the counts here equal their
lengths.

* ``CHES = ⟨S⁺, S⁻⟩ − ‖S⁺‖²``;
* ``LN-CHES = ⟨S⁺, S⁻⟩ / (|y⁺||y⁻|) − ‖S⁺‖² / |y⁺|²`` (computed as ``⟨m⁺, m⁻⟩ − ‖m⁺‖²`` on the means
  ``m = S / |y|``, the same number with less cancellation);
* baselines: the inner product of the last predictor states (``⟨h_{x,y⁺}, h_{x,y⁻}⟩``, the final
  response token's state when EOS is appended) and the normalised token edit distance
  ``Levenshtein(y⁺, y⁻) / max(|y⁺|, |y⁻|)`` (NumPy; the paper uses its negative as a similarity);
* subset selection: :func:`quantile_window` (Razin §5's ``__quantile_slice``: ``k`` indices of the
  ascending ``argsort`` centred on ``round(q · (N − 1))``, window clamped into ``[0, N)``) and
  :func:`lowest_k` / :func:`lowest_fraction` (§6: keep the lowest LN-CHES share, ``k = ceil(f · N)``).

Higher scores mean more similar preferences and more expected likelihood displacement.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ChesScores:
    """Per-example scores, all ``[B]`` float32.

    Attributes:
      ches: ⟨S⁺, S⁻⟩ − ‖S⁺‖² (Def. 2).
      ln_ches: the length-normalised score (Def. 3).
    """

    ches: jax.Array
    ln_ches: jax.Array


@jax.jit
def ches_scores(chosen_sums: jax.Array, rejected_sums: jax.Array, chosen_counts: jax.Array,
                rejected_counts: jax.Array) -> ChesScores:
    """CHES and LN-CHES from ``[B, D]`` hidden-state sums and ``[B]`` predictor counts (float32)."""
    sp = jnp.asarray(chosen_sums, jnp.float32)
    sn = jnp.asarray(rejected_sums, jnp.float32)
    ches = jnp.sum(sp * sn, -1) - jnp.sum(sp * sp, -1)
    mp = sp / jnp.maximum(jnp.asarray(chosen_counts, jnp.float32), 1.0)[:, None]
    mn = sn / jnp.maximum(jnp.asarray(rejected_counts, jnp.float32), 1.0)[:, None]
    return ChesScores(ches=ches, ln_ches=jnp.sum(mp * mn, -1) - jnp.sum(mp * mp, -1))


@jax.jit
def last_hidden_inner_product(chosen_last: jax.Array, rejected_last: jax.Array) -> jax.Array:
    """``[B]`` ⟨h_{x,y⁺}, h_{x,y⁻}⟩ of ``[B, D]`` last predictor states (Razin §5 baseline)."""
    return jnp.sum(jnp.asarray(chosen_last, jnp.float32) * jnp.asarray(rejected_last, jnp.float32), -1)


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance of two token-id sequences (unit insert / delete / substitute costs).

    One NumPy row per element of ``a``: ``best[j] = min(substitute, delete)`` from the previous row, then
    insertions as a running minimum, ``cur[j] = min_{i ≤ j}(best[i] + j − i)``.
    """
    a, b = np.asarray(list(a)), np.asarray(list(b))
    steps = np.arange(len(b) + 1)
    prev = steps.copy()
    for i in range(1, len(a) + 1):
        best = np.empty_like(prev)
        best[0] = i
        best[1:] = np.minimum(prev[:-1] + (b != a[i - 1]), prev[1:] + 1)
        prev = np.minimum.accumulate(best - steps) + steps
    return int(prev[-1])


def normalized_edit_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """``Levenshtein(a, b) / max(|a|, |b|)`` in [0, 1] (Razin's ``__normalized_edit_distance``); 0 for two empties."""
    n = max(len(a), len(b))
    return edit_distance(a, b) / n if n else 0.0


def normalized_edit_distances(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]) -> np.ndarray:
    """``[B]`` float32 normalised edit distances of paired token-id sequences."""
    return np.asarray([normalized_edit_distance(a, b) for a, b in zip(chosen, rejected, strict=True)], np.float32)


@functools.partial(jax.jit, static_argnames=("k",))
def quantile_window(scores: jax.Array, q: float, k: int) -> jax.Array:
    """``[k]`` indices of ``argsort(scores)`` in a window of ``k`` centred at ``round(q · (N − 1))``.

    The window start ``center − k // 2`` is clamped to ``[0, N − k]``, so ``q = 0`` gives the ``k`` lowest
    and ``q = 1`` the ``k`` highest scores (Razin §5.3). Requires ``k ≤ N``.
    """
    n = scores.shape[0]
    if k > n:
        raise ValueError(f"window of {k} does not fit {n} scores")
    order = jnp.argsort(scores)
    center = jnp.round(q * (n - 1)).astype(jnp.int32)
    start = jnp.clip(center - k // 2, 0, n - k)
    return jax.lax.dynamic_slice(order, (start,), (k,))


@functools.partial(jax.jit, static_argnames=("k",))
def lowest_k(scores: jax.Array, k: int) -> jax.Array:
    """``[k]`` indices of the ``k`` lowest scores, ascending (Razin §6 filtering; ties by index)."""
    return jnp.argsort(scores)[:k]


def lowest_fraction(scores: jax.Array, fraction: float) -> np.ndarray:
    """Indices of the lowest ``ceil(fraction · N)`` (at least 1) scores, ascending by score."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = int(np.shape(scores)[0])
    k = max(1, math.ceil(fraction * n - 1e-9))
    return np.asarray(lowest_k(jnp.asarray(scores), k))
