"""Win-rate optimisation (WRO): the on-policy estimator math (papers-addendum.md, "Win-rate optimisation").

**A reconstruction.** Zhang & Ranganath (ICML 2025, arXiv 2502.10505) could not be read in full
(papers.md §4); ``papers-addendum.md`` fixes the objective implemented here::

    J(θ) = WR_h(πθ; π_c) − β·KL(πθ ‖ π_ref),   WR_h(π; π_c) = E_x E_{y~π, y'~π_c}[ h(p(y ≻ y' | x)) ]

with h ∈ {identity, logit, log} (non-decreasing; logit under a Bradley–Terry judge is RLHF) and the
competitor π_c the reference, the current policy under stop-gradient (self-play) or the dataset's
responses. Everything below is a pure ``jnp`` function of ``[B, K]`` arrays (B prompts, K policy samples
per prompt, C competitor samples per prompt); :mod:`jaxpref.training.wro` wires it to models.

Gradient estimator (REINFORCE with a leave-one-out baseline, "RLOO": Kool, van Hoof, Welling 2019,
"Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024, "Back to basics", eq. 6).
With ``v_k = mean_c h(p(y_k ≻ y'_c))`` and ``A_k = v_k − mean_{j≠k} v_j``,
``mean_k A_k ∇log π(y_k)`` is an unbiased estimate of ``∇WR_h``: ``v_k`` is unbiased for
``E_{y'}h(p(y_k ≻ y'))`` and the baseline is independent of ``y_k`` (the competitor samples are shared by
the K samples of a prompt and independent of them). So the surrogate ``−mean(stop_grad(A)·log π(y))``
has the expected gradient ``−∇WR_h``.

KL penalty. The gradient of ``KL(π ‖ π_ref) = E_π[log π(y) − log π_ref(y)]`` is
``E_π[∇log π(y)·(log π(y) − log π_ref(y))]``. With per-token log-ratios ``l_t`` over the response
(``log π(y) − log π_ref(y) = Σ_t l_t``), Schulman's estimators ("Approximating KL divergence", 2020)
enter the surrogate as follows; every row gives an unbiased estimate of ``∇KL`` (checked by exact
enumeration in ``tests/test_wro.py``):

======  =================================  ===============  =================================================
kind    per-sequence value f               E[f] = KL?       surrogate term (times β)
======  =================================  ===============  =================================================
``k1``  ``Σ_t l_t``                        yes              score function: ``sg(RLOO(f))·log π(y)``
``k2``  ``½ (Σ_t l_t)²``                   no (≈ for π≈π_ref) pathwise: ``f`` (``∇f = (Σ_t l_t)·∇log π(y)``)
``k3``  ``Σ_t (e^{−l_t} − 1 + l_t)``       yes              both: ``sg(RLOO(f))·log π(y) + f``
======  =================================  ===============  =================================================

Why: for any f with ``E_π[f] = KL`` at every θ, ``∇KL = E[∇log π·f] + E[∇f]`` (score function plus
pathwise part). For k1 the pathwise part ``E[∇Σ_t log π_t] = 0``, so only the score-function ("KL as a
reward") term is kept; differentiating k1 alone would give an expected gradient of zero. k3's per-token
sum is unbiased for the sequence KL (``E[e^{−l_t} − 1 | y_<t] = 0``), so both parts are needed;
differentiating k3 alone gives ∇KL(π_ref ‖ π), the *forward* KL. k2 is applied to the *sequence*
log-ratio: its pathwise gradient is exactly the score-function form of ∇KL, whereas the per-token sum
``Σ_t ½ l_t²`` would drop the cross terms ``∇log π_t · l_s`` (s > t) and be biased. The KL's score term
uses the same leave-one-out baseline as the judge term (it only lowers variance).
In the exact-oracle testbed pass the closed-form, differentiable KL as ``exact_kl`` instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpref.metrics.win_rate import H_FUNCTIONS, h_transform

Array = jax.Array

KL_ESTIMATORS = ("k1", "k2", "k3")
COMPETITORS = ("reference", "self_play", "dataset")

__all__ = ["COMPETITORS", "H_FUNCTIONS", "KL_ESTIMATORS", "judge_values", "kl_estimate", "rloo_advantages",
           "wro_loss"]


@functools.partial(jax.jit, static_argnames=("h",))
def judge_values(p: Array, h: str = "identity") -> Array:
    """h-transformed preference of each policy sample, averaged over its prompt's competitor samples.

    Args:
      p: ``[B, K, C]`` P(policy sample k ≻ competitor sample c | prompt b), in [0, 1].
      h: ``identity``, ``logit`` or ``log`` (:func:`jaxpref.metrics.win_rate.h_transform`; p clipped to
        [1e-3, 1 − 1e-3] for the last two).

    Returns:
      ``[B, K]`` float32 ``v_bk = mean_c h(p_bkc)``: an unbiased estimate of ``E_{y'~π_c} h(p(y_bk ≻ y'))``,
      whose mean over k and b estimates WR_h(π; π_c).
    """
    if p.ndim != 3:
        raise ValueError(f"judge_values: expected p [B, K, C], got shape {p.shape}")
    return h_transform(p, h).mean(axis=-1)


def _loo_mean(values: Array) -> Array:
    k = values.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt (the baseline of each sample is the mean of "
                         f"the others), got K={k}; set wro.samples_per_prompt >= 2")
    return (values.sum(-1, keepdims=True) - values) / (k - 1)


@jax.jit
def rloo_advantages(values: Array) -> Array:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024 eq. 6).

    Args:
      values: ``[B, K]`` per-sample values (judge values, or a KL estimate), K >= 2.

    Returns:
      ``[B, K]`` ``A_bk = v_bk − mean_{j≠k} v_bj``. Each row sums to zero.

    Raises:
      ValueError: K < 2.
    """
    values = jnp.asarray(values, jnp.float32)
    return values - _loo_mean(values)


