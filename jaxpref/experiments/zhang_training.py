"""Training arms and gradient-noise measurement of the Zhang & Ranganath 2025 (WRO) experiment.

Zhang & Ranganath 2025 (win-rate optimisation, a reconstruction; the experiment, its setting and the W1–W3
checks are in :mod:`jaxpref.experiments.zhang`). This module holds what that experiment trains and measures:

* the records both arms share: :class:`WroConfig` (one WRO arm), :func:`adam` (the optimiser of both arms)
  and :class:`Setting` (one seed's testbed world);
* **WRO training**: the on-policy REINFORCE surrogate of one step (:func:`wro_surrogate`) and Adam on it for
  every seed at once (:func:`train_wro`, compiled once per ``(logps_fn, cfg)``);
* **DPO training**: fresh pairs from π_ref (:func:`dpo_pairs`) and DPO (registry ``sigmoid``) trained with
  :func:`jaxpref.experiments.testbed_training.train` (:func:`train_dpo`);
* **W3 gradient noise**: stochastic gradient estimates of both methods against their exact gradients
  (:func:`gradient_noise`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpref import losses
from jaxpref.config import OptimConfig
from jaxpref.data import synthetic
from jaxpref.experiments import testbed_training as tt
from jaxpref.losses import wro
from jaxpref.training.optim import make_optimizer

Array = jax.Array

__all__ = ["WroConfig", "adam", "Setting", "wro_surrogate", "train_wro", "dpo_pairs", "train_dpo", "gradient_noise"]


# ------------------------------------------------------------------------------------ configuration and setting


@dataclasses.dataclass(frozen=True)
class WroConfig:
    """One WRO arm (hashable: part of the jit cache key).

    Attributes:
      steps, record_every: optimiser steps and the spacing of exact records (step 0 included).
      samples_per_prompt: S >= 2 policy samples per prompt (RLOO).
      competitor_samples: C competitor samples per prompt, shared by the prompt's S samples.
      competitor: ``reference`` (π_ref) or ``self_play`` (the current policy, stop-gradient).
      h: ``identity`` or ``logit`` (:func:`jaxpref.metrics.win_rate.h_transform`).
      beta: KL coefficient β (exact KL).
      learning_rate: Adam learning rate.
    """

    steps: int
    record_every: int
    samples_per_prompt: int
    competitor_samples: int
    competitor: str
    h: str
    beta: float
    learning_rate: float

    @property
    def num_records(self) -> int:
        return self.steps // self.record_every + 1


def adam(learning_rate: float) -> OptimConfig:
    """The optimiser of both arms: Adam, constant learning rate, no clipping."""
    return OptimConfig(name="adam", lr=float(learning_rate), clip_norm=None)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One seed's testbed world: preference, reference and initial parameters of both policy classes.

    Attributes:
      pref: [K, N, N] true ``p(y_i ≻ y_j | x_k)``.
      reward: [K, N] the BT reward (the transitive part for ``intransitive``).
      ref_logps: [K, N] π_ref = the initial LM's exact policy.
      lm_params: the LM's ``nnx.Param`` state (π_ref's parameters).
      table_params: [K, N] tabular logits whose policy is π_ref.
    """

    pref: Array
    reward: np.ndarray
    ref_logps: Array
    lm_params: Any
    table_params: Array


# ------------------------------------------------------------------------------------ WRO training


