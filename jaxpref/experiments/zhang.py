"""Zhang & Ranganath 2025 on the exact-oracle testbed: win-rate optimisation (WRO) against DPO (W1–W3).

**A reconstruction** (papers.md §4: the paper's full text was not available). ``papers-addendum.md``
("Win-rate optimisation") fixes the objective ``J(θ) = WR_h(πθ; π_c) − β·KL(πθ ‖ π_ref)`` and the three
properties checked here:

* **W1 win-rate consistency**: with the exact oracle and a small β, WRO ends at a higher exact win rate
  against π_ref than DPO trained on pairs from the same preference function.
* **W2**: over training, the WRO objective tracks the exact win rate (Spearman rank correlation across
  the recorded steps of a run); DPO's loss tracks it worse. Judged on the values a run logs (WRO: the
  sampled objective; DPO: the minibatch loss); the exact population objectives are reported beside them.
* **W3 optimisation difficulty** (the paper's empirical claim: WRO underperforms *because* it is hard to
  optimise): gradient-estimate noise and final win rate per sample budget, WRO against DPO.

Setting (:mod:`jaxpref.data.synthetic`, design.md §4): K prompts, all ``N = A**L`` responses, a true
preference ``p(y ≻ y'|x)`` that is Bradley–Terry (``bt``) or BT plus a rock-paper-scissors term
(``intransitive``). π_ref is the initial policy: a random tiny jaxpref Llama (``lm``, exact log-probs from
:func:`jaxpref.data.synthetic.make_response_logps_fn`) or a free table initialised to the same π_ref
(``tabular``). Every seed draws its own reward, classes and LM initialisation.

Arms, each ``steps`` Adam steps:

* **WRO** (on-policy): each step draws S = ``samples_per_prompt`` responses per prompt from the *exact*
  current distribution ``π_θ(·|x)`` (a categorical over the N enumerated responses: the same law as
  token-by-token autoregressive sampling, since ``π(y|x) = Π_t π(y_t|x, y_<t)``) and C =
  ``competitor_samples`` competitor responses (π_ref, or the current policy under stop-gradient for
  ``self_play``), asks the exact oracle for all S·C preferences, and steps on the REINFORCE surrogate of
  :func:`jaxpref.losses.wro.wro_loss` (RLOO advantages of ``h(p)``, h = identity or logit) plus β times the
  exact, differentiable ``KL(π_θ ‖ π_ref)``.
* **DPO** (registry ``sigmoid``, same β): fresh pairs drawn from π_ref each step, labelled by one draw from
  the same oracle, trained with :func:`jaxpref.experiments.testbed_training.train`.

Budget: judge queries. WRO asks K·S·C per step; DPO gets a batch of K·S·C labelled pairs per step (a
fresh dataset of ``steps·K·S·C`` pairs, seen once). W3 varies S. Exact context (:func:`optimum_win_rates`):
the best win rate any policy reaches, ``E_x max_y E_{y'~π_ref} p(y ≻ y')``, and the win rate of each
population objective's optimum per β: WRO's is ``π_ref·exp(E_{π_ref} h(p(y ≻ ·))/β)``, DPO's is
``π_ref·exp(r̂/β)`` with r̂ the BT fit to the pair distribution (:func:`fit_bt_reward`). With pairs from
π_ref, r̂ orders responses exactly by their win rate against π_ref (the fit matches, for every y,
``Σ_y' π_ref(y') p(y ≻ y')`` to its BT prediction, which is increasing in r̂(y)), so DPO's optimum is win-rate
consistent as β → 0 even for an intransitive oracle; with pairs from another distribution (``uniform``) it
is not. W1 with trained policies is therefore about reaching the optimum, not about where it lies.

The training arms and the W3 gradient-noise measurement live in :mod:`jaxpref.experiments.zhang_training`
(re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref.data import synthetic
from jaxpref.experiments import testbed_training as tt
from jaxpref.experiments.runner import params_from_dict, write_results
from jaxpref.experiments.zhang_training import (
    Setting,
    WroConfig,
    adam,
    dpo_pairs,
    gradient_noise,
    train_dpo,
    train_wro,
    wro_surrogate,
)
from jaxpref.losses import wro
from jaxpref.metrics.correlation import average_ranks, spearman

Array = jax.Array
PREFERENCES = ("bt", "intransitive")
POLICIES = ("lm", "tabular")
WRO_VARIANTS = {"wro": ("reference", "identity"), "wro_logit": ("reference", "logit"),
                "wro_self_play": ("self_play", "identity")}

CLAIM = ("Win-rate optimisation (WRO) is win-rate consistent and its objective tracks the win rate, unlike DPO "
         "(Zhang & Ranganath 2025; W1, W2), at the price of a harder optimisation (W3)")

__all__ = ["CLAIM", "ZhangParams", "WroConfig", "Setting", "make_setting", "max_win_rate", "wro_optimum",
           "fit_bt_reward", "optimum_win_rates", "wro_surrogate", "train_wro", "train_dpo", "gradient_noise", "run"]


# ------------------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class ZhangParams(tt.TestbedParams):
    """The experiment's ``params`` (YAML); every field has a default, unknown keys are errors. The testbed and
    tiny-Llama fields come from :class:`~jaxpref.experiments.testbed_training.TestbedParams`."""

    reward_kind: str = "positional"
    reward_scale: float = 1.0
    intransitive_strength: float = 2.0
    preferences: tuple[str, ...] = PREFERENCES
    policies: tuple[str, ...] = POLICIES
    wro_variants: tuple[str, ...] = tuple(WRO_VARIANTS)
    beta: float = 0.01
    steps: int = 240
    record_every: int = 12
    samples_per_prompt: int = 4
    competitor_samples: int = 4
    lm_learning_rate: float = 1e-3
    tabular_learning_rate: float = 0.1
    budgets: tuple[int, ...] = (2, 4, 8, 16)
    budget_policy: str = "tabular"
    budget_preference: str = "bt"
    gradient_draws: int = 64
    cell_gradient_noise: bool = True
    optimum_betas: tuple[float, ...] = (0.1, 0.01, 0.001)
    bt_fit_steps: int = 2000
    margin_sigmas: float = 2.0

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ZhangParams:
        return params_from_dict(cls, params, "zhang")

    def __post_init__(self):
        for name, allowed in (("preferences", PREFERENCES), ("policies", POLICIES),
                              ("wro_variants", tuple(WRO_VARIANTS))):
            values = getattr(self, name)
            if not values or set(values) - set(allowed):
                raise ValueError(f"zhang params: {name} must be a non-empty list from {list(allowed)}, "
                                 f"got {list(values)}")
        if "wro" not in self.wro_variants:
            raise ValueError("zhang params: wro_variants must include 'wro' (reference competitor, h = identity)")
        if self.budgets and (self.budget_policy not in self.policies or self.budget_preference not in self.preferences):
            raise ValueError(f"zhang params: budget_policy {self.budget_policy!r} / budget_preference "
                             f"{self.budget_preference!r} must be among policies {list(self.policies)} / "
                             f"preferences {list(self.preferences)}")
        if min(self.budgets, default=2) < 2 or self.samples_per_prompt < 2:
            raise ValueError(f"zhang params: RLOO needs >= 2 samples per prompt; got samples_per_prompt="
                             f"{self.samples_per_prompt}, budgets={list(self.budgets)}")
        if self.steps % self.record_every:
            raise ValueError(f"zhang params: steps={self.steps} must be a multiple of record_every="
                             f"{self.record_every}")
        if not self.beta > 0:
            raise ValueError(f"zhang params: beta must be > 0, got {self.beta}")

    def learning_rate(self, policy: str) -> float:
        return self.lm_learning_rate if policy == "lm" else self.tabular_learning_rate

    def queries_per_step(self, samples_per_prompt: int | None = None) -> int:
        """Judge queries (= DPO labelled pairs) per step: K prompts · S samples · C competitor samples."""
        s = self.samples_per_prompt if samples_per_prompt is None else samples_per_prompt
        return self.num_prompts * s * self.competitor_samples


# ------------------------------------------------------------------------------------ setting and optima


def make_testbed(p: ZhangParams) -> synthetic.Testbed:
    return p.make_testbed()


def make_model(p: ZhangParams, testbed: synthetic.Testbed, seed: int):
    return testbed.init_model(seed, **p.model_kw())


def make_setting(p: ZhangParams, testbed: synthetic.Testbed, preference: str, seed: int) -> Setting:
    """Seed ``seed``'s reward (``p.reward_kind``), preference and random-LM reference."""
    reward = synthetic.random_reward(testbed, scale=p.reward_scale, seed=seed, kind=p.reward_kind)
    if preference == "bt":
        pref = synthetic.bt_preference(reward)
    elif preference == "intransitive":
        pref = synthetic.intransitive_preference(testbed, strength=p.intransitive_strength, seed=seed, reward=reward)
    else:
        raise ValueError(f"preference must be one of {PREFERENCES}, got {preference!r}")
    model = make_model(p, testbed, seed)
    _, lm_params, _ = nnx.split(model, nnx.Param, ...)
    ref = synthetic.response_logps(model, testbed)
    return Setting(pref=pref, reward=reward, ref_logps=ref, lm_params=lm_params,
                   table_params=synthetic.TabularPolicy.for_testbed(testbed).init(ref))


