"""NLL (SFT) terms on the chosen response, and RPO = DPO + weighted NLL (Liu et al. 2024, arXiv 2405.16436).

Three normalisations of the chosen-response NLL are in use (papers-addendum.md, "RPO"); each is its own
term so a run states which one it means:

==================  =============================================  ==========================  ==========
term                batch value                                    used by                     RPO weight
==================  =============================================  ==========================  ==========
``nll_sum``         mean_b(−log πθ(y_w,b)), summed over tokens     Liu eq. 4.8 (main paper)    η·β
``nll_token_mean``  mean_b(−log πθ(y_w,b) / n_w,b)                 OpenRLHF; Liu App. F        η
``sft``             Σ_b −log πθ(y_w,b) / Σ_b n_w,b (batch tokens)  TRL ``loss_type="sft"``     η
==================  =============================================  ==========================  ==========

The terms take **no hyperparameters**: their coefficient is the composition weight. In particular β does
not belong to ``nll_sum``: Liu's η·β couples the NLL weight to the DPO term's β, and keeping β inside the
NLL term would let the two copies of β drift apart. ``rpo(...)`` takes β once and sets both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import (
    HParams,
    LossInputs,
    TermOutput,
    pair_mean_output,
    register,
    register_preset,
)

_WEIGHT_HINT = (
    " NLL terms have no hyperparameters: put the coefficient in the term's 'weight' "
    "(RPO: weight = eta * beta for 'nll_sum', eta otherwise), or use the 'rpo' preset."
)
_HINTS = {"beta": _WEIGHT_HINT, "eta": _WEIGHT_HINT, "alpha": _WEIGHT_HINT, "rpo_alpha": _WEIGHT_HINT}
_CHOSEN = ("policy_chosen_logps",)
_CHOSEN_TOKENS = ("policy_chosen_logps", "chosen_tokens")

# NLL convention name (rpo's `nll=`) -> registered term.
NLL_TERMS = {"sum": "nll_sum", "token_mean": "nll_token_mean", "batch_token_mean": "sft"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoHParams(HParams):
    """No hyperparameters (the term's coefficient is its composition weight)."""


def _nll_aux(inputs: LossInputs) -> dict[str, jax.Array]:
    return {"logps/chosen": jax.lax.stop_gradient(inputs.policy_chosen_logps)}


@register("nll_sum", NoHParams, requires=_CHOSEN, hints=_HINTS)
def nll_sum(inputs: LossInputs, hp: NoHParams) -> TermOutput:
    """Summed NLL of the chosen response, ``−log πθ(y_w|x)``, mean over pairs (Liu et al. eq. 4.8).

    Liu's "cumulative SFT loss": no length normalisation, weight η·β in RPO. Needs no token counts.
    """
    del hp
    return pair_mean_output(-inputs.policy_chosen_logps, _nll_aux(inputs))


@register("nll_token_mean", NoHParams, requires=_CHOSEN_TOKENS, hints=_HINTS)
def nll_token_mean(inputs: LossInputs, hp: NoHParams) -> TermOutput:
    """Per-sequence token-mean NLL, ``−log πθ(y_w|x) / n_w`` (count clamped at 1), mean over pairs.

    The OpenRLHF ``nll_loss_coef`` term and Liu's "average SFT loss" (final version, App. F); no β.
    """
    del hp
    loss = -inputs.policy_chosen_logps / jnp.maximum(inputs.chosen_tokens, 1.0)
    return pair_mean_output(loss, _nll_aux(inputs))


@register("sft", NoHParams, requires=_CHOSEN_TOKENS, hints=_HINTS)
def sft(inputs: LossInputs, hp: NoHParams) -> TermOutput:
    """TRL's ``sft`` term: the token mean of the chosen-response NLL over the whole batch.

    Numerator ``−log πθ(y_w|x)`` and denominator ``n_w`` per pair, so the batch value is
    ``Σ_b −log πθ(y_w,b) / Σ_b n_w,b`` (TRL: ``-chosen_per_token_logps[chosen_mask].mean()`` over the
    shifted completion mask, i.e. all chosen response tokens including EOS). Exact under gradient
    accumulation when the step sums numerators and denominators across micro-batches.
    """
    del hp
    return TermOutput(loss=-inputs.policy_chosen_logps, denom=inputs.chosen_tokens, aux=_nll_aux(inputs))


@register_preset("rpo")
def rpo(
    *,
    beta: float = 0.01,
    eta: float = 0.005,
    nll: str = "sum",
    loss: str = "sigmoid",
    **loss_hparams: Any,
) -> list[dict[str, Any]]:
    """RPO (Liu et al. 2024, eq. 4.8): a preference loss plus an η-weighted NLL on the chosen response.

    ``L = L_loss(β) + w·NLL``, where ``w = η·β`` for the paper's summed NLL (``nll="sum"``) and ``w = η``
    for the token-mean conventions (``"token_mean"``: OpenRLHF / App. F, ``"batch_token_mean"``: TRL
    ``["sigmoid", "sft"]`` with ``loss_weights=[1, η]``). The defaults β = 0.01, η = 0.005 are the
    paper's "beta series" (Mistral-7B-SFT on UltraFeedback; App. D.1); the Gemma series uses β = 0.05,
    η = 0.005, and OpenRLHF's token-mean recipe β = 0.5, η = 0.2.

    Args:
        beta: β of the preference loss (and of the η·β weight when ``nll="sum"``).
        eta: η, the NLL coefficient.
        nll: ``"sum"``, ``"token_mean"`` or ``"batch_token_mean"``.
        loss: the registered preference loss (default DPO ``"sigmoid"``).
        **loss_hparams: further hparams of ``loss`` (e.g. ``f_divergence``).

    Returns:
        A composition spec (list of term dicts) for ``compose``.
    """
    if nll not in NLL_TERMS:
        raise ValueError(f"rpo: nll must be one of {sorted(NLL_TERMS)}, got {nll!r}")
    if not eta >= 0:
        raise ValueError(f"rpo: eta must be >= 0, got {eta}")
    weight = eta * beta if nll == "sum" else eta
    return [
        {"name": loss, "weight": 1.0, "beta": beta, **loss_hparams},
        {"name": NLL_TERMS[nll], "weight": weight},
    ]
