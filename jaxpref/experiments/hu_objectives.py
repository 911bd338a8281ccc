"""Exact population objectives and their minimisers for the Hu, He & Wipf 2024 (TYPO) experiment.

Hu, He & Wipf 2024 (TYPO, a reconstruction; the experiment and its setting are in
:mod:`jaxpref.experiments.hu`). This module holds the numerical core that experiment runs on:

* **exact objectives**: one prompt's share of a population objective of a registered loss (``typo``,
  ``typo_regression`` or ``sigmoid``, i.e. DPO) over all N² labelled pairs (:func:`prompt_objective`,
  :func:`population_objective`), and its exact gradient and Hessian in the softmax logits
  (:func:`prompt_grad_hessian`);
* **minimisers**: damped saddle-free Newton over free tables in float64 (:func:`solve_tabular`), Adam on a
  real LM's parameters (:func:`train_lm`) and DPO's closed-form minimiser along a β path (:func:`dpo_path`).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.special import log_softmax

from jaxpref import losses

Array = jax.Array
STEP_SIZES = 2.0 ** -np.arange(0, 8, 2)  # Newton step sizes t (the best decrease is taken)
DAMPING = np.array([0.0, 1e-4, 1e-2, 1.0])  # damping μ relative to the largest curvature

__all__ = ["check_values", "prompt_objective", "population_objective", "prompt_grad_hessian", "solve_tabular",
           "train_lm", "dpo_path"]


# ------------------------------------------------------------------------------------ exact objectives


def _with_traced(hp, **fields):
    """A copy of a frozen hparams record with ``fields`` set to (traced) scalars, skipping validation."""
    new = copy.copy(hp)
    for name, value in fields.items():
        object.__setattr__(new, name, value)
    return new


def check_values(loss: str, values, scales=None) -> None:
    """Validates every grid value with the loss's own hparams (λ for TYPO, β for ``sigmoid``)."""
    term = losses.get(loss)
    for i, v in enumerate(np.asarray(values, np.float64)):
        if loss == "sigmoid":
            term.make_hparams(beta=float(v))
        else:
            term.make_hparams(lam=float(v), scale=float(1.0 if scales is None else scales[i]))


def _pair_losses(loss: str, chosen, rejected, sample, ref, value, scale) -> Array:
    """[N, N] the registered loss of every ordered pair "y_i ≻ y_j" (one ``[N²]`` batch, hard labels).

    ``chosen [N, N]``, ``rejected [N, N]``: the policy log-probs of y_i and y_j; ``sample [N, N]``: TYPO's
    ``reference_sample_logps`` (ignored by ``sigmoid``). Hyperparameters as :func:`prompt_objective`.
    """
    n = ref.shape[-1]
    term = losses.get(loss)
    if loss == "sigmoid":
        hp, sample = _with_traced(term.make_hparams(), beta=value), None
    else:
        hp, sample = _with_traced(term.make_hparams(lam=1.0), scale=scale), sample.reshape(-1)
    inputs = losses.LossInputs(
        policy_chosen_logps=chosen.reshape(-1), policy_rejected_logps=rejected.reshape(-1),
        reference_chosen_logps=jnp.broadcast_to(ref[:, None], (n, n)).reshape(-1),
        reference_rejected_logps=jnp.broadcast_to(ref[None, :], (n, n)).reshape(-1),
        votes=jnp.ones((n * n,), chosen.dtype), reference_sample_logps=sample)
    return term(inputs, hp).loss.reshape(n, n)


def _sample_coefficient(loss: str, value, ref) -> Array:
    """[N] c with ``reference_sample_logps = c · log πθ``: ``λ·π_ref`` for TYPO, 0 for ``sigmoid``."""
    return jnp.zeros_like(ref) if loss == "sigmoid" else value * jnp.exp(ref)


def prompt_objective(loss: str, logp, ref, weights, value, scale=1.0) -> Array:
    """[] one prompt's share of a population objective: ``Σ_ij W_ij · ℓ(y_i ≻ y_j)`` of a registered loss.

    Args:
      loss: ``"typo"``, ``"typo_regression"`` (value = λ, ``scale`` = s) or ``"sigmoid"`` (DPO, value = β).
      logp: [N] log πθ(·|x).
      ref: [N] log π_ref(·|x).
      weights: [N, N] labelled pair weights of this prompt (:func:`jaxpref.experiments.hu.labelled_pair_weights`).

    All N² ordered pairs form one ``[B]`` batch (hard labels, ``votes = 1``); the loss's per-pair values are
    summed with the weights (every loss here is a pair mean, ``denom = 1``). For TYPO the reference sample
    term is exact: ``reference_sample_logps = λ·Σ_y π_ref(y) log πθ(y)`` with the loss's ``lam = 1``.
    """
    n = logp.shape[-1]
    sample = jnp.full((n, n), _sample_coefficient(loss, value, ref) @ logp)
    chosen, rejected = jnp.broadcast_to(logp[:, None], (n, n)), jnp.broadcast_to(logp[None, :], (n, n))
    return jnp.sum(weights * _pair_losses(loss, chosen, rejected, sample, ref, value, scale))