@jax.jit
def max_win_rate(ref_logps: Array, pref: Array) -> Array:
    """[] ``E_x max_y Σ_{y'} π_ref(y'|x) p(y ≻ y'|x)``: the highest win rate against π_ref of any policy."""
    return jnp.mean(jnp.max(jnp.einsum("kj,kij->ki", jnp.exp(ref_logps), pref), axis=-1))


@functools.partial(jax.jit, static_argnames=("h",))
def wro_optimum(ref_logps: Array, pref: Array, beta, h: str = "identity") -> Array:
    """[K, N] the maximiser of ``WR_h(π; π_ref) − β·KL(π ‖ π_ref)``: ``log softmax(log π_ref + w_h/β)``.

    ``WR_h`` against a fixed competitor is linear in π with per-response value ``w_h(y) = E_{y'~π_ref}
    h(p(y ≻ y'))``, so the KL-regularised optimum is the Gibbs policy (as for RLHF, Rafailov et al. eq. 4).
    """
    w = jnp.einsum("kj,kij->ki", jnp.exp(ref_logps), wro.h_transform(pref, h))
    return jax.nn.log_softmax(ref_logps + w / beta, axis=-1)


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_bt_reward(sampler_logps: Array, pref: Array, steps: int = 2000) -> Array:
    """[K, N] ``r̂``: the Bradley–Terry fit that DPO's population optimum encodes, for pairs drawn from a sampler.

    DPO's population loss depends on the policy only through ``v = β·(log π − log π_ref)``, and ``v`` is free up
    to a constant per prompt, so its minimiser is ``v* = r̂ = argmin_v Σ w_ij p_ij softplus(−(v_i − v_j))`` (the
    BT maximum-likelihood reward under the pair weights ``w`` of ``sampler_logps``), whatever β and π_ref are;
    the optimum policy at any β is then ``dpo_optimum(log π_ref, r̂, β)``. Under a BT oracle ``r̂ = r*`` up to a
    constant. Found with ``steps`` Adam steps (cosine decay from 0.1) on
    :func:`jaxpref.data.synthetic.population_loss` (β = 1, reference 0).
    """
    weights = synthetic.population_pair_weights(sampler_logps)
    zeros = jnp.zeros_like(sampler_logps)
    loss = lambda v: synthetic.population_loss(v, zeros, pref, weights, beta=1.0)
    opt = optax.adam(optax.cosine_decay_schedule(0.1, steps, alpha=0.01))

    def step(carry, _):
        v, state = carry
        updates, state = opt.update(jax.grad(loss)(v), state)
        return (optax.apply_updates(v, updates), state), None

    (v, _), _ = jax.lax.scan(step, (zeros, opt.init(zeros)), None, length=steps)
    return v - v.mean(-1, keepdims=True)


