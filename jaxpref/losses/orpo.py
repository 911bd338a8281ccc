"""ORPO: odds-ratio preference optimisation, reference-free (Hong, Lee, Thorne 2024, arXiv 2403.07691).

With the length-normalised likelihood ``P(y|x) = exp(log πθ(y|x)/|y|)`` (eq. 4) and
``odds(y|x) = P/(1 − P)``, ORPO minimises (eq. 6–7)

    L_ORPO = E[ L_SFT + λ·L_OR ],   L_OR = −log σ( log odds(y_w|x) − log odds(y_l|x) ),

where ``L_SFT`` is the NLL of the chosen response. ``log odds = ℓ − log(1 − e^ℓ)`` with ``ℓ`` the mean
token log-prob; ``log(1 − e^ℓ)`` is computed stably (``log1mexp``) and ℓ is clamped at −1e-6, where
P = 1 would make the odds infinite (the odds-ratio gradient is zero above the clamp).

Two terms are registered:

* ``orpo``: the full eq. 6 with the paper's per-sequence token-mean NLL (``L_SFT`` of eq. 2), mean
  over pairs.
* ``orpo_odds_ratio``: ``L_OR`` alone (no hparams: λ is its composition weight). TRL's experimental
  ``ORPOTrainer`` uses a *batch* token-mean NLL; reproduce it as
  ``compose([{"name": "sft"}, {"name": "orpo_odds_ratio", "weight": λ}])``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import (
    POLICY,
    TOKENS,
    BatchArray,
    HParams,
    LossInputs,
    TermOutput,
    check_range,
    pair_mean_output,
    register,
)
from jaxpref.losses.sft import NoHParams

# Largest mean log-prob fed to log1mexp: keeps log(1 − P) finite (P = 1 has infinite odds).
_MAX_MEAN_LOGP = -1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class ORPOHParams(HParams):
    """ORPO hyperparameters.

    Attributes:
        lam: λ ≥ 0, weight of the odds-ratio term (TRL ``ORPOConfig.beta``; default 0.1 as TRL and the
            paper's Phi-2 / Llama-2 runs).
    """

    lam: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lam", self.lam, 0.0, math.inf)


def log1mexp(x: BatchArray) -> BatchArray:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of −ln 2 (Mächler 2012)."""
    x = jnp.minimum(x, _MAX_MEAN_LOGP)
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _odds_ratio_parts(inputs: LossInputs) -> tuple[BatchArray, BatchArray, BatchArray]:
    """Returns ``[B]`` mean log-probs of y_w and y_l, and the log odds ratio."""
    mean_w = inputs.policy_chosen_logps / jnp.maximum(inputs.chosen_tokens, 1.0)
    mean_l = inputs.policy_rejected_logps / jnp.maximum(inputs.rejected_tokens, 1.0)
    mean_w_c = jnp.minimum(mean_w, _MAX_MEAN_LOGP)
    mean_l_c = jnp.minimum(mean_l, _MAX_MEAN_LOGP)
    log_odds = (mean_w_c - mean_l_c) - (log1mexp(mean_w_c) - log1mexp(mean_l_c))
    return mean_w, mean_l, log_odds


def _aux(scale: float, mean_w: BatchArray, mean_l: BatchArray, log_odds: BatchArray) -> dict:
    chosen = jax.lax.stop_gradient(scale * mean_w)
    rejected = jax.lax.stop_gradient(scale * mean_l)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
        "orpo/log_odds_ratio": jax.lax.stop_gradient(log_odds),
    }


_HINT = {"beta": " ORPO's odds-ratio weight is 'lam' (TRL calls it beta)."}


@register("orpo", ORPOHParams, requires=POLICY + TOKENS, hints=_HINT)
def orpo(inputs: LossInputs, hp: ORPOHParams) -> TermOutput:
    """ORPO (Hong et al. 2024, eq. 6): ``−log πθ(y_w)/n_w + λ·(−log σ(log odds ratio))`` per pair.

    NLL and odds ratio both use token means (summed log-probs divided by the clamped token counts);
    mean over pairs. aux: ``rewards/*`` = λ·mean log-prob (TRL's logged rewards), ``orpo/log_odds_ratio``,
    ``orpo/nll``. Hparams: ``lam`` λ.
    """
    mean_w, mean_l, log_odds = _odds_ratio_parts(inputs)
    nll = -mean_w
    aux = _aux(hp.lam, mean_w, mean_l, log_odds)
    aux["orpo/nll"] = jax.lax.stop_gradient(nll)
    return pair_mean_output(nll + hp.lam * jax.nn.softplus(-log_odds), aux)


@register("orpo_odds_ratio", NoHParams, requires=POLICY + TOKENS, hints={"lam": " Use the term weight."})
def orpo_odds_ratio(inputs: LossInputs, hp: NoHParams) -> TermOutput:
    """ORPO's odds-ratio term alone (eq. 7): ``−log σ(log odds(y_w) − log odds(y_l))``, mean over pairs.

    Token-mean log-probs. No hparams: λ is the composition weight. aux as ``orpo`` with reward scale 1.
    """
    del hp
    mean_w, mean_l, log_odds = _odds_ratio_parts(inputs)
    return pair_mean_output(jax.nn.softplus(-log_odds), _aux(1.0, mean_w, mean_l, log_odds))
