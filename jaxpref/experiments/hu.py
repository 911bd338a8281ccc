"""Hu, He & Wipf 2024 (TYPO) on the exact-oracle testbed: preservation (P1) and interpolation (P2).

**A reconstruction** (papers.md §2: the paper's full text was not available). ``papers-addendum.md`` (TYPO)
fixes the loss (``jaxpref.losses.typo``)::

    L_λ(θ) = E_(x,y_w,y_l)[ −log σ(s·(log πθ(y_w|x) − log πθ(y_l|x))) ] + λ·E_x E_{y~π_ref(·|x)}[ −log πθ(y|x) ]

and the two properties checked here, on minimisers of *population* objectives:

* **P1 preservation**: at prompts where π_ref(·|x) is already the Bradley–Terry (BT) optimal policy
  ``∝ exp(r*)``, TYPO's minimiser keeps π_ref for every λ, while DPO's minimiser
  ``π_ref·exp(r*/β)/Z`` moves away for every finite β.
* **P2 interpolation**: as λ grows from 0 to ∞ TYPO's minimiser moves monotonically (in KL) from the
  BT-optimal policy to π_ref. DPO's path over β runs from π_ref (β → ∞) to a deterministic policy
  (β → 0) and need not pass through the BT-optimal policy; its closest approach is reported.

**Exact statement.** With the supervised term ``−log σ(s·margin)`` and pairs covering every (y, y'), the
population minimiser of the supervised term alone is ``softmax(r*/s)``: it is BT-optimal *at the BT
temperature* only when ``s = 1`` for ``p(y ≻ y') = σ(r*(y) − r*(y'))``. Preservation is therefore exact
where ``π_ref = softmax(r*/s)``; with a mismatched scale (``mismatch_scale``) it fails at small λ, and the
experiment records by how much. The regression variant (``typo_regression``) has the same minimiser
(``σ(s·margin) = p``).

Setting (:mod:`jaxpref.data.synthetic`, design.md §4): K prompts, all ``N = A**L`` responses, a random
reward r* per seed, BT preferences. π_ref equals ``bt_optimal(r*)`` on ``num_preserved`` prompts (drawn per
seed) and is ``softmax(g)`` with random logits ``g ~ N(0, reference_scale²)`` elsewhere. Pairs come from a
sampler (π_ref or uniform; full coverage), labelled by the oracle; population expectations over
(x, y, y', label) are exact sums with weights (:func:`labelled_pair_weights`).

The objectives are the **library's losses** (registry ``typo``, ``typo_regression``, ``sigmoid``) on ``[B]``
arrays of all N² labelled pairs of a prompt, reduced with the pair weights (:func:`prompt_objective`). TYPO's
unsupervised term is exact: ``reference_sample_logps`` holds ``λ·E_{y~π_ref}[log πθ(y|x)]`` with the loss's
``lam = 1`` (the loss is ``supervised + lam·(−reference_sample_logps)``, so this equals ``lam = λ``; a test
checks it), so one compiled program serves a whole λ grid; β and s are substituted as traced scalars after the
loss's own hparams validate every value.

Minimisers: (1) a free table (:class:`~jaxpref.data.synthetic.TabularPolicy`), per prompt (the table
decouples prompts), by damped saddle-free Newton with exact Hessians (:func:`prompt_grad_hessian`) in float64.
TYPO starts from the *uniform* policy (staying at π_ref is then not the start), DPO from π_ref (leaving it is
not the start either). The solver's error against known exact minimisers (DPO's closed form, ``softmax(r*)``
at λ = 0) sets the tolerance τ of every "≈ 0". (2) Secondary: a tiny real jaxpref Llama trained with Adam
on the same exact objectives (:func:`~jaxpref.data.synthetic.make_response_logps_fn`); shared parameters
couple prompts, so there preservation holds up to the LM's fit error, compared with DPO's displacement.

The exact objectives and the minimisers live in :mod:`jaxpref.experiments.hu_objectives` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import expit, log_softmax

from jaxpref.data import synthetic
from jaxpref.experiments.hu_objectives import (
    _kl,
    check_values,
    dpo_path,
    population_objective,
    prompt_grad_hessian,
    prompt_objective,
    solve_tabular,
    train_lm,
)
from jaxpref.experiments.runner import params_from_dict, write_results
from jaxpref.experiments.testbed_training import TestbedParams

TYPO_VARIANTS = ("typo", "typo_regression")
SAMPLERS = ("reference", "uniform")

CLAIM = ("TYPO's population minimiser preserves a BT-optimal reference for every λ (P1) and moves monotonically "
         "in KL from the BT-optimal policy to π_ref as λ grows (P2); DPO's minimiser moves away from a BT-optimal "
         "reference for every finite β and its β-path misses the BT-optimal policy (Hu, He & Wipf 2024)")

__all__ = ["CLAIM", "HuParams", "World", "make_world", "labelled_pair_weights", "bt_preference64",
           "prompt_objective", "population_objective", "prompt_grad_hessian", "solve_tabular", "train_lm",
           "dpo_path", "run"]


# ------------------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class HuParams(TestbedParams):
    """The experiment's ``params`` (YAML); every field has a default, unknown keys are errors. The testbed and
    tiny-Llama fields come from :class:`~jaxpref.experiments.testbed_training.TestbedParams`."""

    num_preserved: int = 4
    reward_kind: str = "iid"
    reward_scale: float = 1.0
    reference_scale: float = 1.0
    pair_sampler: str = "reference"
    variants: tuple[str, ...] = TYPO_VARIANTS
    lams: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
    betas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    path_betas: tuple[float, float, int] = (1e-3, 1e3, 241)  # log-spaced closed-form DPO path
    mismatch_scale: float = 2.0  # TYPO scale s != 1 for the documented failure of P1 (0 = skip)
    newton_iters: int = 25
    tolerance_floor: float = 1e-10  # the smallest τ (float64 minimisers reach ~1e-14)
    tolerance_factor: float = 10.0  # tolerance = max(floor, factor * measured solver error)
    endpoint_fraction: float = 0.01  # KL(π_ref‖π_λmax) <= fraction * KL(π_ref‖π_0)
    lm_steps: int = 600  # 0 skips the LM check
    lm_seeds: int = 3  # the LM check runs on the first lm_seeds seeds (it costs ~100x a tabular solve)
    lm_learning_rate: float = 1e-2
    lm_lams: tuple[float, ...] = (0.0, 1.0, 10.0)
    lm_betas: tuple[float, ...] = (2.0,)
    lm_margin_factor: float = 3.0  # DPO's LM displacement must exceed this times TYPO's

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> HuParams:
        return params_from_dict(cls, params, "hu")

    def __post_init__(self):
        if not self.variants or set(self.variants) - set(TYPO_VARIANTS) or "typo" not in self.variants:
            raise ValueError(f"hu params: variants must include 'typo' and come from {list(TYPO_VARIANTS)}, "
                             f"got {list(self.variants)}")
        if self.pair_sampler not in SAMPLERS:
            raise ValueError(f"hu params: pair_sampler must be one of {list(SAMPLERS)}, got {self.pair_sampler!r}")
        if not 1 <= self.num_preserved < self.num_prompts:
            raise ValueError(f"hu params: num_preserved must be in [1, num_prompts), got {self.num_preserved} "
                             f"with num_prompts={self.num_prompts} (P2 needs prompts that are not preserved)")
        lams = np.asarray(self.lams, np.float64)
        if lams.size < 3 or lams[0] != 0.0 or np.any(np.diff(lams) <= 0):
            raise ValueError(f"hu params: lams must be increasing, start at 0 and have >= 3 values, got {list(lams)}")
        if not self.betas or min(self.betas) <= 0 or (self.lm_steps and not (self.lm_lams and self.lm_betas)):
            raise ValueError("hu params: betas (and lm_lams, lm_betas when lm_steps > 0) must be non-empty, β > 0")
        lo, hi, count = self.path_betas
        if not 0 < lo < hi or int(count) < 2:
            raise ValueError(f"hu params: path_betas must be [lo, hi, count] with 0 < lo < hi, got {self.path_betas}")
        if self.mismatch_scale < 0 or self.newton_iters < 1 or self.lm_steps < 0 or self.lm_seeds < 1:
            raise ValueError("hu params: mismatch_scale >= 0, newton_iters >= 1, lm_steps >= 0 and lm_seeds >= 1 "
                             "are required")


# ------------------------------------------------------------------------------------ the world of one seed


@dataclasses.dataclass(frozen=True)
class World:
    """One seed's setting: [K, N] reward (float32) and float64 log-probs (no float32 floor under "KL ≈ 0").

    Attributes:
      reward: [K, N] r*.
      bt_logps: [K, N] ``bt_optimal(r*)`` in float64, the BT-optimal policy ∝ exp(r*).
      ref_logps: [K, N] π_ref: ``bt_logps`` on the preserved prompts, random elsewhere.
      preserved: [K] bool, the prompts where π_ref is BT-optimal.
      weights: [K, N, N] float64 :func:`labelled_pair_weights` of the pair sampler and the BT oracle.
    """

    reward: np.ndarray
    bt_logps: np.ndarray
    ref_logps: np.ndarray
    preserved: np.ndarray
    weights: np.ndarray


def labelled_pair_weights(pair_weights, pref) -> np.ndarray:
    """[K, N, N] float64 probability that a population draw is the labelled pair "y_i ≻ y_j at x_k".

    ``(w_kij + w_kji)·p(y_i ≻ y_j | x_k)`` for the ordered-pair distribution ``w``
    (:func:`~jaxpref.data.synthetic.population_pair_weights`): the same weighting as
    :func:`~jaxpref.data.synthetic.population_loss`. Summing over (i, j) gives the prompt distribution.
    """
    w = np.asarray(pair_weights, np.float64)
    return (w + np.swapaxes(w, 1, 2)) * np.asarray(pref, np.float64)


def bt_preference64(reward) -> np.ndarray:
    """[K, N, N] float64 ``σ(r_i − r_j)``: :func:`~jaxpref.data.synthetic.bt_preference` without float32 rounding.

    Rounding p to float32 moves the logit of p ≈ 1 by up to ~1e-5, i.e. the labels stop being exactly BT, which
    would put a floor of ~1e-7 under every "KL ≈ 0" of this experiment.
    """
    r = np.asarray(reward, np.float64)
    return expit(r[:, :, None] - r[:, None, :])


def make_world(p: HuParams, testbed: synthetic.Testbed, seed: int) -> World:
    """Draws r*, the preserved prompts and π_ref for ``seed`` (module docstring)."""
    k, n = testbed.num_prompts, testbed.num_responses
    reward = synthetic.random_reward(testbed, scale=p.reward_scale, seed=seed, kind=p.reward_kind)
    bt = log_softmax(np.asarray(reward, np.float64), axis=-1)  # synthetic.bt_optimal(r*) in float64
    rng = np.random.default_rng([seed, 0x4E0])
    preserved = np.zeros(k, bool)
    preserved[rng.choice(k, size=p.num_preserved, replace=False)] = True
    ref = log_softmax(p.reference_scale * rng.standard_normal((k, n)), axis=-1)
    ref[preserved] = bt[preserved]
    sampler = ref if p.pair_sampler == "reference" else np.asarray(synthetic.uniform_logps(testbed))
    weights = labelled_pair_weights(synthetic.population_pair_weights(sampler), bt_preference64(reward))
    return World(reward=np.asarray(reward), bt_logps=bt, ref_logps=ref, preserved=preserved,
                 weights=np.asarray(weights))


# ------------------------------------------------------------------------------------ analysis


def _stats(x) -> dict[str, Any]:
    x = np.asarray(x, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max())}


def _masked_mean(values, mask) -> np.ndarray:
    """[..., S, K] values, [S, K] mask -> [..., S] mean over the masked prompts."""
    return (values * mask).sum(-1) / mask.sum(-1)


def _typo_numbers(logps, worlds: list[World], lams, scale: float, tolerance: float) -> dict[str, Any]:
    """P1 and P2 numbers of a TYPO λ grid from its minimisers ``logps [G, S, K, N]`` (s = ``scale``)."""
    ref = np.stack([w.ref_logps for w in worlds])
    target = np.stack([log_softmax(w.reward.astype(np.float64) / scale, axis=-1) for w in worlds])  # softmax(r*/s)
    preserved = np.stack([w.preserved for w in worlds])
    other = ~preserved
    kl_from_ref = _kl(ref[None], logps)  # [G, S, K]
    kl_to_target = _kl(logps, target[None])
    pres_kl = np.where(preserved[None], kl_from_ref, -np.inf).max(-1)  # [G, S] worst preserved prompt
    # P2 per (seed, non-preserved prompt): the smallest step of KL(π_λ‖π_BT) up and of KL(π_ref‖π_λ) down
    step_up = np.diff(kl_to_target, axis=0).min(0)[other]
    step_down = -np.diff(kl_from_ref, axis=0).min(0)[other]
    endpoint = (kl_from_ref[-1] / np.maximum(kl_from_ref[0], 1e-300))[other]
    return {
        "lams": [float(v) for v in lams], "scale": scale,
        "preserved_kl_from_ref": pres_kl.T.tolist(),  # [S][G]
        "preserved_kl_max": float(pres_kl.max()),
        "kl_to_bt": _masked_mean(kl_to_target, other).T.tolist(),  # [S][G], mean over non-preserved prompts
        "kl_from_ref": _masked_mean(kl_from_ref, other).T.tolist(),
        "kl_to_bt_at_lam0_max": float(kl_to_target[0][other].max()),
        "min_step_up_kl_to_bt": float(step_up.min()),
        "min_step_down_kl_from_ref": float(step_down.min()),
        "endpoint_ratio_max": float(endpoint.max()),
        "p1_holds": bool(pres_kl.max() <= tolerance),
        "p2_monotone": bool(min(step_up.min(), step_down.min()) >= -tolerance),
    }


def _dpo_numbers(p: HuParams, worlds: list[World], newton, closed, tolerance: float) -> dict[str, Any]:
    """DPO's displacement at preserved prompts (``[B, S, K, N]`` minimisers) and its closed-form β path."""
    ref = np.stack([w.ref_logps for w in worlds])
    preserved = np.stack([w.preserved for w in worlds])
    other = ~preserved
    pres = {name: np.where(preserved[None], _kl(ref[None], lp), np.inf).min(-1)  # [B, S] least-moved prompt
            for name, lp in (("closed_form", closed), ("newton", newton))}
    betas = np.geomspace(p.path_betas[0], p.path_betas[1], int(p.path_betas[2]))
    paths = [dpo_path(w.ref_logps, w.bt_logps, w.reward, betas) for w in worlds]
    per_prompt = np.stack([pt["kl_to_bt"].min(0) for pt in paths])[other]  # β chosen per prompt: DPO's best case
    common = [_masked_mean(pt["kl_to_bt"], o[None]).min() for pt, o in zip(paths, other)]
    least = float(min(pres["closed_form"].min(), pres["newton"].min()))
    return {
        "betas": [float(b) for b in p.betas],
        "preserved_kl_closed_form": pres["closed_form"].T.tolist(),  # [S][B]
        "preserved_kl_newton": pres["newton"].T.tolist(),
        "preserved_kl_min": least,
        "preserved_kl_at_largest_beta": _stats(pres["closed_form"][-1]),
        "path_betas": betas.tolist(),
        "path_kl_to_bt": [_masked_mean(pt["kl_to_bt"], o[None]).tolist() for pt, o in zip(paths, other)],
        "path_kl_from_ref": [_masked_mean(pt["kl_from_ref"], o[None]).tolist() for pt, o in zip(paths, other)],
        "path_entropy_at_smallest_beta": _stats([pt["entropy"][0][o].mean() for pt, o in zip(paths, other)]),
        "path_kl_from_ref_at_largest_beta": _stats([pt["kl_from_ref"][-1].max() for pt in paths]),
        "path_min_kl_to_bt_per_prompt": _stats(per_prompt),
        "path_min_kl_to_bt_common_beta": _stats(common),
        "kl_ref_to_bt": _stats([_kl(w.bt_logps, w.ref_logps)[o].mean() for w, o in zip(worlds, other)]),
        "p1_fails": bool(least > tolerance),
        "path_misses_bt": bool(per_prompt.min() > tolerance),
    }