def optimum_win_rates(p: ZhangParams, settings: list[Setting]) -> dict[str, Any]:
    """W1 at the optima (exact): win rate vs π_ref of each population objective's optimum per β in ``p.optimum_betas``.

    ``wro`` / ``wro_logit``: :func:`wro_optimum`; ``dpo``: DPO's optimum with pairs from π_ref (the training
    data here); ``dpo_uniform_pairs``: with pairs drawn uniformly (a data distribution other than the
    competitor's). Win-rate consistency = reaching ``max_win_rate`` as β → 0.
    """
    ref, pref = _stack(s.ref_logps for s in settings), _stack(s.pref for s in settings)
    fit = jax.vmap(functools.partial(fit_bt_reward, steps=p.bt_fit_steps))
    rewards = {"dpo": fit(ref, pref), "dpo_uniform_pairs": fit(jnp.zeros_like(ref), pref)}
    win = jax.vmap(synthetic.win_rate)
    out: dict[str, Any] = {"max_win_rate": _summary(jax.vmap(max_win_rate)(ref, pref)), "betas": list(p.optimum_betas)}
    for name in ("wro", "wro_logit", "dpo", "dpo_uniform_pairs"):
        rows = []
        for beta in p.optimum_betas:
            if name.startswith("wro"):
                h = "logit" if name == "wro_logit" else "identity"
                opt = jax.vmap(lambda r, q, b=beta, h=h: wro_optimum(r, q, b, h=h))(ref, pref)
            else:
                opt = jax.vmap(synthetic.dpo_optimum, in_axes=(0, 0, None))(ref, rewards[name], beta)
            rows.append(_summary(win(opt, ref, pref)))
        out[name] = rows
    return out