def wro_surrogate(logps_fn: Callable[[Any], Array], cfg: WroConfig, params, ref_logps: Array, pref: Array,
                  key: Array) -> tuple[Array, Array]:
    """``(surrogate loss, objective estimate)`` of one on-policy WRO step (:mod:`jaxpref.experiments.zhang`).

    Args:
      logps_fn: ``params -> [K, N]`` exact log π_θ.
      ref_logps: [K, N] log π_ref; pref: [K, N, N] the oracle; key: PRNG key of the samples.

    Returns:
      the REINFORCE surrogate (its gradient estimates ``−∇J``) and the sample estimate of ``J`` the run
      would log: ``mean h(p̂) − β·KL`` (judge values against the sampled competitors, exact KL).
    """
    lp = logps_fn(params)  # [K, N]
    k = lp.shape[0]
    k_policy, k_competitor = jax.random.split(key)
    frozen = jax.lax.stop_gradient(lp)
    samples = jax.random.categorical(k_policy, frozen[:, None, :], shape=(k, cfg.samples_per_prompt))  # [K, S]
    competitor_logps = ref_logps if cfg.competitor == "reference" else frozen
    rivals = jax.random.categorical(k_competitor, competitor_logps[:, None, :], shape=(k, cfg.competitor_samples))
    p_win = pref[jnp.arange(k)[:, None, None], samples[:, :, None], rivals[:, None, :]]  # [K, S, C]
    values = wro.judge_values(p_win, h=cfg.h)  # [K, S]
    advantages = wro.rloo_advantages(values)
    exact_kl = synthetic.mean_kl(lp, ref_logps)
    loss, aux = wro.wro_loss(jnp.take_along_axis(lp, samples, axis=1), advantages, beta=cfg.beta,
                             exact_kl=exact_kl)
    return loss, jnp.mean(values) - cfg.beta * aux["kl"]


def _train_wro_impl(logps_fn, cfg: WroConfig, params, ref_logps, pref, key):
    opt, _ = make_optimizer(adam(cfg.learning_rate), cfg.steps)
    keys = jax.random.split(key, cfg.steps).reshape(cfg.num_records - 1, cfg.record_every)
    grad_fn = jax.value_and_grad(functools.partial(wro_surrogate, logps_fn, cfg), has_aux=True)

    def step(carry, step_key):
        p, s = carry
        (_, objective), g = grad_fn(p, ref_logps, pref, step_key)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), objective

    def chunk(carry, chunk_keys):
        carry, objectives = jax.lax.scan(step, carry, chunk_keys)
        return carry, (logps_fn(carry[0]), jnp.mean(objectives))

    (final, _), (logps, objectives) = jax.lax.scan(chunk, (params, opt.init(params)), keys)
    logps = jnp.concatenate([logps_fn(params)[None], logps])
    return logps, jnp.concatenate([jnp.full((1,), jnp.nan), objectives]), final


@functools.lru_cache(maxsize=32)
def _compiled_wro(logps_fn, cfg: WroConfig):
    return jax.jit(jax.vmap(functools.partial(_train_wro_impl, logps_fn, cfg)))


def train_wro(logps_fn, cfg: WroConfig, params, ref_logps, pref, keys):
    """Trains S seeds at once (every argument but ``logps_fn``/``cfg`` has a leading seed axis).

    Returns:
      ``(logps [S, R, K, N], objective [S, R], final params)``: the exact policy at each record and the mean
      sampled objective estimate over the steps leading to it (NaN at step 0).
    """
    return _compiled_wro(logps_fn, cfg)(params, ref_logps, pref, keys)


# ------------------------------------------------------------------------------------ DPO training


def dpo_pairs(testbed, settings: list[Setting], n_pairs: int, seed_offset: int, seeds) -> tt.PairData:
    """[S, M] stacked :class:`PairData`: ``n_pairs`` fresh pairs from π_ref per seed, one oracle vote each."""
    data = [tt.PairData.from_pairs(synthetic.sample_pairs(testbed, s.pref, s.ref_logps, n_pairs=n_pairs,
                                                          seed=seed_offset + seed))
            for s, seed in zip(settings, seeds)]
    return tt.stack_trees(data)


def train_dpo(policy: tt.ExactPolicy, beta: float, config: tt.TrainConfig, params, ref_logps, data, keys):
    """DPO (registry ``sigmoid``) on every seed at once (leading seed axes): ``(logps [S, R, K, N], loss [S, R])``."""
    traj = tt.train(policy, {"name": "sigmoid", "beta": beta}, config, params, ref_logps, data, keys,
                    vmap=[("params", "ref_logps", "data", "key")])
    return traj.logps, traj.loss