# ------------------------------------------------------------------------------------ run


def run(params: dict, seeds: list[int], out_dir: pathlib.Path, progress: bool = True) -> dict:
    """Runs P1 and P2 (module docstring) and writes ``results.json`` and PNG plots into ``out_dir``."""
    from tqdm.auto import tqdm

    p = HuParams.from_dict(params)
    seeds = [int(s) for s in seeds]
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    testbed = p.make_testbed()
    worlds = [make_world(p, testbed, s) for s in seeds]
    bar = tqdm(total=len(p.variants) + 1 + 2 * bool(p.lm_steps), desc="hu", disable=not progress)
    timings = {}

    def job(label, fn, *args, **kw):
        bar.set_postfix_str(label)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kw))
        timings[label] = round(time.perf_counter() - t0, 1)
        bar.update(1)
        return out

    with jax.enable_x64(True):  # float64 minimisers: "≈ 0" then means ~1e-12, not float32's ~1e-7
        typo_logps, dpo_newton, dpo_closed, grad_max = _tabular_minimisers(p, worlds, job)
    g = len(p.lams)

    # the solver's measured error against known exact minimisers sets the tolerance τ of every "≈ 0"
    # (TYPO's λ = 0 error at non-preserved prompts only, so that τ does not contain P1's own measurement)
    bt, preserved = np.stack([w.bt_logps for w in worlds]), np.stack([w.preserved for w in worlds])
    solver_error = {"dpo_vs_closed_form": float(_kl(dpo_closed, dpo_newton).max())}
    for variant in p.variants:
        solver_error[f"{variant}_lam0_vs_bt"] = float(_kl(bt, typo_logps[variant][0])[~preserved].max())
    tolerance = max(p.tolerance_floor, p.tolerance_factor * max(solver_error.values()))

    typo = {v: _typo_numbers(typo_logps[v][:g], worlds, p.lams, 1.0, tolerance) for v in p.variants}
    mismatch = None
    if p.mismatch_scale:
        mismatch = _typo_numbers(typo_logps["typo"][g:], worlds, p.lams, p.mismatch_scale, tolerance)
        target = np.stack([log_softmax(w.reward.astype(np.float64) / p.mismatch_scale, axis=-1) for w in worlds])
        mismatch["predicted_preserved_kl_at_lam0_max"] = float(_kl(bt, target)[preserved].max())
    dpo = _dpo_numbers(p, worlds, dpo_newton, dpo_closed, tolerance)
    n_lm = min(p.lm_seeds, len(seeds))
    lm = _lm_check(p, testbed, seeds[:n_lm], worlds[:n_lm], typo_logps["typo"][:g, :n_lm], job) if p.lm_steps else None
    bar.close()

    typo_ok = all(t["p1_holds"] and t["p2_monotone"] and t["kl_to_bt_at_lam0_max"] <= tolerance
                  and t["endpoint_ratio_max"] <= p.endpoint_fraction for t in typo.values())
    reproduced = bool(typo_ok and dpo["p1_fails"] and dpo["path_misses_bt"] and (lm is None or lm["holds"]))
    results = {"claim": CLAIM, "params": dataclasses.asdict(p), "seeds": seeds, "tolerance": tolerance,
               "solver_error": solver_error, "grad_max": grad_max, "typo": typo, "typo_mismatched_scale": mismatch,
               "dpo": dpo, "lm": lm, "timings_s": timings, "runtime_s": round(time.perf_counter() - start, 1)}
    write_results(out_dir / "results.json", results)
    _plot(out_dir, results)
    return {"claim": CLAIM, "reproduced": reproduced, "criterion": _criterion(p, tolerance, lm is not None),
            "numbers": _headline(p, results)}