# ------------------------------------------------------------------------------------ the experiment


@functools.partial(jax.jit, static_argnames=("beta",))
def record_metrics(logps: Array, ref_logps: Array, pref: Array, beta: float) -> dict[str, Array]:
    """Exact metrics of records ``logps [R, K, N]`` -> dict of ``[R]``.

    ``win_rate`` (h = identity, vs π_ref), ``kl``, ``wro_objective`` (``WR − β·KL``), ``wro_logit_objective``
    (``WR_logit − β·KL``) and ``dpo_population_loss`` (pairs from π_ref, DPO with β).
    """
    weights = synthetic.population_pair_weights(ref_logps)

    def one(lp):
        win, kl = synthetic.win_rate(lp, ref_logps, pref), synthetic.mean_kl(lp, ref_logps)
        return {"win_rate": win, "kl": kl, "wro_objective": win - beta * kl,
                "wro_logit_objective": synthetic.win_rate(lp, ref_logps, pref, h="logit") - beta * kl,
                "dpo_population_loss": synthetic.population_loss(lp, ref_logps, pref, weights, beta=beta)}

    return jax.lax.map(one, logps)


def _key(seed: int, *tags: int) -> Array:
    key = jax.random.key(seed)
    for tag in tags:
        key = jax.random.fold_in(key, tag)
    return key


def _stack(trees):
    return tt.stack_trees(list(trees))


def _summary(values) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "per_seed": [float(x) for x in v]}


