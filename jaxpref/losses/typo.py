"""TYPO (Hu, He, Wipf 2024, "New Desiderata for Direct Preference Optimization", arXiv 2407.09072).

**This is a reconstruction.** The paper's full text was not available (papers.md §2); the form below is
the one fixed in ``papers-addendum.md`` from what is verified: a supervised term on preference pairs plus
an unsupervised term, no reliance on DPO's reparameterisation, one weight λ interpolating between the
Bradley–Terry (BT) optimal policy and the reference, and preservation of a reference that is already BT
optimal. The published successor (EXPO, arXiv 2506.07492) has a compositional and a regression variant;
both are registered.

Compositional (``typo``)::

    L(θ) = E_(x,y_w,y_l)[ −log σ( s·(log πθ(y_w|x) − log πθ(y_l|x)) ) ]
         + λ · E_x E_{y ~ π_ref(·|x)}[ −log πθ(y|x) ]

Regression (``typo_regression``): the first term becomes ``E[(σ(s·margin_θ) − p̂)²]`` with p̂ the
empirical preference share of y_w (``LossInputs.votes``; 1 when absent, i.e. a single label).

Logged aux (gradients stopped): ``rewards/{chosen,rejected,margins}`` = s·log πθ of each response and
their difference (the BT scores of the first term), ``typo/ranking_accuracy`` = share of pairs with
``πθ(y_w) > πθ(y_l)`` (the policy's ranking accuracy, not DPO's ``rewards/accuracies``),
``typo/supervised`` and ``typo/sample_nll`` (the two terms).

The second term equals KL(π_ref ‖ πθ) up to a θ-independent constant. It is estimated from responses
sampled once from the frozen reference for the training prompts (no labels needed) and scored under πθ:
``LossInputs.reference_sample_logps`` (``[B]``, one sample per pair's prompt). Log-probs are summed over
response tokens (sequence likelihoods, as the BT model is over sequences); ``kl_norm="token_mean"``
divides the sample NLL by ``reference_sample_tokens`` instead.

Properties these forms are checked against on the exact-oracle testbed (design.md §4): P1 preservation
(a BT-optimal reference is kept for every λ) and P2 interpolation (the minimiser moves monotonically in KL
from the BT-optimal policy at λ = 0 to π_ref as λ → ∞). The optimum of the supervised term alone is the
BT-optimal policy ∝ exp(r*/s).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import (
    POLICY,
    BatchArray,
    HParams,
    LossInputs,
    TermOutput,
    check_positive,
    check_range,
    pair_mean_output,
    register,
    require,
)

KL_NORMS = ("sum", "token_mean")
# TYPO's "rewards" are s·log πθ (no reference), so chosen > rejected is the policy's **ranking** accuracy
# (Chen et al. Def. 2.3, strict), not the reward accuracy DPO-family losses log as ``rewards/accuracies``
# (Chen Remark 2.5): it gets its own name so tables and curves never put the two in one column.
RANKING_ACCURACY = "typo/ranking_accuracy"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TYPOHParams(HParams):
    """TYPO hyperparameters (reconstruction; no published defaults).

    Attributes:
        scale: s > 0, multiplies the policy log-likelihood margin inside σ (1 = plain BT on πθ).
        lam: λ ≥ 0, weight of the reference-sample NLL (the KL(π_ref ‖ πθ) estimate). 0 drops it.
        kl_norm: ``"sum"`` (summed NLL of the sample, the KL estimate) or ``"token_mean"`` (divided by
            ``reference_sample_tokens``).
    """

    scale: float = 1.0
    lam: float = 1.0
    kl_norm: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("scale", self.scale)
        check_range("lam", self.lam, 0.0, math.inf)
        if self.kl_norm not in KL_NORMS:
            raise ValueError(f"kl_norm must be one of {KL_NORMS}, got {self.kl_norm!r}")


def _sample_nll(inputs: LossInputs, hp: TYPOHParams, name: str) -> BatchArray:
    """``[B]`` NLL of the reference sample under πθ (zeros when λ = 0, which needs no sample)."""
    if hp.lam == 0.0:
        return jnp.zeros_like(inputs.policy_chosen_logps)
    require(inputs, name, "reference_sample_logps")
    nll = -inputs.reference_sample_logps
    if hp.kl_norm == "token_mean":
        require(inputs, f"{name} (kl_norm='token_mean')", "reference_sample_tokens")
        nll = nll / jnp.maximum(inputs.reference_sample_tokens, 1.0)
    return nll


def _aux(hp: TYPOHParams, inputs: LossInputs, supervised: BatchArray, nll: BatchArray) -> dict:
    chosen = jax.lax.stop_gradient(hp.scale * inputs.policy_chosen_logps)
    rejected = jax.lax.stop_gradient(hp.scale * inputs.policy_rejected_logps)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        RANKING_ACCURACY: (chosen > rejected).astype(jnp.float32),
        "typo/supervised": jax.lax.stop_gradient(supervised),
        "typo/sample_nll": jax.lax.stop_gradient(nll),
    }


@register("typo", TYPOHParams, requires=POLICY)
def typo(inputs: LossInputs, hp: TYPOHParams) -> TermOutput:
    """Compositional TYPO (reconstruction, module docstring): BT log-loss on πθ + λ·reference-sample NLL.

    Per pair ``−log σ(s·(log πθ(y_w) − log πθ(y_l))) + λ·(−log πθ(y_ref))``; summed log-probs (or a
    token-mean sample NLL with ``kl_norm="token_mean"``); mean over pairs. Reference log-probs of the
    pair are not used. Hparams: ``scale`` s, ``lam`` λ, ``kl_norm``.
    """
    margin = inputs.policy_chosen_logps - inputs.policy_rejected_logps
    supervised = jax.nn.softplus(-hp.scale * margin)
    nll = _sample_nll(inputs, hp, "typo")
    return pair_mean_output(supervised + hp.lam * nll, _aux(hp, inputs, supervised, nll))


@register("typo_regression", TYPOHParams, requires=POLICY)
def typo_regression(inputs: LossInputs, hp: TYPOHParams) -> TermOutput:
    """Regression TYPO (reconstruction): ``(σ(s·margin) − p̂)² + λ·(−log πθ(y_ref))`` per pair.

    ``p̂ = LossInputs.votes`` (share of raters preferring y_w; 1 when votes is None). Summed log-probs,
    mean over pairs. Hparams: ``scale`` s, ``lam`` λ, ``kl_norm``.
    """
    margin = inputs.policy_chosen_logps - inputs.policy_rejected_logps
    target = 1.0 if inputs.votes is None else inputs.votes
    supervised = (jax.nn.sigmoid(hp.scale * margin) - target) ** 2
    nll = _sample_nll(inputs, hp, "typo_regression")
    return pair_mean_output(supervised + hp.lam * nll, _aux(hp, inputs, supervised, nll))
