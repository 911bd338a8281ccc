"""SimPO: reference-free, length-normalised preference loss with a target margin (Meng et al. 2024).

SimPO (arXiv 2405.14734, eq. 6) replaces DPO's implicit reward by the length-normalised policy
log-likelihood ``r(y) = (β/|y|)·log πθ(y|x)`` and asks the chosen reward to beat the rejected one by a
target margin γ:

    L = −log σ( β·log πθ(y_w|x)/|y_w| − β·log πθ(y_l|x)/|y_l| − γ ).

No reference model is needed. TRL's ``CPOTrainer(loss_type="simpo")`` is the same loss: its
``simpo_gamma`` is γ (it subtracts ``simpo_gamma/β`` from the average log-ratio, then multiplies by β),
and its ``label_smoothing`` gives the conservative form implemented here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import (
    POLICY,
    TOKENS,
    HParams,
    LossInputs,
    TermOutput,
    check_positive,
    check_range,
    pair_mean_output,
    register,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimPOHParams(HParams):
    """SimPO hyperparameters.

    Attributes:
        beta: β > 0, scale of the length-normalised reward. The paper recommends β ∈ [2, 2.5].
        gamma: γ ≥ 0, the target reward margin (in reward units, TRL ``simpo_gamma``). The paper reports
            γ ∈ [0.5, 1.5] working well; default 1.0 (γ/β = 0.5).
        label_smoothing: ε ∈ [0, 0.5], conservative soft label as in cDPO / TRL CPO (0 = the paper).
    """

    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta)
        check_range("gamma", self.gamma, 0.0, float("inf"))
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)


@register(
    "simpo",
    SimPOHParams,
    requires=POLICY + TOKENS,
    hints={"f_divergence": " SimPO is reference-free: there is no log-ratio to transform."},
)
def simpo(inputs: LossInputs, hp: SimPOHParams) -> TermOutput:
    """SimPO (Meng et al. 2024, eq. 6), optionally label-smoothed.

    ``z = β·(log πθ(y_w)/n_w − log πθ(y_l)/n_l) − γ`` with the token counts clamped at 1; per pair
    ``(1 − ε)·(−log σ(z)) + ε·(−log σ(−z))``, mean over pairs. Log-probs are **token means** (summed
    log-probs divided by the response token counts). Reference log-probs are not used.

    aux: ``rewards/*`` with reward ``β·log πθ(y)/n`` (TRL CPO's logged rewards).
    """
    avg_w = inputs.policy_chosen_logps / jnp.maximum(inputs.chosen_tokens, 1.0)
    avg_l = inputs.policy_rejected_logps / jnp.maximum(inputs.rejected_tokens, 1.0)
    z = hp.beta * (avg_w - avg_l) - hp.gamma
    eps = hp.label_smoothing
    loss = (1.0 - eps) * jax.nn.softplus(-z) + eps * jax.nn.softplus(z)
    chosen = jax.lax.stop_gradient(hp.beta * avg_w)
    rejected = jax.lax.stop_gradient(hp.beta * avg_l)
    aux = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
    }
    return pair_mean_output(loss, aux)