def _paired_test(a, b, sigmas: float) -> dict[str, Any]:
    """``mean(a − b) > sigmas · SE`` over seeds (SE = std(ddof=1)/sqrt(n); margin 0 with a single seed)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    margin = sigmas * se
    return {"mean_difference": float(d.mean()), "standard_error": se, "margin": margin,
            "holds": bool(d.mean() > margin), "per_seed": [float(x) for x in d]}


class _Jobs:
    """A progress bar over the training jobs (tqdm when ``progress``)."""

    def __init__(self, total: int, progress: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="zhang", disable=not progress, dynamic_ncols=True)
        self.seconds: dict[str, float] = {}

    def __call__(self, label: str, fn, *args):
        self.bar.set_postfix_str(label)
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds[label] = round(time.perf_counter() - start, 2)
        self.bar.update(1)
        return out


@dataclasses.dataclass(frozen=True)
class _Study:
    """What every training job of a run shares."""

    p: ZhangParams
    testbed: synthetic.Testbed
    seeds: tuple[int, ...]
    policies: dict[str, tuple[Callable, tt.ExactPolicy]]  # name -> (logps_fn for WRO, ExactPolicy for DPO)
    jobs: _Jobs

    def wro_config(self, policy: str, variant: str, samples: int) -> WroConfig:
        competitor, h = WRO_VARIANTS[variant]
        return WroConfig(steps=self.p.steps, record_every=self.p.record_every, samples_per_prompt=samples,
                         competitor_samples=self.p.competitor_samples, competitor=competitor, h=h, beta=self.p.beta,
                         learning_rate=self.p.learning_rate(policy))

    def train(self, policy: str, settings: list[Setting], variants, samples: int, tag: int) -> dict[str, dict]:
        """Trains the WRO ``variants`` and DPO on every seed; ``{arm: {metric: [S, R]}}`` (exact records)."""
        p, seeds = self.p, self.seeds
        logps_fn, exact_policy = self.policies[policy]
        ref, pref = _stack(s.ref_logps for s in settings), _stack(s.pref for s in settings)
        init = _stack(s.lm_params if policy == "lm" else s.table_params for s in settings)
        arms = {}
        for i, variant in enumerate(variants):
            keys = jnp.stack([_key(seed, tag, i) for seed in seeds])
            logps, objective, _ = self.jobs(f"{policy}/{variant}/S={samples}/{tag}", train_wro, logps_fn,
                                            self.wro_config(policy, variant, samples), init, ref, pref, keys)
            arms[variant] = {"logps": logps, "train_objective": np.asarray(objective)}
        batch = p.queries_per_step(samples)
        config = tt.TrainConfig(steps=p.steps, batch_size=batch, record_every=p.record_every,
                                optim=adam(p.learning_rate(policy)))
        data = dpo_pairs(self.testbed, settings, p.steps * batch, seed_offset=1_000_003 * (tag + 1), seeds=seeds)
        keys = jnp.stack([_key(seed, tag, 99) for seed in seeds])
        logps, loss = self.jobs(f"{policy}/dpo/S={samples}/{tag}", train_dpo, exact_policy, p.beta, config, init, ref,
                                data, keys)
        arms["dpo"] = {"logps": logps, "train_objective": -np.asarray(loss)}  # the negative training loss
        for arm in arms.values():
            metrics = [record_metrics(lp, r, q, beta=p.beta) for lp, r, q in zip(arm.pop("logps"), ref, pref)]
            arm.update({k: np.stack([np.asarray(m[k]) for m in metrics]) for k in metrics[0]})
        return arms

    def noise(self, policy: str, settings: list[Setting], samples: int, tag: int) -> dict[str, dict]:
        """:func:`gradient_noise` at each seed's π_ref (``p.gradient_draws`` fresh draws); ``{stat: summary}``."""
        p = self.p
        logps_fn, exact_policy = self.policies[policy]
        cfg = self.wro_config(policy, "wro", samples)
        batch = p.queries_per_step(samples)

        def all_seeds():
            stats = []
            for s, seed in zip(settings, self.seeds):
                pairs = synthetic.sample_pairs(self.testbed, s.pref, s.ref_logps, n_pairs=p.gradient_draws * batch,
                                               seed=7_000_001 * (tag + 1) + seed)
                data = jax.tree.map(lambda x: x.reshape(p.gradient_draws, batch), tt.PairData.from_pairs(pairs))
                keys = jax.random.split(_key(seed, tag, 7), p.gradient_draws)
                init = s.lm_params if policy == "lm" else s.table_params
                stats.append(gradient_noise(logps_fn, exact_policy, cfg, init, s.ref_logps, s.pref, keys, data))
            return stats

        stats = self.jobs(f"{policy}/gradient noise/S={samples}/{tag}", all_seeds)
        return {k: _summary([float(st[k]) for st in stats]) for k in stats[0]}


