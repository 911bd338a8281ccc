"""The DPO family: every TRL 1.16 ``DPOConfig.loss_type`` except ``sft``, plus cDPO, summed IPO and γ-DPO.

Notation (all ``[B]``, log-probs **summed** over response tokens): ``u_w = log πθ(y_w|x) − log π_ref(y_w|x)``
and ``u_l`` the chosen / rejected log-ratios, ``s_w, s_l`` their f-divergence scores (``fdiv.py``; equal to
``u_w, u_l`` under the default reverse KL), ``Δ = s_w − s_l``, ``n_w, n_l`` the response token counts.
Every loss here is a per-pair loss averaged over pairs (``denom = 1``), matching TRL's
``per_sequence_loss.mean()``. Semantics were checked against ``DPOTrainer._compute_loss`` (TRL 1.16) in
``tests/test_losses_trl_parity.py`` (value and gradient, 1e-5).

aux of every loss: ``rewards/{chosen,rejected,margins,accuracies}`` with reward ``β·u`` (TRL's logged
rewards, independent of the f-divergence), gradients stopped.

Not here: TRL's ``ld_alpha`` (LD-DPO) changes how log-probs are summed, so it belongs to the log-prob
code; ``use_weighting`` (WPO) needs per-token probabilities the losses never see.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxpref.losses.fdiv import FDivergenceHParams
from jaxpref.losses.registry import (
    POLICY,
    REFERENCE,
    TOKENS,
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

_REF = POLICY + REFERENCE
_REF_TOKENS = _REF + TOKENS
_NO_FDIV = "This loss has no f-divergence generalisation (the β·log Z term does not cancel)."
_LS_HINT = "Plain 'sigmoid' has no label smoothing in TRL 1.16; use 'cdpo' (conservative DPO)."


# ----------------------------------------------------------------------------- hyperparameters


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOHParams(FDivergenceHParams):
    """β and the f-divergence (``beta``, ``f_divergence``, ``f_alpha``; see ``FDivergenceHParams``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CDPOHParams(FDivergenceHParams):
    """DPO hparams plus ``label_smoothing`` ε ∈ [0, 0.5], the assumed label-flip probability."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RobustHParams(FDivergenceHParams):
    """DPO hparams plus ``label_smoothing`` ε ∈ [0, 0.5), the label-flip rate (paper suggests 0.1)."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EXOHParams(FDivergenceHParams):
    """DPO hparams plus ``label_smoothing`` ε ∈ (0, 1) of the target [1 − ε, ε]; EXO paper: 1e-3."""

    label_smoothing: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, lo_open=True, hi_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscoPOPHParams(FDivergenceHParams):
    """DPO hparams plus ``tau`` > 0, the temperature of the mixing gate (paper and TRL: 0.05)."""

    tau: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("tau", self.tau)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BetaHParams(HParams):
    """Only β > 0 (TRL default 0.1)."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BCOHParams(BetaHParams):
    """β plus ``running_mean``: subtract the running reward mean δ (``LossInputs.bco_delta``)."""

    running_mean: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class AOTHParams(BetaHParams):
    """β plus ``label_smoothing`` ε ∈ [0, 0.5] (TRL applies it to both AOT variants)."""

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GammaDPOHParams(BetaHParams):
    """β, ``gamma`` ≥ 0 (weight of the reference log-ratio; 1 = DPO) and ``literal_eq4`` (see gamma_dpo)."""

    gamma: float = 1.0
    literal_eq4: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gamma", self.gamma, 0.0, math.inf)


# ----------------------------------------------------------------------------- helpers


def _logratios(inputs: LossInputs) -> tuple[BatchArray, BatchArray]:
    chosen = inputs.policy_chosen_logps - inputs.reference_chosen_logps
    rejected = inputs.policy_rejected_logps - inputs.reference_rejected_logps
    return chosen, rejected


def reward_aux(beta: float, chosen_logratios: BatchArray, rejected_logratios: BatchArray) -> dict:
    """TRL's logged rewards ``β·u`` (``[B]`` each, gradient stopped) and their margin / accuracy."""
    chosen = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected = jax.lax.stop_gradient(beta * rejected_logratios)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
    }


def _smoothed_logistic(z: BatchArray, eps: float) -> BatchArray:
    """``−(1 − ε)·log σ(z) − ε·log σ(−z)``: the logistic loss against the soft target [1 − ε, ε]."""
    return (1.0 - eps) * jax.nn.softplus(-z) + eps * jax.nn.softplus(z)


def _score_delta(inputs: LossInputs, hp: FDivergenceHParams) -> tuple[BatchArray, dict]:
    chosen, rejected = _logratios(inputs)
    s_w, s_l = hp.scores(chosen, rejected)
    return s_w - s_l, reward_aux(hp.beta, chosen, rejected)