def _criterion(p: HuParams, tolerance: float, with_lm: bool) -> str:
    text = (f"τ = max({p.tolerance_floor:g}, {p.tolerance_factor:g} × measured solver error) = {tolerance:.2g}. "
            f"TYPO, each variant {list(p.variants)}, every seed: P1 max over λ and preserved prompts of "
            f"KL(π_ref‖π_λ) <= τ; P2 at every non-preserved prompt KL(π_λ‖π_BT) non-decreasing and KL(π_ref‖π_λ) "
            f"non-increasing along the λ grid (steps >= −τ), KL(π_0‖π_BT) <= τ and KL(π_ref‖π_λmax) <= "
            f"{p.endpoint_fraction:g}·KL(π_ref‖π_0). DPO: min over β, seeds and preserved prompts of KL(π_ref‖π_β) "
            f"> τ (closed form and Newton), and the closed-form β path's closest approach to π_BT > τ at every "
            f"non-preserved prompt")
    if with_lm:
        text += (f". LM (secondary, first {p.lm_seeds} seeds): at every seed DPO's preserved-prompt KL (min over β) "
                 f"> {p.lm_margin_factor:g} × TYPO's (max over λ)")
    return text


def _headline(p: HuParams, results: dict) -> dict[str, Any]:
    dpo, numbers = results["dpo"], {"tolerance": results["tolerance"],
                                    "solver_error_max": max(results["solver_error"].values())}
    for v, t in results["typo"].items():
        numbers.update({f"{v}_preserved_kl_max": t["preserved_kl_max"],
                        f"{v}_min_monotone_step": min(t["min_step_up_kl_to_bt"], t["min_step_down_kl_from_ref"]),
                        f"{v}_endpoint_ratio_max": t["endpoint_ratio_max"]})
    numbers.update({"dpo_preserved_kl_min": dpo["preserved_kl_min"],
                    "dpo_preserved_kl_at_largest_beta_mean": dpo["preserved_kl_at_largest_beta"]["mean"],
                    "dpo_path_min_kl_to_bt": dpo["path_min_kl_to_bt_per_prompt"]["min"],
                    "kl_ref_to_bt_mean": dpo["kl_ref_to_bt"]["mean"]})
    if results["typo_mismatched_scale"] is not None:
        m = results["typo_mismatched_scale"]
        numbers[f"typo_s{p.mismatch_scale:g}_preserved_kl_at_lam0_mean"] = float(
            np.mean([row[0] for row in m["preserved_kl_from_ref"]]))
    if results["lm"] is not None:
        numbers.update({"lm_typo_preserved_kl_max": results["lm"]["typo_preserved_kl_max"],
                        "lm_dpo_preserved_kl_min": results["lm"]["dpo_preserved_kl_min"]})
    return numbers