def _tracking(arm: str, curves: dict) -> dict[str, list[float]]:
    """Spearman ρ per seed between an arm's objective and the exact win rate over the records (W2).

    ``train``: the sampled objective the run logs (WRO: mean judge value − β·KL over the steps before each
    record; DPO: the negative minibatch loss), records after step 0. ``exact``: the arm's exact population
    objective at the records (none for self-play, whose competitor moves).
    """
    train = [spearman(o[1:], w[1:]) for o, w in zip(curves["train_objective"], curves["win_rate"])]
    exact_key = {"wro": "wro_objective", "wro_logit": "wro_logit_objective", "dpo": "dpo_population_loss"}.get(arm)
    if exact_key is None:
        return {"train": train}
    sign = -1.0 if arm == "dpo" else 1.0
    return {"train": train, "exact": [spearman(sign * o, w) for o, w in zip(curves[exact_key], curves["win_rate"])]}


def run(params: dict, seeds: list[int], out_dir: pathlib.Path, progress: bool = True) -> dict:
    """Runs W1–W3 (module docstring) and writes ``results.json`` and PNG plots into ``out_dir``."""
    p = ZhangParams.from_dict(params)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    testbed = make_testbed(p)
    model = make_model(p, testbed, int(seeds[0]))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    extra = [b for b in p.budgets if b != p.samples_per_prompt]
    cells_count = len(p.preferences) * len(p.policies)
    study = _Study(p, testbed, tuple(int(s) for s in seeds), {
        "lm": (synthetic.make_response_logps_fn(graphdef, rest, testbed), tt.lm_policy(model, testbed)[0]),
        "tabular": (synthetic.TabularPolicy.logps, tt.tabular_policy(testbed)[0])},
        _Jobs(cells_count * (len(p.wro_variants) + 1 + p.cell_gradient_noise) + 3 * len(extra)
              + (p.samples_per_prompt in p.budgets and not p.cell_gradient_noise), progress))

    cells, worlds, optima, w1, w2 = {}, {}, {}, {}, {}
    for pi, preference in enumerate(p.preferences):
        settings = worlds[preference] = [make_setting(p, testbed, preference, seed) for seed in study.seeds]
        optima[preference] = optimum_win_rates(p, settings)
        for qi, policy in enumerate(p.policies):
            name = f"{policy}/{preference}"
            arms = study.train(policy, settings, p.wro_variants, p.samples_per_prompt, tag=10 * pi + qi)
            w1[name] = _paired_test(arms["wro"]["win_rate"][:, -1], arms["dpo"]["win_rate"][:, -1], p.margin_sigmas)
            tracking = {arm: _tracking(arm, v) for arm, v in arms.items()}
            w2[name] = {kind: _paired_test(tracking["wro"][kind], tracking["dpo"][kind], p.margin_sigmas)
                        for kind in ("train", "exact")}
            cells[name] = {"final_win_rate": {arm: _summary(v["win_rate"][:, -1]) for arm, v in arms.items()},
                           "final_kl": {arm: _summary(v["kl"][:, -1]) for arm, v in arms.items()},
                           "spearman": tracking,
                           "gradient_noise": study.noise(policy, settings, p.samples_per_prompt, tag=10 * pi + qi)
                           if p.cell_gradient_noise else None,
                           "curves": {arm: {k: v[k].tolist() for k in ("win_rate", "kl", "train_objective",
                                                                        "wro_objective", "dpo_population_loss")}
                                      for arm, v in arms.items()}}

    rows = []  # W3: the budget grid
    for i, samples in enumerate(p.budgets):
        cell = cells[f"{p.budget_policy}/{p.budget_preference}"]
        final, noise = cell["final_win_rate"], cell["gradient_noise"]
        settings = worlds[p.budget_preference]
        if samples != p.samples_per_prompt:
            arms = study.train(p.budget_policy, settings, ("wro",), samples, tag=100 + i)
            final = {arm: _summary(v["win_rate"][:, -1]) for arm, v in arms.items()}
        if samples != p.samples_per_prompt or noise is None:
            noise = study.noise(p.budget_policy, settings, samples, tag=100 + i)
        rows.append({"samples_per_prompt": samples, "queries_per_step": p.queries_per_step(samples),
                     "final_win_rate": {k: final[k] for k in ("wro", "dpo")}, "gradient_noise": noise})
    study.jobs.bar.close()

    verdict = _verdict(p, w1, w2, cells, optima, rows)
    results = {"params": dataclasses.asdict(p), "seeds": list(study.seeds), "queries_per_step": p.queries_per_step(),
               "record_steps": list(range(0, p.steps + 1, p.record_every)), "primary_policy": p.policies[0],
               "optima": optima, "cells": cells, "w1": w1, "w2": w2,
               "w3": {"policy": p.budget_policy, "preference": p.budget_preference, "at": "π_ref", "rows": rows},
               "verdict": verdict, "job_seconds": study.jobs.seconds,
               "runtime_s": round(time.perf_counter() - start, 1)}
    write_results(out_dir / "results.json", results)
    _plot(out_dir, p, results)
    return {"claim": CLAIM, "reproduced": verdict["reproduced"], "criterion": verdict["criterion"],
            "numbers": verdict["numbers"]}