def population_objective(loss: str, logps, ref_logps, weights, value, scale=1.0) -> Array:
    """[] the population objective over all prompts: ``Σ_k`` :func:`prompt_objective` (``[K, N]`` inputs)."""
    per_prompt = jax.vmap(prompt_objective, in_axes=(None, 0, 0, 0, None, None))
    return jnp.sum(per_prompt(loss, logps, ref_logps, weights, value, scale))


def prompt_grad_hessian(loss: str, theta, ref, weights, value, scale=1.0) -> tuple[Array, Array]:
    """``(∇f [N], ∇²f [N, N])`` of ``f(θ) = prompt_objective(log_softmax(θ))``, in O(N²) loss evaluations.

    Every pair's loss depends on (log π(y_i), log π(y_j), reference sample input) only, so the nine second
    derivatives of every pair come from three Hessian-vector products of the pairwise sum with all-ones
    tangents (pairs do not interact), instead of N products for ``jax.hessian``. They are assembled into
    the Hessian in log π and carried to θ through ``log π = θ − logsumexp(θ)``:
    ``∇²_θ f = Jᵀ ∇²_ℓ f J − (Σ_y ∂f/∂ℓ_y)(diag π − ππᵀ)`` with ``J = I − 1πᵀ``. Equal to ``jax.hessian``
    (``tests/test_repro_hu.py``).
    """
    n = theta.shape[-1]
    logp = jax.nn.log_softmax(theta)
    coef = _sample_coefficient(loss, value, ref)
    point = (jnp.broadcast_to(logp[:, None], (n, n)), jnp.broadcast_to(logp[None, :], (n, n)),
             jnp.full((n, n), coef @ logp))

    def pair_sum(args):
        return jnp.sum(weights * _pair_losses(loss, *args, ref, value, scale))

    grad_fn = jax.grad(pair_sum)
    ga, gb, gc = grad_fn(point)
    ones, zeros = jnp.ones((n, n), theta.dtype), jnp.zeros((n, n), theta.dtype)
    (haa, hab, hac), (_, hbb, hbc), (_, _, hcc) = (
        jax.jvp(grad_fn, (point,), (tangent,))[1]
        for tangent in ((ones, zeros, zeros), (zeros, ones, zeros), (zeros, zeros, ones)))
    g_logp = ga.sum(1) + gb.sum(0) + gc.sum() * coef
    cross = hac.sum(1) + hbc.sum(0)
    h_logp = (jnp.diag(haa.sum(1) + hbb.sum(0)) + hab + hab.T + jnp.outer(cross, coef) + jnp.outer(coef, cross)
              + hcc.sum() * jnp.outer(coef, coef))
    pi = jnp.exp(logp)
    jac = jnp.eye(n, dtype=theta.dtype) - pi[None, :]  # ∂ log π_i / ∂θ_k
    softmax_curv = jnp.diag(pi) - jnp.outer(pi, pi)
    return jac.T @ g_logp, jac.T @ h_logp @ jac - g_logp.sum() * softmax_curv


# ------------------------------------------------------------------------------------ minimisers


def _newton(f, grad_hessian, theta, iters: int):
    """Damped saddle-free Newton: per iteration the best of ``−t·(|H| + μI)⁺ g`` over grids of t and μ.

    ``|H|`` has the Hessian's eigenvalues in absolute value (saddle-free); μ runs from 0 (Newton, with the
    softmax shift direction and numerically zero curvatures dropped) to the largest curvature (a safe
    gradient step), so flat, saturated regions far from the optimum are crossed as well. A candidate is
    taken only if it does not raise ``f``.
    """
    steps = jnp.asarray(STEP_SIZES, theta.dtype)
    damping = jnp.asarray(DAMPING, theta.dtype)
    resolution = 100 * jnp.finfo(theta.dtype).eps

    def step(theta, _):
        g, h = grad_hessian(theta)
        ev, q = jnp.linalg.eigh(h)
        curv = jnp.abs(ev)
        top = jnp.max(curv)
        keep = curv > resolution * top  # drops the softmax shift direction
        mu = damping[:, None] * top  # [D, 1]
        inv = jnp.where(keep, 1.0 / jnp.where(keep, curv, 1.0), 0.0)
        inv = jnp.where(mu > 0, 1.0 / (curv + mu), inv[None])  # [D, N]
        directions = -(inv * (q.T @ g)[None]) @ q.T  # [D, N]
        candidates = (theta[None, None] + steps[:, None, None] * directions[None]).reshape(-1, theta.shape[-1])
        values = jax.vmap(f)(candidates)
        best = jnp.argmin(values)
        # <=: at the optimum f stops resolving progress, while the Newton step (index 0) still converges
        return jnp.where(values[best] <= f(theta), candidates[best], theta), None

    theta, _ = jax.lax.scan(step, theta, None, length=iters)
    return theta, jnp.max(jnp.abs(grad_hessian(theta)[0]))