def _dpo_batch_loss(policy: tt.ExactPolicy, comp: losses.Composition, params, ref_logps, data: tt.PairData) -> Array:
    """[] DPO minibatch loss of ``data`` (the loss :func:`jaxpref.experiments.testbed_training.train` steps on)."""
    responses = jnp.stack([data.chosen, data.rejected], axis=1)  # [B, 2]
    lp = policy.sequence_logps_fn(params, policy.tables, data.prompt, responses)
    ref = ref_logps[data.prompt[:, None], responses]
    count = jnp.full(data.prompt.shape, float(policy.response_length), jnp.float32)
    inputs = losses.LossInputs(policy_chosen_logps=lp[:, 0], policy_rejected_logps=lp[:, 1],
                               reference_chosen_logps=ref[:, 0], reference_rejected_logps=ref[:, 1],
                               chosen_tokens=count, rejected_tokens=count, votes=data.alpha)
    return comp(inputs)[0]


# ------------------------------------------------------------------------------------ W3: gradient noise


def _flat(tree) -> Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _noise_stats(draws: Array, exact: Array, win_rate_grad: Array) -> dict[str, Array]:
    """Statistics of G stochastic *descent* directions ``draws [G, D]`` against their expectation ``exact [D]``."""
    noise = jnp.mean(jnp.sum(jnp.square(draws - exact), axis=-1))
    cos = lambda a, b: jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-30)
    return {"snr": jnp.sum(jnp.square(exact)) / noise,
            "relative_bias": jnp.linalg.norm(draws.mean(0) - exact) / jnp.linalg.norm(exact),
            "cos_win_rate": jnp.mean(cos(draws, win_rate_grad)),
            "exact_cos_win_rate": cos(exact, win_rate_grad)}


@functools.partial(jax.jit, static_argnames=("logps_fn", "policy", "cfg"))
def gradient_noise(logps_fn, policy: tt.ExactPolicy, cfg: WroConfig, params, ref_logps, pref, keys: Array,
                   dpo_data: tt.PairData) -> dict[str, Array]:
    """W3 at fixed ``params``: G independent gradient estimates of each method against its exact gradient.

    WRO: G surrogate gradients (fresh samples per ``keys [G]``) against ``∇J`` of the exact population
    objective (``WR_h(π_θ; π_ref) − β·KL``). DPO: G minibatch gradients (``dpo_data``: [G, B] pairs) against
    the gradient of the population DPO loss with pairs from π_ref. For both, as ascent directions:
    ``snr = ‖∇‖² / E‖ĝ − ∇‖²`` (signal-to-noise of one step's estimate; its inverse is the relative
    variance), ``relative_bias = ‖mean ĝ − ∇‖ / ‖∇‖`` (≈ ``1/sqrt(G·snr)`` for an unbiased estimator),
    ``cos_win_rate`` (mean cosine of one estimate with the exact win-rate gradient ``∇WR(π_θ; π_ref)``) and
    ``exact_cos_win_rate`` (the same for the exact objective gradient).

    Returns:
      ``{"wro/<stat>": [], "dpo/<stat>": []}``.
    """
    win_rate_grad = _flat(jax.grad(lambda p: synthetic.win_rate(logps_fn(p), ref_logps, pref))(params))

    def objective(p):
        lp = logps_fn(p)
        return synthetic.win_rate(lp, ref_logps, pref, h=cfg.h) - cfg.beta * synthetic.mean_kl(lp, ref_logps)

    wro_exact = _flat(jax.grad(objective)(params))
    surrogate = lambda key: -_flat(jax.grad(lambda p: wro_surrogate(logps_fn, cfg, p, ref_logps, pref, key)[0])(
        params))
    wro_draws = jax.lax.map(surrogate, keys)

    comp = losses.compose({"name": "sigmoid", "beta": cfg.beta})
    weights = synthetic.population_pair_weights(ref_logps)
    population = lambda p: synthetic.population_loss(logps_fn(p), ref_logps, pref, weights, beta=cfg.beta)
    dpo_exact = -_flat(jax.grad(population)(params))
    minibatch = lambda data: -_flat(jax.grad(lambda p: _dpo_batch_loss(policy, comp, p, ref_logps, data))(params))
    dpo_draws = jax.lax.map(minibatch, dpo_data)
    out = {f"wro/{k}": v for k, v in _noise_stats(wro_draws, wro_exact, win_rate_grad).items()}
    out.update({f"dpo/{k}": v for k, v in _noise_stats(dpo_draws, dpo_exact, win_rate_grad).items()})
    return out