def _verdict(p: ZhangParams, w1: dict, w2: dict, cells: dict, optima: dict, rows: list) -> dict:
    """W1 and W2 judged on the primary policy (``p.policies[0]``) in every preference; W3 reported only."""
    primary = p.policies[0]
    judged = [f"{primary}/{preference}" for preference in p.preferences]
    w1_ok = all(w1[name]["holds"] for name in judged)
    w2_ok = all(w2[name]["train"]["holds"] for name in judged)
    k = p.margin_sigmas
    criterion = (f"on the {primary} policy, for every preference: W1 mean over seeds of the final exact win rate "
                 f"(WRO − DPO) > {k:g}·SE of the paired differences; W2 mean over seeds of (Spearman ρ of WRO's "
                 f"logged objective with the exact win rate over training − the same ρ for DPO's negative loss) "
                 f"> {k:g}·SE; reproduced = W1 and W2 (W3 reported, not judged)")
    numbers: dict[str, Any] = {"W1 holds": w1_ok, "W2 holds": w2_ok}
    for name in judged:
        final = cells[name]["final_win_rate"]
        numbers[f"{name} win rate WRO/DPO"] = [round(final["wro"]["mean"], 3), round(final["dpo"]["mean"], 3)]
        numbers[f"{name} W1 margin"] = [round(w1[name]["mean_difference"], 4), round(w1[name]["margin"], 4)]
        rho = cells[name]["spearman"]
        for kind in ("train", "exact"):
            numbers[f"{name} W2 ρ WRO/DPO ({kind})"] = [round(float(np.nanmean(rho[arm][kind])), 3)
                                                       for arm in ("wro", "dpo")]
        numbers[f"{name} W2 margin"] = [round(w2[name]["train"]["mean_difference"], 3),
                                        round(w2[name]["train"]["margin"], 3)]
    for preference, o in optima.items():
        numbers[f"{preference} max win rate"] = round(o["max_win_rate"]["mean"], 3)
    for row in rows:
        noise = row["gradient_noise"]
        numbers[f"W3 S={row['samples_per_prompt']} SNR WRO/DPO"] = [round(noise["wro/snr"]["mean"], 3),
                                                                   round(noise["dpo/snr"]["mean"], 3)]
    return {"reproduced": bool(w1_ok and w2_ok), "criterion": criterion, "w1_holds": w1_ok, "w2_holds": w2_ok,
            "judged_cells": judged, "numbers": numbers}


