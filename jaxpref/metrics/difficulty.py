"""How hard is each preference pair for DPO to rank correctly (Chen et al. 2024, arXiv 2405.19534, §4).

Pure ``[B]`` array math on summed response log-probs; every function is jittable and vmappable.

Sign conventions (Chen §1.2 / Thm 4.1; papers.md §1.6):

* reference log-ratio ``c = log π_ref(y_l|x) − log π_ref(y_w|x)``: **rejected minus chosen**, so c > 0
  means the reference ranks the pair wrongly;
* model log-ratio ``m = log πθ(y_w|x) − log πθ(y_l|x)``; the DPO loss is ``softplus(−β(m + c))``;
* ranking correctness (Chen Def. 2.3) is ``π(y_w) ≥ π(y_l)``; ties count as correct by default (the
  paper's ≥), ``ties_correct=False`` reproduces the released code, which counts them wrong;
* **Theorem 4.1**: ``m ≥ 0 ⇔ L_DPO ≤ τ`` with the flip threshold ``τ = softplus(−β·c) = −log σ(β·c)``.
  τ is the per-example difficulty: the loss must fall below it before the ranking flips to correct. For
  c > 0 it decays like ``exp(−β·c)`` (β = 0.1: c = 10 → 0.31326, c = 50 → 0.0067153, c = 0 → ln 2).

Reward accuracy (RewardBench style, Chen Remark 2.5) is a different quantity:
``1[log πθ(y_w)/π_ref(y_w) > log πθ(y_l)/π_ref(y_l)]``, i.e. ``m + c > 0``.
"""

from __future__ import annotations

from typing import Annotated

import flax.struct
import jax
import jax.numpy as jnp

from jaxpref.metrics.ranking import ranking_correct

BatchArray = Annotated[jax.Array, "[B] float32"]
BoolBatch = Annotated[jax.Array, "[B] bool"]
Scalar = Annotated[jax.Array, "[] float32"]

# Order of the four flip categories: (reference correct?) -> (model correct?).
FLIP_CATEGORIES = ("correct->correct", "correct->incorrect", "incorrect->correct", "incorrect->incorrect")


def _keep(mask: jax.Array | None, like: jax.Array) -> jax.Array:
    return jnp.ones(like.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)


def _masked_mean(values: jax.Array, keep: jax.Array) -> Scalar:
    values = jnp.asarray(values, jnp.float32)
    return jnp.sum(jnp.where(keep, values, 0.0)) / jnp.sum(keep)


def reference_log_ratio(reference_chosen_logps: BatchArray, reference_rejected_logps: BatchArray) -> BatchArray:
    """``[B]`` c = log π_ref(y_l) − log π_ref(y_w) (Chen Thm 4.1); c > 0: the reference misranks the pair."""
    return reference_rejected_logps - reference_chosen_logps


def flip_threshold(ref_log_ratio: BatchArray, beta: float) -> BatchArray:
    """``[B]`` τ = softplus(−β·c): the DPO loss at which the pair's ranking flips (Chen Thm 4.1)."""
    return jax.nn.softplus(-beta * ref_log_ratio)


def reward_accuracy(
    policy_chosen_logps: BatchArray,
    policy_rejected_logps: BatchArray,
    reference_chosen_logps: BatchArray,
    reference_rejected_logps: BatchArray,
    mask: BatchArray | None = None,
) -> Scalar:
    """``[]`` share of pairs whose implicit DPO reward ranks them right (Chen Remark 2.5; TRL's
    ``rewards/accuracies``): ``(πθ(y_w) − π_ref(y_w)) > (πθ(y_l) − π_ref(y_l))``, strict, masked mean."""
    correct = (policy_chosen_logps - reference_chosen_logps) > (policy_rejected_logps - reference_rejected_logps)
    return _masked_mean(correct, _keep(mask, correct))


@flax.struct.dataclass
class Difficulty:
    """Per-example DPO difficulty; every field ``[B]``.

    Attributes:
        ref_log_ratio: c = log π_ref(y_l) − log π_ref(y_w).
        flip_threshold: τ = softplus(−β·c).
        dpo_loss: softplus(−β·(m + c)), the DPO loss of the pair.
        loss_gap: dpo_loss − τ; ≤ 0 exactly when the policy ranks the pair correctly (Thm 4.1). In
            float32 both terms underflow to 0 once β·c ≳ 87, so the ranking itself is ``model_correct``.
        margin: β·(m + c), the DPO reward margin.
        reference_correct: π_ref(y_w) ≥ π_ref(y_l).
        model_correct: πθ(y_w) ≥ πθ(y_l).
    """

    ref_log_ratio: BatchArray
    flip_threshold: BatchArray
    dpo_loss: BatchArray
    loss_gap: BatchArray
    margin: BatchArray
    reference_correct: BoolBatch
    model_correct: BoolBatch


