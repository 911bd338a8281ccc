"""Win rate and h-win rate estimators (papers.md §4, papers-addendum.md "Win-rate optimisation").

A judge gives ``p_i = P(policy response ≻ competitor response | x_i)`` per prompt, either a probability
(a Bradley-Terry reward model: ``σ(r(y) − r(y'))``) or a hard verdict in {0, 0.5, 1}.

* **Win rate** ``WR = mean_i p_i``; with ``hard=True`` each ``p_i`` is first turned into a verdict
  (1 if ``p > 0.5 + tie_eps``, 0 if ``p < 0.5 − tie_eps``, else a tie).
* **Tie rule** (declared in every result): ``half`` (a tie counts 0.5, the usual convention),
  ``exclude`` (ties are dropped from numerator and denominator) or ``loss`` (a tie counts 0). A tie is
  ``|p − 0.5| ≤ tie_eps``.
* **h-win rate** ``WR_h = mean_i h(p_i)`` for non-decreasing ``h`` ∈ ``identity``, ``logit``
  (``log p/(1−p)``: RLHF's objective under a BT judge) or ``log``; p is clipped to ``[ε, 1 − ε]``
  (ε = 1e-3) before ``logit`` / ``log``. These are reconstructions (the paper's text was not available).
* **Position randomisation**: :func:`position_swaps` draws, per prompt, whether the policy's response is
  shown second; :func:`unswap` turns the judge's ``P(first ≻ second)`` back into ``P(policy ≻ competitor)``.
* **Bootstrap CI** (:func:`bootstrap_ci`): percentile interval of the mean over resampled prompts (NumPy,
  seeded).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.metrics.ranking import Tally, tally

TIE_RULES = ("half", "exclude", "loss")
H_FUNCTIONS = ("identity", "logit", "log")
P_EPS = 1e-3


@functools.partial(jax.jit, static_argnames=("tie_rule", "hard"))
def verdict_values(p: jax.Array, mask: jax.Array | None = None, *, tie_rule: str = "half", hard: bool = False,
                   tie_eps: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """``(values [N], keep [N])``: each judgement's contribution under the tie rule, and which count.

    Args:
      p: ``[N]`` P(policy ≻ competitor) in [0, 1].
      mask: ``[N]`` valid judgements (None = all).
      tie_rule: ``half``, ``exclude`` or ``loss``.
      hard: turn probabilities into 1 / 0 / tie verdicts first.
      tie_eps: ``|p − 0.5| ≤ tie_eps`` is a tie.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    p = jnp.asarray(p, jnp.float32)
    keep = jnp.ones(p.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    tie = jnp.abs(p - 0.5) <= tie_eps
    values = jnp.where(p > 0.5, 1.0, 0.0) if hard else p
    tie_value = {"half": 0.5, "exclude": 0.5, "loss": 0.0}[tie_rule]
    values = jnp.where(tie, tie_value, values)
    if tie_rule == "exclude":
        keep = keep & ~tie
    return values, keep


@functools.partial(jax.jit, static_argnames=("h",))
def h_transform(p: jax.Array, h: str = "identity", eps: float = P_EPS) -> jax.Array:
    """``h(p)`` for the h-win rate: identity, logit or log (p clipped to [ε, 1 − ε] for the last two)."""
    p = jnp.asarray(p, jnp.float32)
    if h == "identity":
        return p
    c = jnp.clip(p, eps, 1.0 - eps)
    if h == "logit":
        return jnp.log(c) - jnp.log1p(-c)
    if h == "log":
        return jnp.log(c)
    raise ValueError(f"h must be one of {H_FUNCTIONS}, got {h!r}")


@functools.partial(jax.jit, static_argnames=("tie_rule", "hard", "h"))
def win_rate(p: jax.Array, mask: jax.Array | None = None, *, tie_rule: str = "half", hard: bool = False,
             h: str = "identity", tie_eps: float = 0.0) -> Tally:
    """Tally of ``h(value)`` over counted judgements (its mean is the (h-)win rate; module docstring)."""
    values, keep = verdict_values(p, mask, tie_rule=tie_rule, hard=hard, tie_eps=tie_eps)
    return tally(h_transform(values, h), keep)


def position_swaps(n: int, seed: int = 0) -> np.ndarray:
    """``[n]`` bool, True where the policy's response is shown second (fair coin per prompt, seeded)."""
    return np.random.default_rng(seed).random(n) < 0.5


def order_pair(policy: list, competitor: list, swaps: np.ndarray) -> tuple[list, list]:
    """``(first, second)`` lists as shown to the judge: competitor first where ``swaps`` is True."""
    first = [c if s else p for p, c, s in zip(policy, competitor, swaps, strict=True)]
    second = [p if s else c for p, c, s in zip(policy, competitor, swaps, strict=True)]
    return first, second


def unswap(p_first: np.ndarray, swaps: np.ndarray) -> np.ndarray:
    """P(policy ≻ competitor) from the judge's P(first ≻ second)."""
    p_first = np.asarray(p_first, np.float64)
    return np.where(np.asarray(swaps), 1.0 - p_first, p_first)


def bootstrap_ci(values: np.ndarray, keep: np.ndarray | None = None, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the kept ``values`` (resampling prompts, seeded).

    Returns ``(nan, nan)`` when nothing is kept.
    """
    v = np.asarray(values, np.float64)
    if keep is not None:
        v = v[np.asarray(keep, bool)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