def _length_averaged_delta(inputs: LossInputs, hp: FDivergenceHParams) -> tuple[BatchArray, dict]:
    # TRL divides by completion_mask.sum(1).clamp(min=1): the response token count, EOS included.
    chosen, rejected = _logratios(inputs)
    s_w, s_l = hp.scores(chosen, rejected)
    n_w = jnp.maximum(inputs.chosen_tokens, 1.0)
    n_l = jnp.maximum(inputs.rejected_tokens, 1.0)
    return s_w / n_w - s_l / n_l, reward_aux(hp.beta, chosen, rejected)


# ----------------------------------------------------------------------------- score-difference losses
# (TRL applies the f-divergence to these.)


@register("sigmoid", DPOHParams, requires=_REF, hints={"label_smoothing": " " + _LS_HINT})
def sigmoid(inputs: LossInputs, hp: DPOHParams) -> TermOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): ``−log σ(β·Δ)`` per pair.

    Summed log-probs, mean over pairs. Hparams: ``beta`` β, ``f_divergence`` / ``f_alpha`` (f-DPO).
    At zero margins the loss is ln 2.
    """
    delta, aux = _score_delta(inputs, hp)
    return pair_mean_output(jax.nn.softplus(-hp.beta * delta), aux)


@register("cdpo", CDPOHParams, requires=_REF)
def cdpo(inputs: LossInputs, hp: CDPOHParams) -> TermOutput:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): DPO with soft labels.

    ``(1 − ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ))`` per pair, summed log-probs, mean over pairs. This is the
    ``sigmoid`` loss with ``label_smoothing`` of TRL < 0.29 (TRL 1.16's ``sigmoid`` has none); ε = 0 is
    ``sigmoid``. Hparams: ``beta``, ``label_smoothing`` ε ∈ [0, 0.5], ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _score_delta(inputs, hp)
    return pair_mean_output(_smoothed_logistic(hp.beta * delta, hp.label_smoothing), aux)


@register("hinge", DPOHParams, requires=_REF)
def hinge(inputs: LossInputs, hp: DPOHParams) -> TermOutput:
    """SLiC-HF rank-calibration hinge (Zhao et al. 2023, arXiv 2305.10425), TRL form: ``max(0, 1 − βΔ)``.

    Summed log-probs, mean over pairs; 1/β is the margin in log-ratio units. Hparams: ``beta``,
    ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _score_delta(inputs, hp)
    return pair_mean_output(jax.nn.relu(1.0 - hp.beta * delta), aux)


@register("ipo", DPOHParams, requires=_REF_TOKENS)
def ipo(inputs: LossInputs, hp: DPOHParams) -> TermOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17) in TRL's **length-averaged** form.

    ``(s_w/n_w − s_l/n_l − 1/(2τ))²`` per pair with τ = ``beta``, mean over pairs. Each score is divided
    by its response token count (clamped at 1), as TRL does (its comment: confirmed with the IPO authors).
    The papers' summed form (Chen et al. App. A.5, Razin et al. App. B) is ``ipo_sum``.
    Hparams: ``beta`` τ, ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _length_averaged_delta(inputs, hp)
    return pair_mean_output((delta - 1.0 / (2.0 * hp.beta)) ** 2, aux)


