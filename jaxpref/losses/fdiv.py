"""f-divergence transforms of the implicit-reward log-ratios (f-DPO; Wang et al. 2023, arXiv 2309.16240).

f-DPO replaces DPO's reverse-KL regulariser by a general f-divergence. In the loss this means replacing the
log-ratio ``u = log πθ(y|x) − log π_ref(y|x)`` of each response by the "score" ``f'(exp(u))`` before the
chosen − rejected difference is formed (f-DPO Thm. 1). The transforms below reproduce TRL 1.16
(``DPOTrainer._compute_loss``) exactly:

=================  ====================================  ==========================================
``f_divergence``   f'(t), t = π/π_ref                    score(u)
=================  ====================================  ==========================================
reverse_kl         log t                                 u (standard DPO)
forward_kl         1 − 1/t                               1 − exp(−u)
js_divergence      log(2t / (t + 1))                     log 2 + log σ(u)
alpha_divergence   (t^(α−1) − 1)/(α − 1)                 (exp((α−1)u) − 1)/(α − 1); u if |α−1| < 1e-6
=================  ====================================  ==========================================

As in TRL, the exponent of ``alpha_divergence`` is clamped at 80 (float32) so ``exp`` stays finite; its
gradient is zero beyond the clamp. TRL does not clamp ``forward_kl``; we clamp ``−u`` at the same 80, which
changes nothing where TRL's value is finite for ``u > −80`` and keeps the loss finite (zero gradient)
below, where TRL overflows to inf/nan at ``u < −88.7``.

The f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in a chosen − rejected difference,
so only losses built on that difference accept ``f_divergence`` (TRL: sigmoid, sigmoid_norm, hinge, ipo,
exo_pair, robust, discopop; jaxpref adds cdpo and ipo_sum). The others reject the hyperparameter.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxpref.losses.registry import BatchArray, HParams, check_positive

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# TRL's float32 clamp on the exponent: exp(80) ~ 5.5e34 is representable, exp(88.8) is not.
_EXP_CLAMP = 80.0
# TRL treats |α − 1| below this as the reverse-KL limit.
_ALPHA_ONE_TOL = 1e-6
_DEFAULT_ALPHA = 0.5  # TRL DPOConfig.f_alpha_divergence_coef default


def f_divergence_scores(
    chosen_logratios: BatchArray,
    rejected_logratios: BatchArray,
    f_divergence: str = "reverse_kl",
    f_alpha: float = _DEFAULT_ALPHA,
) -> tuple[BatchArray, BatchArray]:
    """Maps the ``[B]`` chosen / rejected log-ratios to f-DPO scores (table in the module docstring).

    Args:
        chosen_logratios: ``[B]`` log πθ(y_w|x) − log π_ref(y_w|x) (summed over response tokens).
        rejected_logratios: ``[B]`` same for y_l.
        f_divergence: one of ``F_DIVERGENCES``.
        f_alpha: α of the α-divergence (ignored otherwise).

    Returns:
        ``([B], [B])`` chosen and rejected scores.
    """
    return _score(chosen_logratios, f_divergence, f_alpha), _score(rejected_logratios, f_divergence, f_alpha)


def _score(u: BatchArray, f_divergence: str, f_alpha: float) -> BatchArray:
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "forward_kl":
        return 1.0 - jnp.exp(jnp.minimum(-u, _EXP_CLAMP))
    if f_divergence == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(u)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < _ALPHA_ONE_TOL:
            return u
        t = jnp.minimum((f_alpha - 1.0) * u, _EXP_CLAMP)
        # exp(t) - 1 rather than expm1(t): the same rounding as TRL, which parity is checked against.
        return (jnp.exp(t) - 1.0) / (f_alpha - 1.0)
    raise ValueError(f"unknown f_divergence {f_divergence!r}; choose one of {F_DIVERGENCES}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FDivergenceHParams(HParams):
    """Hparams shared by the losses built on the chosen − rejected score difference.

    Attributes:
        beta: β, the KL-regularisation strength (IPO: τ). TRL default 0.1.
        f_divergence: which f-divergence regularises the policy (see ``F_DIVERGENCES``).
        f_alpha: α of ``alpha_divergence``; must stay at its default 0.5 for the other divergences.
    """

    beta: float = 0.1
    f_divergence: str = "reverse_kl"
    f_alpha: float = _DEFAULT_ALPHA

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta)
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {self.f_divergence!r}")
        if self.f_divergence != "alpha_divergence" and self.f_alpha != _DEFAULT_ALPHA:
            raise ValueError(
                f"f_alpha={self.f_alpha} only applies with f_divergence='alpha_divergence' "
                f"(got f_divergence={self.f_divergence!r})"
            )

    def scores(self, chosen_logratios: BatchArray, rejected_logratios: BatchArray) -> tuple[BatchArray, ...]:
        """The f-divergence scores of the ``[B]`` log-ratios under these hparams."""
        return f_divergence_scores(chosen_logratios, rejected_logratios, self.f_divergence, self.f_alpha)
