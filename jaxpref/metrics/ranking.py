"""Ranking accuracy and idealized ranking accuracy (Chen et al. 2024, arXiv 2405.19534, §2-3, App. A.6, C).

Every function is jitted and works on ``[B]`` (or ``[B, n]``) arrays of per-sequence scores with an
optional ``[B]`` validity mask (False for batch-padding rows). Dataset-level accuracies are returned
as a :class:`Tally` (sum of per-example values and number of kept examples) so a host loop can add the
tallies of many batches and divide once at the end (style R14).

Conventions (papers.md §1.3-1.5, papers-addendum.md):

* **Ranking accuracy R** (Def. 2.3): ``π(y_w|x) ≥ π(y_l|x)`` on summed response log-probs.
  ``ties_correct=True`` is the paper's ≥; ``ties_correct=False`` the released code's strict order
  (equal scores give ranks ``[1, 1]``, counted wrong).
* **Length-normalised R̃** (eq. 15): the same on mean per-token log-probs ``sums / counts``.
* **Ties in the human labels** (Def. C.1, ε = 0.01): α = 0.5 is correct iff ``|s_1 − s_2| < ε``;
  α > 0.5 iff ``s_1 > s_2``; α < 0.5 iff ``s_1 < s_2`` (strict). The **scale** of ``s`` matters for ε.
  One rule on one scale per pair of metrics (:func:`tie_rule_scores`), the scales of the released code
  (papers.md §1.3): **R and R*** compare summed log-probs; **R̃ and R̃*** compare the geometric-mean
  probability ``exp(mean log-prob)`` = 1/perplexity, i.e. Def. C.1's ``|π̃(y_1) − π̃(y_2)| < ε`` with eq.
  15's π̃. :func:`tie_scale_scores` builds these and the other scales.
* **n > 2 responses** (App. A.6): exact match of the full rank vectors, ranks as
  ``n + 1 − scipy.stats.rankdata(scores, method="max")`` (rank 1 = best, tied scores share the best
  rank of their group), i.e. ``1 + #{j : s_j > s_i}``. Rows holding a NaN score are dropped (the code's
  ``nanmean``).
* **Idealized ranking accuracy R*** (Cor. 3.3), log-space form:
  ``1[Δ_ref + logit(α)/β > 0]`` with ``Δ_ref = log π_ref(y_w) − log π_ref(y_l)`` (sums for R*, means
  for R̃*) and α the share of raters preferring ``y_w``, clipped to ``[ε, 1 − ε]``, ε = 1e-3
  (``logit(1 − 1e-3) = ln 999 = 6.9068``). For α < 0.5 (majority prefers ``y_2``) correct means the
  optimum ranks ``y_2`` first. Ties (α = 0.5) are excluded by default; when included they use the same
  Def. C.1 rule as R / R̃ on the reference's scores (at α = 0.5 the optimum keeps the reference's ratio,
  ``logit(α) = 0``): ``|Δ_ref| < ε`` for R*, ``|exp(m_ref,1) − exp(m_ref,2)| < ε`` on the per-token means
  for R̃*. (At a tie the optimum is π_ref times a per-prompt factor; a log-prob difference does not see it,
  the probability scale of R̃* does, which takes the factor as 1.) Reported per β over
  :data:`DEFAULT_BETAS` with min / median / max (:func:`beta_summary`).
* **Alignment gap** (§3.3): ``100 · (median_β R* − R)`` in percentage points.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Annotated

import flax.struct
import jax
import jax.numpy as jnp

BatchArray = Annotated[jax.Array, "[B] float32"]
Scalar = Annotated[jax.Array, "[] float32"]

DEFAULT_BETAS: tuple[float, ...] = (0.01, 0.1, 1.0, 5.0, 10.0)
ALPHA_EPS = 1e-3  # Chen App. C.4 / rlhf_minimizer_client.py
TIE_EPS = 0.01  # Chen Def. C.1
TIE_SCALES = ("logprob", "mean_logprob", "prob", "geometric_mean_prob")


@flax.struct.dataclass
class Tally:
    """A sum of per-example values and the number of examples it covers (add batches, divide once).

    Attributes:
      total: ``[...]`` float32 sum over kept examples.
      count: ``[...]`` float32 number of kept examples (broadcastable to ``total``).
    """

    total: jax.Array
    count: jax.Array

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.total + other.total, self.count + other.count)

    @property
    def mean(self) -> jax.Array:
        """``total / count``; NaN where nothing was counted."""
        count = jnp.asarray(self.count, jnp.float32)
        return jnp.where(count > 0, self.total / jnp.where(count > 0, count, 1.0), jnp.nan)

    @staticmethod
    def zeros(shape: Sequence[int] = ()) -> Tally:
        return Tally(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def _keep(mask, like) -> jax.Array:
    return jnp.ones(jnp.shape(like)[:1], bool) if mask is None else jnp.asarray(mask).astype(bool)


def tally(values: jax.Array, mask: jax.Array | None = None) -> Tally:
    """Tally of ``[B]`` (or ``[B, ...]``, summed over axis 0) values over the kept rows."""
    values = jnp.asarray(values, jnp.float32)
    keep = _keep(mask, values)
    k = keep.reshape(keep.shape + (1,) * (values.ndim - 1))
    return Tally(jnp.sum(jnp.where(k, values, 0.0), axis=0),
                 jnp.broadcast_to(jnp.sum(keep).astype(jnp.float32), values.shape[1:]))


def length_normalized(sums: BatchArray, counts: BatchArray) -> BatchArray:
    """Mean per-token log-prob ``sums / max(counts, 1)`` (log of Chen's π̃, eq. 15)."""
    return sums / jnp.maximum(counts, 1.0)


# ------------------------------------------------------------------------------------ R and R̃


def ranking_correct(chosen_scores: BatchArray, rejected_scores: BatchArray, *, ties_correct: bool = True) -> jax.Array:
    """``[B]`` bool ``π(y_w) ≥ π(y_l)`` on any monotone score (Chen Def. 2.3): summed log-probs for R, per-token
    means for R̃; ``ties_correct=False`` uses ``>`` (the released code counts equal scores wrong)."""
    return chosen_scores >= rejected_scores if ties_correct else chosen_scores > rejected_scores


@flax.struct.dataclass
class RankingTallies:
    """Ranking accuracy on summed (R) and length-normalised (R̃) log-probs.

    Attributes:
      ranking: :class:`Tally` of ``π(y_w) ≥ π(y_l)`` on sums.
      normalized: :class:`Tally` of the same on per-token means.
    """

    ranking: Tally
    normalized: Tally

    def __add__(self, other: RankingTallies) -> RankingTallies:
        return RankingTallies(self.ranking + other.ranking, self.normalized + other.normalized)


@functools.partial(jax.jit, static_argnames=("ties_correct",))
def ranking_accuracy(
    chosen_sums: BatchArray,
    rejected_sums: BatchArray,
    chosen_counts: BatchArray,
    rejected_counts: BatchArray,
    mask: jax.Array | None = None,
    *,
    ties_correct: bool = True,
) -> RankingTallies:
    """R and R̃ tallies (Chen Def. 2.3, eq. 15) from summed log-probs and response token counts."""
    r = ranking_correct(chosen_sums, rejected_sums, ties_correct=ties_correct)
    rn = ranking_correct(length_normalized(chosen_sums, chosen_counts),
                         length_normalized(rejected_sums, rejected_counts), ties_correct=ties_correct)
    return RankingTallies(tally(r, mask), tally(rn, mask))


# ------------------------------------------------------------------------------------ ties (Def. C.1)


@functools.partial(jax.jit, static_argnames=("scale",))
def tie_scale_scores(sums: BatchArray, counts: BatchArray, scale: str = "logprob") -> BatchArray:
    """Scores on the scale the ε of Def. C.1 is applied to.

    ``logprob``: summed log-prob (the released code, unnormalised); ``mean_logprob``: per-token mean;
    ``prob``: ``exp(sum)`` (the paper's literal π, underflows for long responses);
    ``geometric_mean_prob``: ``exp(mean)`` = 1/perplexity (the released code, normalised).
    """
    if scale == "logprob":
        return sums
    if scale == "mean_logprob":
        return length_normalized(sums, counts)
    if scale == "prob":
        return jnp.exp(sums)
    if scale == "geometric_mean_prob":
        return jnp.exp(length_normalized(sums, counts))
    raise ValueError(f"scale must be one of {TIE_SCALES}, got {scale!r}")


def tie_rule_scores(logps: BatchArray, *, normalized: bool) -> BatchArray:
    """The scores Def. C.1's ε is applied to, shared by R / R* and by R̃ / R̃* (the released code's scales).

    ``logps``: summed response log-probs (``normalized=False``, R and R*: returned as they are) or per-token
    mean log-probs (``normalized=True``, R̃ and R̃*: returned as ``exp(logps)``, the geometric-mean probability
    π̃ of eq. 15 = 1/perplexity).
    """
    return jnp.exp(logps) if normalized else logps


def tie_correct(scores_1: BatchArray, scores_2: BatchArray, eps: float = TIE_EPS) -> jax.Array:
    """``[B]`` bool, Chen Def. C.1 for a tie in the labels (α = 0.5): ``|s_1 − s_2| < ε``."""
    return jnp.abs(scores_1 - scores_2) < eps


@jax.jit
def ties_rule_correct(scores_1: BatchArray, scores_2: BatchArray, alpha: BatchArray, eps: float = TIE_EPS
                      ) -> jax.Array:
    """``[B]`` bool, Chen Def. C.1: α = 0.5 ⇒ ``|s_1 − s_2| < ε``; α > 0.5 ⇒ ``s_1 > s_2``; α < 0.5 ⇒ ``s_1 < s_2``.

    α is the share of raters preferring response 1 (for a ``PairBatch``, ``votes`` with response 1 =
    chosen: α ≥ 0.5, ties have α = 0.5).
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    return jnp.where(alpha == 0.5, tie_correct(scores_1, scores_2, eps),
                     jnp.where(alpha > 0.5, scores_1 > scores_2, scores_1 < scores_2))


@jax.jit
def ranking_accuracy_with_ties(scores_1: BatchArray, scores_2: BatchArray, alpha: BatchArray,
                               mask: jax.Array | None = None, eps: float = TIE_EPS) -> Tally:
    """Tally of :func:`ties_rule_correct` (Chen Tables 5-6, ties included)."""
    return tally(ties_rule_correct(scores_1, scores_2, alpha, eps), mask)


# ------------------------------------------------------------------------------------ n > 2 (App. A.6)


@jax.jit
def competition_ranks(scores: jax.Array) -> jax.Array:
    """``[..., n]`` int32 ranks, 1 = best: ``1 + #{j : s_j > s_i}`` = ``n + 1 − rankdata(s, "max")``."""
    return 1 + jnp.sum(scores[..., None, :] > scores[..., :, None], axis=-1).astype(jnp.int32)


@jax.jit
def exact_match_ranking(model_scores: jax.Array, human_scores: jax.Array, mask: jax.Array | None = None) -> Tally:
    """Tally of rows whose full model ranking equals the human ranking (Chen Def. A.8 / App. A.6).

    Args:
      model_scores: ``[B, n]`` model scores (e.g. summed or mean log-probs), higher = better.
      human_scores: ``[B, n]`` aggregated human scores, higher = better (ties give equal ranks, which
        the model must reproduce exactly).
      mask: ``[B]`` kept rows; rows with a NaN score in either array are dropped as well.
    """
    match = jnp.all(competition_ranks(model_scores) == competition_ranks(human_scores), axis=-1)
    finite = ~jnp.any(jnp.isnan(model_scores) | jnp.isnan(human_scores), axis=-1)
    return tally(match, _keep(mask, match) & finite)


# ------------------------------------------------------------------------------------ R* (Cor. 3.3)


@jax.jit
def clip_alpha(alpha: jax.Array, eps: float = ALPHA_EPS) -> jax.Array:
    """α clipped to ``[ε, 1 − ε]`` (Chen Remark 3.2 / App. C.4: α = 1 has its optimum at infinity)."""
    return jnp.clip(jnp.asarray(alpha, jnp.float32), eps, 1.0 - eps)


@jax.jit
def alpha_logit(alpha: jax.Array, eps: float = ALPHA_EPS) -> jax.Array:
    """``log(α / (1 − α))`` of the clipped α (0.75 → ln 3 = 1.0986; 1 → ln 999 = 6.9068)."""
    a = clip_alpha(alpha, eps)
    return jnp.log(a) - jnp.log1p(-a)


@functools.partial(jax.jit, static_argnames=("normalized",))
def idealized_correct(ref_scores_1: BatchArray, ref_scores_2: BatchArray, alpha: BatchArray,
                      betas: jax.Array, eps: float = ALPHA_EPS, tie_eps: float = TIE_EPS, *,
                      normalized: bool = False) -> jax.Array:
    """``[nβ, B]`` bool: does the RLHF/DPO optimum from π_ref rank the pair like the raters? (Cor. 3.3)

    The optimum's log-ratio is ``d = Δ_ref + logit(α)/β`` with ``Δ_ref = s_1 − s_2``: summed reference
    log-probs for R* (``normalized=False``), per-token means for R̃* (``normalized=True``). Correct: ``d > 0``
    when α > 0.5, ``d < 0`` when α < 0.5. A tie (α = 0.5, d = Δ_ref: the optimum keeps the reference's
    ratio) uses the Def. C.1 rule of R / R̃ on the same scale (:func:`tie_rule_scores`): ``|Δ_ref| < tie_eps``
    for R*, ``|exp(s_1) − exp(s_2)| < tie_eps`` for R̃*.
    """
    betas = jnp.atleast_1d(jnp.asarray(betas, jnp.float32))[:, None]  # [nβ, 1]
    alpha = jnp.asarray(alpha, jnp.float32)
    delta = ref_scores_1 - ref_scores_2
    d = delta[None, :] + alpha_logit(alpha, eps)[None, :] / betas
    tie = tie_correct(tie_rule_scores(ref_scores_1, normalized=normalized),
                      tie_rule_scores(ref_scores_2, normalized=normalized), tie_eps)
    tie = jnp.broadcast_to(tie, d.shape)
    return jnp.where(alpha == 0.5, tie, jnp.where(alpha > 0.5, d > 0, d < 0))


@functools.partial(jax.jit, static_argnames=("include_ties", "normalized"))
def idealized_ranking_accuracy(
    ref_scores_1: BatchArray,
    ref_scores_2: BatchArray,
    alpha: BatchArray,
    betas: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    include_ties: bool = False,
    normalized: bool = False,
    eps: float = ALPHA_EPS,
    tie_eps: float = TIE_EPS,
) -> Tally:
    """``[nβ]`` tally of :func:`idealized_correct`: R* from sums, R̃* from per-token means with
    ``normalized=True`` (which matters only for the tie rule); ties excluded by default.

    ``betas`` defaults to :data:`DEFAULT_BETAS`.
    """
    betas = jnp.asarray(DEFAULT_BETAS if betas is None else betas, jnp.float32)
    correct = idealized_correct(ref_scores_1, ref_scores_2, alpha, betas, eps, tie_eps,
                                normalized=normalized)  # [nβ, B]
    keep = _keep(mask, ref_scores_1)
    if not include_ties:
        keep = keep & (jnp.asarray(alpha) != 0.5)
    return tally(correct.T, keep)


@jax.jit
def beta_summary(values: jax.Array) -> dict[str, jax.Array]:
    """``{"min", "median", "max"}`` of a ``[nβ]`` array of accuracies (NaN-free)."""
    return {"min": jnp.min(values), "median": jnp.median(values), "max": jnp.max(values)}


@jax.jit
def alignment_gap(idealized: Scalar, observed: Scalar) -> Scalar:
    """Chen §3.3: ``100 · (R* − R)`` in percentage points (R* = the median over the β grid)."""
    return 100.0 * (idealized - observed)
