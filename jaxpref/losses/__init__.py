"""Preference losses: a registry of pure ``[B]``-array loss terms and their weighted compositions.

Usage::

    from jaxpref import losses

    inputs = losses.LossInputs(policy_chosen_logps=..., policy_rejected_logps=...,
                               reference_chosen_logps=..., reference_rejected_logps=...,
                               chosen_tokens=..., rejected_tokens=...)
    out = losses.get("sigmoid")(inputs, losses.make_hparams("sigmoid", beta=0.1))
    value = losses.reduce_term(out, mask)

    comp = losses.compose(losses.rpo(beta=0.01, eta=0.005))   # DPO + η·β·summed NLL (Liu eq. 4.8)
    total, outputs, metrics = comp(inputs, mask)

``available()`` lists the registered losses; each one's docstring cites its paper and equation and states
its normalisation.
"""

# Importing the family modules registers their losses.
from jaxpref.losses import dpo, orpo, sft, simpo, typo  # noqa: F401
from jaxpref.losses.compose import Composition, Term, compose, term
from jaxpref.losses.dpo import (
    AOTHParams,
    BCOHParams,
    BetaHParams,
    CDPOHParams,
    DiscoPOPHParams,
    DPOHParams,
    EXOHParams,
    GammaDPOHParams,
    RobustHParams,
)
from jaxpref.losses.fdiv import F_DIVERGENCES, FDivergenceHParams, f_divergence_scores
from jaxpref.losses.orpo import ORPOHParams
from jaxpref.losses.registry import (
    HParams,
    LossInputs,
    RegisteredLoss,
    TermOutput,
    available,
    available_presets,
    get,
    make_hparams,
    reduce_term,
    register,
    register_preset,
    term_sums,
)
from jaxpref.losses.sft import NoHParams, rpo
from jaxpref.losses.simpo import SimPOHParams
from jaxpref.losses.typo import TYPOHParams

build = compose  # alias: build(spec) == compose(spec)

__all__ = [
    # Records
    "LossInputs",
    "TermOutput",
    # Registry
    "register",
    "register_preset",
    "get",
    "available",
    "available_presets",
    "make_hparams",
    "RegisteredLoss",
    "reduce_term",
    "term_sums",
    # Composition
    "compose",
    "build",
    "term",
    "Term",
    "Composition",
    "rpo",
    # f-divergences
    "F_DIVERGENCES",
    "f_divergence_scores",
    # Hyperparameter records
    "HParams",
    "FDivergenceHParams",
    "DPOHParams",
    "CDPOHParams",
    "RobustHParams",
    "EXOHParams",
    "DiscoPOPHParams",
    "BetaHParams",
    "BCOHParams",
    "AOTHParams",
    "GammaDPOHParams",
    "NoHParams",
    "SimPOHParams",
    "ORPOHParams",
    "TYPOHParams",
]