def example_difficulty(
    policy_chosen_logps: BatchArray,
    policy_rejected_logps: BatchArray,
    reference_chosen_logps: BatchArray,
    reference_rejected_logps: BatchArray,
    beta: float,
    *,
    ties_correct: bool = True,
) -> Difficulty:
    """Per-example c, τ, DPO loss, loss gap, reward margin and correctness (Chen Thm 4.1), all ``[B]``."""
    c = reference_log_ratio(reference_chosen_logps, reference_rejected_logps)
    m = policy_chosen_logps - policy_rejected_logps
    margin = beta * (m + c)
    loss = jax.nn.softplus(-margin)
    tau = flip_threshold(c, beta)
    return Difficulty(
        ref_log_ratio=c,
        flip_threshold=tau,
        dpo_loss=loss,
        loss_gap=loss - tau,
        margin=margin,
        reference_correct=ranking_correct(reference_chosen_logps, reference_rejected_logps, ties_correct=ties_correct),
        model_correct=ranking_correct(policy_chosen_logps, policy_rejected_logps, ties_correct=ties_correct),
    )


@flax.struct.dataclass
class FlipCategories:
    """Chen Figs. 2, 5–7: pairs split by (reference correct?) × (model correct?), order ``FLIP_CATEGORIES``.

    Attributes:
        counts: ``[4]`` number of (unmasked) pairs per category, float32.
        shares: ``[4]`` counts / total; sums to 1.
        mean_loss: ``[4]`` mean DPO loss per category; NaN for an empty category.
        mean_margin: ``[4]`` mean reward margin per category; NaN for an empty category.
    """

    counts: jax.Array
    shares: jax.Array
    mean_loss: jax.Array
    mean_margin: jax.Array


def flip_categories(
    reference_correct: BoolBatch,
    model_correct: BoolBatch,
    loss: BatchArray,
    margin: BatchArray,
    mask: BatchArray | None = None,
) -> FlipCategories:
    """Counts, shares and per-category mean loss / margin of the four flip categories.

    Args:
        reference_correct: ``[B]`` bool, the reference ranks the pair correctly.
        model_correct: ``[B]`` bool, the current policy ranks it correctly.
        loss: ``[B]`` per-example loss (usually the DPO loss).
        margin: ``[B]`` per-example reward margin.
        mask: ``[B]`` real (non-padding) examples; None keeps all.

    Returns:
        ``FlipCategories`` with ``[4]`` arrays in the order of ``FLIP_CATEGORIES``.
    """
    keep = _keep(mask, loss)
    # Category index: 0 c->c, 1 c->i, 2 i->c, 3 i->i.
    index = 2 * (~jnp.asarray(reference_correct)).astype(jnp.int32) + (~jnp.asarray(model_correct)).astype(jnp.int32)
    onehot = (index[:, None] == jnp.arange(4)[None, :]) & keep[:, None]  # [B, 4]
    weights = onehot.astype(jnp.float32)
    counts = jnp.sum(weights, axis=0)
    safe = jnp.where(counts > 0, counts, 1.0)

    def per_category_mean(values: BatchArray) -> jax.Array:
        sums = jnp.sum(jnp.where(onehot, jnp.asarray(values, jnp.float32)[:, None], 0.0), axis=0)
        return jnp.where(counts > 0, sums / safe, jnp.nan)

    return FlipCategories(
        counts=counts,
        shares=counts / jnp.sum(counts),
        mean_loss=per_category_mean(loss),
        mean_margin=per_category_mean(margin),
    )


def flip_categories_from_logps(
    policy_chosen_logps: BatchArray,
    policy_rejected_logps: BatchArray,
    reference_chosen_logps: BatchArray,
    reference_rejected_logps: BatchArray,
    beta: float,
    mask: BatchArray | None = None,
    *,
    ties_correct: bool = True,
) -> FlipCategories:
    """``flip_categories`` with the DPO loss and reward margin computed from the four ``[B]`` log-probs."""
    d = example_difficulty(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
        ties_correct=ties_correct,
    )
    return flip_categories(d.reference_correct, d.model_correct, d.dpo_loss, d.margin, mask)