@register("ipo_sum", DPOHParams, requires=_REF)
def ipo_sum(inputs: LossInputs, hp: DPOHParams) -> TermOutput:
    """IPO (Azar et al. 2023, eq. 17) on **summed** log-probs: ``(Δ − 1/(2τ))²`` per pair, τ = ``beta``.

    The form of Chen et al. 2024 (App. A.5) and Razin et al. 2025 (App. B) and of OpenRLHF; no length
    averaging, so the loss scale grows with response length. Mean over pairs. Hparams: ``beta`` τ,
    ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _score_delta(inputs, hp)
    return pair_mean_output((delta - 1.0 / (2.0 * hp.beta)) ** 2, aux)


@register("robust", RobustHParams, requires=_REF)
def robust(inputs: LossInputs, hp: RobustHParams) -> TermOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased loss under label-flip rate ε.

    ``[(1 − ε)·(−log σ(βΔ)) − ε·(−log σ(−βΔ))] / (1 − 2ε)`` per pair, summed log-probs, mean over pairs.
    Hparams: ``beta``, ``label_smoothing`` ε ∈ [0, 0.5), ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _score_delta(inputs, hp)
    z, eps = hp.beta * delta, hp.label_smoothing
    loss = ((1.0 - eps) * jax.nn.softplus(-z) - eps * jax.nn.softplus(z)) / (1.0 - 2.0 * eps)
    return pair_mean_output(loss, aux)


@register("exo_pair", EXOHParams, requires=_REF)
def exo_pair(inputs: LossInputs, hp: EXOHParams) -> TermOutput:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, eq. 16), K = 2: KL(p_θ ‖ [1 − ε, ε]).

    With ``q = σ(βΔ)``: ``q·(log q − log(1 − ε)) + (1 − q)·(log(1 − q) − log ε)`` per pair, summed
    log-probs, mean over pairs. Hparams: ``beta``, ``label_smoothing`` ε ∈ (0, 1) (paper: 1e-3),
    ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _score_delta(inputs, hp)
    z, eps = hp.beta * delta, hp.label_smoothing
    loss = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - math.log(eps)
    )
    return pair_mean_output(loss, aux)


@register("discopop", DiscoPOPHParams, requires=_REF)
def discopop(inputs: LossInputs, hp: DiscoPOPHParams) -> TermOutput:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5).

    With ``z = βΔ`` and gate ``g = σ(z/τ)``: ``(1 − g)·(−log σ(z)) + g·exp(−z)`` per pair, summed
    log-probs, mean over pairs. ``g·exp(−z)`` is evaluated as ``exp(−z + log σ(z/τ))``: equal in exact
    arithmetic, and finite where TRL's product gives ``inf · 0 = nan`` (z ≲ −88).
    Hparams: ``beta``, ``tau`` (0.05), ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _score_delta(inputs, hp)
    z = hp.beta * delta
    gate = jax.nn.sigmoid(z / hp.tau)
    loss = (1.0 - gate) * jax.nn.softplus(-z) + jnp.exp(-z + jax.nn.log_sigmoid(z / hp.tau))
    return pair_mean_output(loss, aux)


@register("sigmoid_norm", DPOHParams, requires=_REF_TOKENS)
def sigmoid_norm(inputs: LossInputs, hp: DPOHParams) -> TermOutput:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024, arXiv 2411.15124): ``−log σ(β·(s_w/n_w − s_l/n_l))``.

    Each score is divided by its response token count (clamped at 1, as TRL), mean over pairs.
    Hparams: ``beta`` (Tülu 3 uses β = 5 with this form), ``f_divergence`` / ``f_alpha``.
    """
    delta, aux = _length_averaged_delta(inputs, hp)
    return pair_mean_output(jax.nn.softplus(-hp.beta * delta), aux)


# ----------------------------------------------------------------------------- log-ratio losses
# (Built on u_w, u_l individually; no f-divergence.)


@register("nca_pair", BetaHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def nca_pair(inputs: LossInputs, hp: BetaHParams) -> TermOutput:
    """Pairwise NCA (Chen et al. 2024, "Noise Contrastive Alignment", arXiv 2402.05369).

    With rewards ``r = β·u``: ``−log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)`` per pair, summed log-probs,
    mean over pairs. Hparams: ``beta``.
    """
    chosen, rejected = _logratios(inputs)
    r_w, r_l = hp.beta * chosen, hp.beta * rejected
    loss = jax.nn.softplus(-r_w) + 0.5 * jax.nn.softplus(r_w) + 0.5 * jax.nn.softplus(r_l)
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))