def _tabular_minimisers(p: HuParams, worlds: list[World], job):
    """Newton minimisers over free tables (run under ``jax.enable_x64``).

    Returns ``(typo {variant: [G, S, K, N]}, dpo [B, S, K, N], dpo_closed_form [B, S, K, N], grad_max)``; the
    ``typo`` grid is ``lams`` at s = 1, followed by ``lams`` at ``mismatch_scale`` (when set).
    """
    ref = jnp.asarray(np.stack([w.ref_logps for w in worlds]), jnp.float64)
    weights = jnp.asarray(np.stack([w.weights for w in worlds]), jnp.float64)
    reward = np.stack([w.reward for w in worlds])
    lams = np.asarray(p.lams, np.float64)
    typo_logps, grad_max = {}, {}
    for variant in p.variants:
        extra = variant == "typo" and p.mismatch_scale > 0
        scales = np.repeat([1.0, p.mismatch_scale] if extra else [1.0], len(lams))
        values = np.tile(lams, 2 if extra else 1)
        check_values(variant, values, scales)
        lp, g = job(variant, solve_tabular, variant, ref, weights, jnp.asarray(values), jnp.asarray(scales),
                    jnp.zeros_like(ref), iters=p.newton_iters)  # from uniform: staying at π_ref is not the start
        typo_logps[variant], grad_max[variant] = np.asarray(lp), float(np.max(g[: len(lams)]))
    betas = np.asarray(p.betas, np.float64)
    check_values("sigmoid", betas)
    lp, g = job("sigmoid", solve_tabular, "sigmoid", ref, weights, jnp.asarray(betas), jnp.ones_like(betas),
                ref, iters=p.newton_iters)  # from π_ref (DPO's own start): leaving it is not the start either
    grad_max["sigmoid"] = float(np.max(g))
    closed = np.stack([np.asarray(synthetic.dpo_optimum(ref, reward, float(b))) for b in betas])
    return typo_logps, np.asarray(lp), closed, grad_max