@functools.partial(jax.jit, static_argnames=("kind",))
def kl_estimate(policy_token_logps: Array, ref_token_logps: Array, mask: Array, kind: str = "k1") -> Array:
    """Per-sequence KL(π ‖ π_ref) estimates from per-token log-probs of a sample y ~ π (module table).

    Args:
      policy_token_logps: ``[..., T]`` log π(y_t | x, y_<t) (differentiable; zeros off the mask).
      ref_token_logps: ``[..., T]`` log π_ref(y_t | x, y_<t).
      mask: ``[..., T]`` 1 on response tokens (EOS included), 0 on prompt and padding.
      kind: ``k1`` (``Σ_t l_t``), ``k2`` (``½(Σ_t l_t)²``) or ``k3`` (``Σ_t e^{−l_t} − 1 + l_t``), with
        ``l_t = log π − log π_ref`` per token.

    Returns:
      ``[...]`` float32 estimates (one per sequence).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
    m = jnp.asarray(mask).astype(jnp.float32)
    lr = (policy_token_logps.astype(jnp.float32) - ref_token_logps.astype(jnp.float32)) * m
    if kind == "k1":
        return lr.sum(-1)
    if kind == "k2":
        return 0.5 * jnp.square(lr.sum(-1))
    return (m * (jnp.exp(-lr) - 1.0 + lr)).sum(-1)


@functools.partial(jax.jit, static_argnames=("kl_estimator",))
def wro_loss(policy_seq_logps: Array, advantages: Array, kl_terms: Array | None = None, *, beta: float | Array = 0.0,
             mask: Array | None = None, kl_estimator: str = "k1", exact_kl: Array | None = None
             ) -> tuple[Array, dict[str, Array]]:
    """REINFORCE surrogate whose gradient is an unbiased estimate of ``−∇(WR_h − β·KL)`` (module docstring).

    ``loss = −mean(sg(A)·log π(y)) + β·KL-surrogate`` where the KL surrogate is chosen by ``kl_estimator``
    (module table), or is ``exact_kl`` itself when given (a differentiable closed form, e.g. the testbed's).

    Args:
      policy_seq_logps: ``[B, K]`` summed response log-probs log π(y_bk | x_b) (differentiable).
      advantages: ``[B, K]`` judge advantages (:func:`rloo_advantages` of :func:`judge_values`); treated as
        constants.
      kl_terms: ``[B, K]`` per-sequence KL estimates from :func:`kl_estimate` with the same ``kl_estimator``
        (differentiable), or None together with ``exact_kl=None`` for no KL term (``beta`` unused).
      beta: KL coefficient β >= 0.
      mask: ``[B, K]`` valid samples (a padding prompt masks all its K samples); None = all.
      kl_estimator: ``k1``, ``k2`` or ``k3``: how ``kl_terms`` enter the surrogate.
      exact_kl: scalar exact KL(π ‖ π_ref) (differentiable), used instead of ``kl_terms``.

    Returns:
      ``(loss, aux)``: the scalar surrogate (its value is not the objective; only its gradient is meaningful)
      and ``aux`` with ``pg_loss`` (the judge term), ``kl`` (mean KL value estimate, or ``exact_kl``),
      ``kl_surrogate``, ``advantage_mean`` and ``advantage_std`` (over valid samples).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if policy_seq_logps.ndim != 2 or advantages.shape != policy_seq_logps.shape:
        raise ValueError(f"expected policy_seq_logps and advantages of one shape [B, K], got "
                         f"{policy_seq_logps.shape} and {advantages.shape}")
    logps = policy_seq_logps.astype(jnp.float32)
    m = jnp.ones(logps.shape, jnp.float32) if mask is None else jnp.broadcast_to(mask, logps.shape).astype(
        jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = lambda x: jnp.sum(x * m) / n
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    pg_loss = -mean(adv * logps)
    if exact_kl is not None:
        kl_value, kl_surrogate = jax.lax.stop_gradient(exact_kl), exact_kl
    elif kl_terms is not None:
        f = kl_terms.astype(jnp.float32)
        kl_value = mean(jax.lax.stop_gradient(f))
        score = mean(jax.lax.stop_gradient(rloo_advantages(f)) * logps)
        pathwise = mean(f)
        kl_surrogate = {"k1": score, "k2": pathwise, "k3": score + pathwise}[kl_estimator]
    else:
        kl_value = kl_surrogate = jnp.zeros((), jnp.float32)
    loss = pg_loss + beta * kl_surrogate
    adv_mean = mean(adv)
    aux = {"pg_loss": pg_loss, "kl": kl_value, "kl_surrogate": jax.lax.stop_gradient(kl_surrogate),
           "advantage_mean": adv_mean, "advantage_std": jnp.sqrt(mean(jnp.square(adv - adv_mean)))}
    return loss, aux