# ------------------------------------------------------------------------------------ plots


def _ranks(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return average_ranks(x) / x.size


def _plot(out_dir: pathlib.Path, p: ZhangParams, results: dict) -> None:
    """``win_rate_curves.png``, ``optima.png``, ``objective_tracking.png`` and ``budget.png``."""
    from jaxpref.evaluation import pyplot

    plt = pyplot()
    steps, cells, optima = np.asarray(results["record_steps"]), results["cells"], results["optima"]
    fig, axes = plt.subplots(len(p.preferences), len(p.policies), squeeze=False,
                             figsize=(5 * len(p.policies), 3.6 * len(p.preferences)))
    for (i, preference), (j, policy) in ((a, b) for a in enumerate(p.preferences) for b in enumerate(p.policies)):
        ax = axes[i][j]
        for arm, curve in cells[f"{policy}/{preference}"]["curves"].items():
            wr = np.asarray(curve["win_rate"])
            line, = ax.plot(steps, wr.mean(0), label=arm)
            ax.fill_between(steps, wr.min(0), wr.max(0), color=line.get_color(), alpha=0.15)
        ax.axhline(optima[preference]["max_win_rate"]["mean"], color="k", ls="--", lw=0.8, label="max win rate")
        ax.set(title=f"{policy} policy, {preference} preference (β={p.beta:g})", xlabel="step",
               ylabel="exact win rate vs π_ref")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "win_rate_curves.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(p.preferences), squeeze=False, figsize=(4.5 * len(p.preferences), 3.6))
    for ax, (preference, o) in zip(axes[0], optima.items()):
        for name in ("wro", "wro_logit", "dpo", "dpo_uniform_pairs"):
            ax.plot(o["betas"], [r["mean"] for r in o[name]], marker="o", label=f"{name} optimum")
        ax.axhline(o["max_win_rate"]["mean"], color="k", ls="--", lw=0.8, label="max win rate")
        ax.set(xscale="log", xlabel="β", ylabel="exact win rate vs π_ref", title=f"optima, {preference} preference")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "optima.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(cells), squeeze=False, figsize=(3.6 * len(cells), 3.6))
    for ax, (name, cell) in zip(axes[0], cells.items()):
        for arm, color in (("wro", "C0"), ("dpo", "C3")):
            curve = cell["curves"][arm]
            for seed_i, (obj, wr) in enumerate(zip(curve["train_objective"], curve["win_rate"])):
                label = f"{arm} (mean ρ={np.nanmean(cell['spearman'][arm]['train']):.2f})" if seed_i == 0 else None
                ax.scatter(_ranks(obj[1:]), _ranks(wr[1:]), s=6, color=color, alpha=0.5, label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=name, xlabel="rank of logged objective (DPO: −loss)", ylabel="rank of exact win rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "objective_tracking.png", dpi=120)
    plt.close(fig)

    rows = results["w3"]["rows"]
    if not rows:
        return
    queries = [r["queries_per_step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, color in (("wro", "C0"), ("dpo", "C3")):
        for ax, values in ((axes[0], [r["final_win_rate"][arm] for r in rows]),
                           (axes[1], [r["gradient_noise"][f"{arm}/snr"] for r in rows])):
            ax.errorbar(queries, [v["mean"] for v in values], yerr=[v["std"] for v in values], color=color,
                        marker="o", label=arm, capsize=3)
    axes[0].set_ylabel(f"final exact win rate ({p.steps} steps)")
    axes[1].set(ylabel="gradient SNR ‖∇‖² / E‖ĝ − ∇‖² at π_ref", yscale="log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("judge queries (labelled pairs) per step")
        ax.legend()
    fig.suptitle(f"W3: {results['w3']['policy']} policy, {results['w3']['preference']} preference")
    fig.tight_layout()
    fig.savefig(out_dir / "budget.png", dpi=120)
    plt.close(fig)