def _lm_check(p: HuParams, testbed, seeds, worlds: list[World], typo_tabular, job) -> dict[str, Any]:
    """Secondary: a tiny real LM trained on the exact TYPO (``lm_lams``) and DPO (``lm_betas``) objectives.

    ``typo_tabular [G, S, K, N]`` (the exact minimisers on ``lams``) gives the LM's fit error where λ is shared.
    """
    models = [testbed.init_model(s, **p.model_kw()) for s in seeds]
    graphdef, _, rest = nnx.split(models[0], nnx.Param, ...)
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(m, nnx.Param, ...)[1] for m in models])
    logps_fn = synthetic.make_response_logps_fn(graphdef, rest, testbed)
    ref = jnp.asarray(np.stack([w.ref_logps for w in worlds]), jnp.float32)
    weights = jnp.asarray(np.stack([w.weights for w in worlds]))
    reward = np.stack([w.reward for w in worlds])
    preserved = np.stack([w.preserved for w in worlds])
    check_values("typo", p.lm_lams)
    check_values("sigmoid", p.lm_betas)
    kw = dict(steps=p.lm_steps, learning_rate=p.lm_learning_rate)
    lams, betas = jnp.asarray(p.lm_lams, jnp.float32), jnp.asarray(p.lm_betas, jnp.float32)
    typo_lp, _ = job("lm/typo", train_lm, logps_fn, "typo", params, ref, weights, lams, jnp.ones_like(lams), **kw)
    dpo_lp, _ = job("lm/sigmoid", train_lm, logps_fn, "sigmoid", params, ref, weights, betas, jnp.ones_like(betas),
                    **kw)
    typo_lp, dpo_lp, ref = np.asarray(typo_lp), np.asarray(dpo_lp), np.asarray(ref)
    dpo_exact = np.stack([log_softmax(ref.astype(np.float64) + reward / b, axis=-1) for b in p.lm_betas])
    typo_pres = _masked_mean(_kl(ref[None], typo_lp), preserved[None])  # [G, S]
    dpo_pres = _masked_mean(_kl(ref[None], dpo_lp), preserved[None])
    shared = [(i, p.lams.index(v)) for i, v in enumerate(p.lm_lams) if v in p.lams]
    typo_fit = [float(_kl(typo_tabular[j], typo_lp[i]).mean(-1).max()) for i, j in shared]
    holds = dpo_pres.min(0) > p.lm_margin_factor * typo_pres.max(0)  # [S]
    return {"lams": list(p.lm_lams), "betas": list(p.lm_betas),
            "typo_preserved_kl": typo_pres.T.tolist(), "dpo_preserved_kl": dpo_pres.T.tolist(),  # [S][G]
            "dpo_preserved_kl_exact": _masked_mean(_kl(ref[None], dpo_exact), preserved[None]).T.tolist(),
            "typo_preserved_kl_max": float(typo_pres.max()), "dpo_preserved_kl_min": float(dpo_pres.min()),
            "dpo_fit_error_max": float(_kl(dpo_exact, dpo_lp).mean(-1).max()),  # mean over prompts, max over runs
            "typo_fit_error_max": max(typo_fit) if typo_fit else None,
            "holds_per_seed": holds.tolist(), "holds": bool(holds.all())}