@functools.partial(jax.jit, static_argnames=("loss", "iters"))
def solve_tabular(loss: str, ref_logps, weights, values, scales, init_logps, *, iters: int):
    """Exact minimisers of the population objective over free tables, for a grid of hyperparameters.

    Args:
      ref_logps: [S, K, N] π_ref per seed.
      weights: [S, K, N, N] labelled pair weights.
      values, scales: [G] λ (TYPO) or β (``sigmoid``), and TYPO's s (ignored by ``sigmoid``).
      init_logps: [S, K, N] the starting policy.

    Returns:
      ``(logps [G, S, K, N], grad_max [G, S, K])``: minimiser log-probs (Newton, each prompt separately)
      and the final largest gradient entry.
    """
    def one(ref, w, init, value, scale):
        def f(theta):
            return prompt_objective(loss, jax.nn.log_softmax(theta), ref, w, value, scale)

        def grad_hessian(theta):
            return prompt_grad_hessian(loss, theta, ref, w, value, scale)

        theta, grad_max = _newton(f, grad_hessian, init, iters)
        return jax.nn.log_softmax(theta), grad_max

    over_prompts = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    over_seeds = jax.vmap(over_prompts, in_axes=(0, 0, 0, None, None))
    return jax.vmap(over_seeds, in_axes=(None, None, None, 0, 0))(ref_logps, weights, init_logps, values, scales)


def train_lm(logps_fn, loss: str, params, ref_logps, weights, values, scales, *, steps: int,
             learning_rate: float):
    """Adam (cosine decay) on the exact population objective of a real LM, for a grid of hyperparameters.

    Args:
      logps_fn: ``f(params) -> [K, N]`` (:func:`~jaxpref.data.synthetic.make_response_logps_fn`).
      params: per-seed LM parameters with a leading [S] axis.
      ref_logps, weights, values, scales: as :func:`solve_tabular`.

    Returns:
      ``(logps [G, S, K, N], objective [G, S])`` at the end of training.
    """
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01)
    opt = optax.adam(schedule)

    def one(params, ref, w, value, scale):
        def f(p):
            return population_objective(loss, logps_fn(p), ref, w, value, scale)

        def step(carry, _):
            p, state = carry
            grads = jax.grad(f)(p)
            updates, state = opt.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return logps_fn(params), f(params)

    over_seeds = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    fn = jax.jit(jax.vmap(over_seeds, in_axes=(None, None, None, 0, 0)))
    return fn(params, ref_logps, weights, values, scales)


def dpo_path(ref_logps, bt_logps, reward, betas) -> dict[str, np.ndarray]:
    """DPO's closed-form minimiser ``π_ref·exp(r*/β)/Z`` along ``betas`` (float64): [B, K] KLs and entropy."""
    ref, bt = np.asarray(ref_logps, np.float64), np.asarray(bt_logps, np.float64)
    betas = np.asarray(betas, np.float64)
    path = log_softmax(ref[None] + np.asarray(reward, np.float64)[None] / betas[:, None, None], axis=-1)
    return {"kl_to_bt": _kl(path, bt[None]), "kl_from_ref": _kl(ref[None], path),
            "entropy": -np.sum(np.exp(path) * path, axis=-1)}


def _kl(p_logps, q_logps) -> np.ndarray:
    """KL(p ‖ q) per prompt over any leading axes, float64 NumPy (:func:`~jaxpref.data.synthetic.kl`'s formula)."""
    a, b = np.asarray(p_logps, np.float64), np.asarray(q_logps, np.float64)
    pa = np.exp(a)
    return np.sum(np.where(pa > 0, pa * (a - b), 0.0), axis=-1)