@register("bco_pair", BCOHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def bco_pair(inputs: LossInputs, hp: BCOHParams) -> TermOutput:
    """Paired BCO (Jung et al. 2024, arXiv 2404.04656): binary classification of chosen vs rejected rewards.

    ``−log σ(r_w − δ) − log σ(−(r_l − δ))`` per pair with ``r = β·u`` (summed log-probs), mean over pairs.

    TRL 1.16 uses δ = 0 (no running moments); that is the default here and what parity is checked
    against. With ``running_mean=True``, δ is ``LossInputs.bco_delta`` (gradient stopped), the running
    mean of the rewards that the train step keeps, as older TRL did with ``RunningMoments``. The step
    updates it from ``aux["bco/reward_mean"]`` (``[B]``, ``(r_w + r_l)/2``; its masked batch mean is the
    batch reward mean). Note older TRL updated the state with the current batch *before* using it.
    Hparams: ``beta``, ``running_mean``.
    """
    chosen, rejected = _logratios(inputs)
    r_w, r_l = hp.beta * chosen, hp.beta * rejected
    delta = 0.0
    if hp.running_mean:
        require(inputs, "bco_pair (running_mean=True)", "bco_delta")
        delta = jax.lax.stop_gradient(inputs.bco_delta)
    loss = jax.nn.softplus(-(r_w - delta)) + jax.nn.softplus(r_l - delta)
    aux = reward_aux(hp.beta, chosen, rejected)
    aux["bco/reward_mean"] = jax.lax.stop_gradient(0.5 * (r_w + r_l))
    return pair_mean_output(loss, aux)


@register("sppo_hard", BetaHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def sppo_hard(inputs: LossInputs, hp: BetaHParams) -> TermOutput:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P = 1 / 0).

    ``(u_w − 1/(2β))² + (u_l + 1/(2β))²`` per pair, summed log-probs, mean over pairs. Hparams: ``beta``.
    """
    chosen, rejected = _logratios(inputs)
    half = 0.5 / hp.beta
    loss = (chosen - half) ** 2 + (rejected + half) ** 2
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))


@register("aot", AOTHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def aot(inputs: LossInputs, hp: AOTHParams) -> TermOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): distributional alignment via sorted margins.

    ``δ = sort_B(log πθ(y_w) − log πθ(y_l)) − sort_B(log π_ref(y_w) − log π_ref(y_l))``, then the smoothed
    logistic ``(1 − ε)(−log σ(βδ)) + ε(−log σ(−βδ))``, mean over pairs. Sorting couples examples across
    the batch: every row must be real (a mask cannot remove padded rows from the sort) and gradient
    accumulation over micro-batches is not equivalent to the full batch (as in TRL).
    Hparams: ``beta``, ``label_smoothing`` ε.
    """
    chosen, rejected = _logratios(inputs)
    policy = jnp.sort(inputs.policy_chosen_logps - inputs.policy_rejected_logps)
    reference = jnp.sort(inputs.reference_chosen_logps - inputs.reference_rejected_logps)
    loss = _smoothed_logistic(hp.beta * (policy - reference), hp.label_smoothing)
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))


@register("aot_unpaired", AOTHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def aot_unpaired(inputs: LossInputs, hp: AOTHParams) -> TermOutput:
    """AOT, unpaired (Melnyk et al. 2024): ``δ = sort_B(u_w) − sort_B(u_l)``, smoothed logistic as ``aot``.

    Mean over pairs; the same batch-coupling caveats as ``aot``. Hparams: ``beta``, ``label_smoothing``.
    """
    chosen, rejected = _logratios(inputs)
    loss = _smoothed_logistic(hp.beta * (jnp.sort(chosen) - jnp.sort(rejected)), hp.label_smoothing)
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))


@register("apo_zero", BetaHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def apo_zero(inputs: LossInputs, hp: BetaHParams) -> TermOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): raise chosen, lower rejected.

    ``(1 − σ(β·u_w)) + σ(β·u_l)`` per pair, summed log-probs, mean over pairs. Hparams: ``beta``.
    """
    chosen, rejected = _logratios(inputs)
    loss = (1.0 - jax.nn.sigmoid(hp.beta * chosen)) + jax.nn.sigmoid(hp.beta * rejected)
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))


@register("apo_down", BetaHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def apo_down(inputs: LossInputs, hp: BetaHParams) -> TermOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower chosen, lower rejected more.

    ``σ(β·u_w) + (1 − σ(β·(u_w − u_l)))`` per pair, summed log-probs, mean over pairs. Hparams: ``beta``.
    """
    chosen, rejected = _logratios(inputs)
    loss = jax.nn.sigmoid(hp.beta * chosen) + (1.0 - jax.nn.sigmoid(hp.beta * (chosen - rejected)))
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))


@register("gamma_dpo", GammaDPOHParams, requires=_REF, hints={"f_divergence": " " + _NO_FDIV})
def gamma_dpo(inputs: LossInputs, hp: GammaDPOHParams) -> TermOutput:
    """γ-DPO, attenuated reference (Chen et al. 2024, arXiv 2405.19534, eq. 4).

    With ``Δθ = log πθ(y_w) − log πθ(y_l)`` and ``Δref = log π_ref(y_w) − log π_ref(y_l)`` (summed):

    * default, the released code's form: ``−log σ(β·(Δθ − γ·Δref))``; γ = 1 is exactly DPO;
    * ``literal_eq4=True``, eq. 4 as typeset: ``−log σ(β·Δθ − γ·Δref)``; γ = 1 is DPO only when β = 1.

    Mean over pairs. Hparams: ``beta``, ``gamma`` (paper grid 0, 0.25, …, 2), ``literal_eq4``.
    """
    chosen, rejected = _logratios(inputs)
    policy = inputs.policy_chosen_logps - inputs.policy_rejected_logps
    reference = inputs.reference_chosen_logps - inputs.reference_rejected_logps
    ref_weight = hp.gamma if hp.literal_eq4 else hp.beta * hp.gamma
    loss = jax.nn.softplus(-(hp.beta * policy - ref_weight * reference))
    return pair_mean_output(loss, reward_aux(hp.beta, chosen, rejected))