def _plot(out_dir: pathlib.Path, results: dict) -> None:
    from jaxpref.evaluation import pyplot

    plt = pyplot()
    tol, typo, dpo, mismatch = (results[k] for k in ("tolerance", "typo", "dpo", "typo_mismatched_scale"))
    runs = {**typo, **({} if mismatch is None else {f"typo, s={mismatch['scale']:g}": mismatch})}
    lam_x = next(iter(typo.values()))["lams"]
    lam_x = np.where(np.asarray(lam_x) > 0, lam_x, lam_x[1] / 10)  # λ = 0 drawn one decade left of the next λ
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, t in runs.items():
        v = np.maximum(np.asarray(t["preserved_kl_from_ref"]), tol / 100)  # [S, G]
        line, = ax1.plot(lam_x, v.mean(0), marker="o", label=name)
        ax1.fill_between(lam_x, v.min(0), v.max(0), color=line.get_color(), alpha=0.2)
    ax1.set(xscale="log", yscale="log", xlabel="λ (leftmost point: λ = 0)",
            ylabel="max KL(π_ref‖π_λ), preserved x (≥ τ/100)", title="P1: TYPO at BT-optimal references")
    for key, style in (("preserved_kl_closed_form", "-o"), ("preserved_kl_newton", "x")):
        ax2.plot(dpo["betas"], np.asarray(dpo[key]).mean(0), style, label="DPO " + key[13:].replace("_", " "))
    ax2.set(xscale="log", yscale="log", xlabel="β", ylabel="min KL(π_ref‖π_β), preserved x",
            title="P1: DPO at BT-optimal references")
    for ax in (ax1, ax2):
        ax.axhline(tol, color="k", ls=":", lw=0.8, label="tolerance τ")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "p1_preservation.png", dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, t in typo.items():
        ax1.plot(lam_x, np.asarray(t["kl_to_bt"]).mean(0), "-o", label=f"{name}: KL(π_λ‖π_BT)")
        ax1.plot(lam_x, np.asarray(t["kl_from_ref"]).mean(0), "--s", label=f"{name}: KL(π_ref‖π_λ)")
    ax1.set(xscale="log", xlabel="λ (leftmost point: λ = 0)", ylabel="KL, mean over non-preserved x and seeds",
            title="P2: TYPO's minimiser from π_BT to π_ref")
    ax2.plot(dpo["path_kl_to_bt"][0], dpo["path_kl_from_ref"][0], "-", label="DPO closed form, β path")
    for name, t in typo.items():
        ax2.plot(t["kl_to_bt"][0], t["kl_from_ref"][0], "o-", label=f"{name}, λ path")
    ax2.set_xscale("symlog", linthresh=1e-3)
    ax2.set_yscale("symlog", linthresh=1e-3)
    ax2.set(xlabel="KL(π‖π_BT)", ylabel="KL(π_ref‖π)", title="paths, seed 0 (π_BT: x = 0, π_ref: y = 0)")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "p2_interpolation.png", dpi=120)
    plt.close(fig)
