"""Held-out evaluation during training (``train.eval_every``) and keeping the best checkpoint.

Every trainer hands :func:`jaxpref.training.loop.run_steps` an evaluator: ``evaluator(step, state) ->
{"eval/...": float}``, called at step 0 and every ``train.eval_every`` steps (when it is > 0) and at the
last step. The rows
go to ``metrics.jsonl`` (their own lines, keys ``eval/...``), TensorBoard and the progress bar; the
time they take is ``eval/time_s`` and ``summary.json``'s ``eval_s``, kept out of the training
throughput.

Preference runs (:class:`PreferenceEvaluator`) score the held-out pairs with the packed batch scorer
of the ``eval.*`` scripts (:func:`jaxpref.evaluation.score_pairs`: jitted once per row shape, at most
two shapes per data set, so the eval compiles once and never again) and compute, in one jitted
function of the ``[N, 2]`` scores (:func:`pair_metrics`):

* ``eval/loss`` (and ``eval/loss/<term>``) of the run's loss composition, and the composition's reward
  metrics ``eval/rewards/{accuracies,margins,chosen,rejected}`` (TRL's names);
* ``eval/ranking_accuracy`` / ``eval/ranking_accuracy_normalized``: R / R̃ of the policy (Chen et al.
  Def. 2.3, eq. 15; exact ties correct, vote ties excluded), as ``eval.ranking``;
* ``eval/R_star_median`` / ``eval/R_star_normalized_median``: idealized R* / R̃* (Cor. 3.3) of the
  **initial reference** (``reference.source``, else the initial policy), the median over β ∈
  {0.01, 0.1, 1, 5, 10}, α = the votes (or 0.75 without votes), and ``eval/alignment_gap(_normalized)``
  = 100 · (R* − R), as ``eval.ranking --reference``;
* ``eval/chosen_logp_mean``, ``eval/rejected_logp_mean``, their mean change since step 0
  ``eval/chosen_change_mean`` / ``eval/rejected_change_mean`` and ``eval/fraction_chosen_displaced``
  (share of pairs whose chosen log-prob fell: likelihood displacement, Razin et al.), as
  ``eval.displacement``.

The step-0 scores of the initial policy and the reference are written to ``RUN_DIR/eval_initial.npz``
so a resumed run measures changes from the same step 0. SFT runs log ``eval/loss`` (token-mean NLL of
the held-out responses) and ``eval/perplexity``; reward models ``eval/loss`` (Bradley-Terry),
``eval/accuracy`` and ``eval/rewards/{chosen,rejected,margins}``.

:class:`BestCheckpoint` implements ``checkpoint.keep_best``: the eval step with the best value of one
metric gets a checkpoint that is kept beside the last ``checkpoint.keep`` (``RUN_DIR/best_checkpoint.json``
names it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref import metrics as M
from jaxpref.compile_cache import CompileWatch
from jaxpref.losses import Composition, LossInputs

log = logging.getLogger(__name__)

PREFIX = "eval/"
INITIAL_FILE = "eval_initial.npz"
BEST_FILE = "best_checkpoint.json"
FALLBACK_ALPHA = 0.75  # eval.ranking's --fallback-alpha (the released code's simulate_proportion)


def due(step: int, every: int, last: int) -> bool:
    """Whether ``step`` (>= 1) is an eval step: every ``every`` steps (``every > 0``) and the last step."""
    return step == last or (every > 0 and step % every == 0)


# ------------------------------------------------------------------------------------ preference pairs


def pair_metrics(sums, counts, init_sums, ref_sums, loss_ref_sums, votes, tie, bco_delta, *,
                 composition: Composition | None, has_votes: bool, betas=M.DEFAULT_BETAS) -> dict[str, jax.Array]:
    """Held-out metrics of a preference policy (module docstring) from per-pair scores.

    Args:
      sums, counts: [N, 2] float32 summed response log-probs and token counts of the policy.
      init_sums: [N, 2] float32 sums of the initial policy (step 0).
      ref_sums: [N, 2] float32 sums of the initial reference (R*, the alignment gap).
      loss_ref_sums: [N, 2] reference sums the loss uses (the current reference; None: reference-free).
      votes: [N] float32 vote share of chosen (1 without votes); tie: [N] bool vote ties.
      bco_delta: [] the run's BCO running mean (read by ``bco_pair`` only).
      composition: the run's loss (None: no loss metrics).
      has_votes: the data carry votes (else α = 0.75 for R*).
    """
    keep = ~(tie & has_votes)
    out: dict[str, jax.Array] = {}
    if composition is not None:
        inputs = LossInputs(
            policy_chosen_logps=sums[:, 0], policy_rejected_logps=sums[:, 1],
            reference_chosen_logps=None if loss_ref_sums is None else loss_ref_sums[:, 0],
            reference_rejected_logps=None if loss_ref_sums is None else loss_ref_sums[:, 1],
            chosen_tokens=counts[:, 0], rejected_tokens=counts[:, 1], votes=votes, bco_delta=bco_delta)
        _, _, lm = composition(inputs, jnp.ones(sums.shape[:1], bool))
        out.update({k: v for k, v in lm.items() if k == "loss" or k.startswith(("loss/", "rewards/"))})
    rank = M.ranking_accuracy(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1], keep)
    r, rn = rank.ranking.mean, rank.normalized.mean
    alpha = votes if has_votes else jnp.full_like(votes, FALLBACK_ALPHA)
    b = jnp.asarray(betas, jnp.float32)
    ref_means = ref_sums / jnp.maximum(counts, 1.0)
    ideal = M.beta_summary(M.idealized_ranking_accuracy(ref_sums[:, 0], ref_sums[:, 1], alpha, b, keep).mean)
    ideal_n = M.beta_summary(M.idealized_ranking_accuracy(ref_means[:, 0], ref_means[:, 1], alpha, b, keep,
                                                          normalized=True).mean)
    ch = M.displacement_stats(init_sums[:, 0], sums[:, 0])
    rj = M.displacement_stats(init_sums[:, 1], sums[:, 1])
    out.update({
        "ranking_accuracy": r, "ranking_accuracy_normalized": rn,
        "R_star_median": ideal["median"], "R_star_normalized_median": ideal_n["median"],
        "alignment_gap": M.alignment_gap(ideal["median"], r),
        "alignment_gap_normalized": M.alignment_gap(ideal_n["median"], rn),
        "chosen_logp_mean": jnp.mean(sums[:, 0]), "rejected_logp_mean": jnp.mean(sums[:, 1]),
        "chosen_change_mean": ch.change_tally.mean, "rejected_change_mean": rj.change_tally.mean,
        "fraction_chosen_displaced": ch.displaced_tally.mean,
    })
    return {PREFIX + k: v for k, v in out.items()}


@dataclasses.dataclass
class WinRateProbe:
    """``eval/win_rate`` (+ ``_ci_low`` / ``_ci_high``, a 95 % percentile bootstrap) of the policy against
    the initial reference on held-out prompts, computed as ``eval.win_rate`` does (:class:`jaxpref.config.EvalConfig`).

    The reference's responses are sampled once (:meth:`reference_responses`); each probe samples the
    policy's with the same per-prompt seeds (:func:`jaxpref.evaluation.generate_responses`).
    """

    prompts: list
    judge: Callable
    tokenizer: Any
    max_new_tokens: int = 64
    temperature: float = 1.0
    max_prompt_length: int = 256
    chat_template: bool = True
    batch_size: int = 8
    seed: int = 0
    reference: list[str] | None = None

    def _generate(self, model, desc: str) -> list[str]:
        from jaxpref.data.tokenize import TokenizeConfig
        from jaxpref.evaluation import generate_responses

        tcfg = TokenizeConfig(max_length=self.max_prompt_length + 1, chat_template=self.chat_template)
        return generate_responses(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, seed=self.seed, batch_size=self.batch_size,
                                  tokenize=tcfg, progress=False, desc=desc)

    def reference_responses(self, model) -> None:
        self.reference = self._generate(model, "eval reference")

    def __call__(self, model) -> dict[str, float]:
        policy = self._generate(model, "eval policy")
        swaps = M.position_swaps(len(self.prompts), self.seed)
        first, second = M.order_pair(policy, self.reference, swaps)
        p = M.unswap(np.asarray(self.judge(self.prompts, first, second), np.float64), swaps)
        values, keep = (np.asarray(x) for x in M.verdict_values(jnp.asarray(p)))
        lo, hi = M.bootstrap_ci(values, keep, seed=self.seed)
        return {"eval/win_rate": float(M.win_rate(jnp.asarray(p)).mean), "eval/win_rate_ci_low": lo,
                "eval/win_rate_ci_high": hi}


@dataclasses.dataclass
class PreferenceEvaluator:
    """``evaluator(step, state) -> {"eval/...": float}`` on held-out pairs (module docstring).

    Attributes:
      pairs: the held-out :class:`~jaxpref.data.tokenize.TokenizedPairs`.
      has_votes: whether they carry vote shares.
      graphdef, rest: the policy's structure and non-trainable state.
      composition: the run's loss (None: no ``eval/loss``, e.g. terms needing reference samples).
      uses_reference: the loss reads reference log-probs.
      mesh: shard scoring batches over it.
      batch_size: pairs per scoring batch (``train.eval_batch_size``).
      chunks: ``seq_chunk`` / ``vocab_chunk``.
      current_reference: ``() -> params`` of a reference that changes during training (TR-DPO), else None.
      reference_graph: ``(graphdef, rest)`` of a reference with a graph of its own (a LoRA run's
        ``reference.source``), else None (the reference runs in the policy's graph).
      win_rate: a :class:`WinRateProbe` run at steps divisible by ``win_rate_steps`` and at ``last_step``.
    """

    pairs: Any
    has_votes: bool
    graphdef: Any
    rest: Any
    composition: Composition | None
    uses_reference: bool
    mesh: Any = None
    batch_size: int = 8
    chunks: dict = dataclasses.field(default_factory=dict)
    current_reference: Callable[[], Any] | None = None
    reference_graph: tuple[Any, Any] | None = None
    win_rate: WinRateProbe | None = None
    win_rate_steps: int = 0
    last_step: int = -1
    postfix: str = "eval/loss"
    compiles: int = 0
    init_sums: np.ndarray | None = None
    ref_sums: np.ndarray | None = None

    def __post_init__(self):
        self._metrics = jax.jit(lambda *a: pair_metrics(*a, composition=self.composition,
                                                        has_votes=self.has_votes))
        if self.composition is None:
            self.postfix = "eval/ranking_accuracy"

    def score(self, params, graph: tuple[Any, Any] | None = None) -> Any:
        """:class:`~jaxpref.evaluation.PairScores` of the held-out pairs under ``params`` (in ``graph``:
        ``(graphdef, rest)``, default the policy's)."""
        from jaxpref.evaluation import score_pairs

        graphdef, rest = graph or (self.graphdef, self.rest)
        model = nnx.merge(graphdef, params, rest)
        out = score_pairs(model, self.pairs, batch_size=self.batch_size, mesh=self.mesh, progress=False,
                          desc="eval", **self.chunks)
        self.compiles += out.stats.compiles
        return out

    def prepare(self, run_dir: pathlib.Path, initial_params, reference_params, *, resume: bool) -> None:
        """Step-0 scores of the initial policy and the initial reference (``reference_params`` None: the
        initial policy), read from ``RUN_DIR/eval_initial.npz`` on resume, else computed and written."""
        if self.win_rate is not None:  # the initial reference's responses, once per process (seeded)
            graphdef, rest = (self.graphdef, self.rest) if reference_params is None else \
                self.reference_graph or (self.graphdef, self.rest)
            ref = initial_params if reference_params is None else reference_params
            self.win_rate.reference_responses(nnx.merge(graphdef, ref, rest))
        path = pathlib.Path(run_dir) / INITIAL_FILE
        rows = np.asarray(self.pairs.row, np.int64)
        if resume and path.is_file():
            with np.load(path) as z:
                if np.array_equal(z["rows"], rows):
                    self.init_sums, self.ref_sums = z["init_sums"], z["ref_sums"]
                    return
            log.warning("%s holds other eval rows than this run's; rescoring the initial policy", path)
        self.init_sums = self.score(initial_params).sums
        self.ref_sums = self.init_sums if reference_params is None else \
            self.score(reference_params, self.reference_graph).sums
        if jax.process_index() == 0:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, rows=rows, init_sums=self.init_sums, ref_sums=self.ref_sums)
            tmp.replace(path)

    def __call__(self, step: int, state) -> dict[str, float]:
        scores = self.score(state.params)
        loss_ref = None
        if self.uses_reference:
            loss_ref = self.ref_sums if self.current_reference is None else \
                self.score(self.current_reference()).sums
        with CompileWatch() as watch:
            out = self._metrics(scores.sums, scores.counts, self.init_sums, self.ref_sums, loss_ref,
                                np.asarray(self.pairs.votes, np.float32), np.asarray(self.pairs.tie, bool),
                                state.bco_delta)
            out = {k: float(v) for k, v in jax.device_get(out).items()}
        self.compiles += watch.compiles
        if self.win_rate is not None and (step == self.last_step or
                                          (self.win_rate_steps > 0 and step % self.win_rate_steps == 0)):
            with CompileWatch() as watch:
                out.update(self.win_rate(nnx.merge(self.graphdef, state.params, self.rest)))
            self.compiles += watch.compiles
        return {**out, "eval/pairs": len(self.pairs)}


# ------------------------------------------------------------------------------------ SFT


@dataclasses.dataclass
class SFTEvaluator:
    """``eval/loss`` (token-mean NLL of the held-out responses) and ``eval/perplexity`` of an SFT run.

    Padded ``[B, T]`` batches in the run's buckets, one jitted forward per bucket shape.
    """

    examples: Any
    graphdef: Any
    rest: Any
    mesh: Any = None
    batch_size: int = 8
    buckets: tuple[int, ...] | None = None
    chunks: dict = dataclasses.field(default_factory=dict)
    postfix: str = "eval/loss"
    compiles: int = 0

    def __post_init__(self):
        from jaxpref.training import step as steplib

        def nll(params, batch):
            m = batch.loss_mask * batch.example_mask[:, None]
            lp = steplib.forward_logps(self.graphdef, params, self.rest, batch.input_ids, batch.segment_ids,
                                       batch.positions, m, **self.chunks)
            return lp.sums.sum(), lp.counts.sum()

        self._nll = jax.jit(nll)
        lengths = self.examples.lengths().max(1)
        order = np.argsort(lengths, kind="stable")
        self._batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __call__(self, step: int, state) -> dict[str, float]:
        from jaxpref import parallel
        from jaxpref.data.batching import sft_batch

        total, tokens = 0.0, 0.0
        with CompileWatch() as watch:
            for idx in self._batches:
                batch = sft_batch(self.examples, idx, buckets=self.buckets, batch_size=self.batch_size)
                if self.mesh is not None:
                    batch = parallel.shard_batch(batch, self.mesh)
                s, c = jax.device_get(self._nll(state.params, batch))
                total, tokens = total + float(s), tokens + float(c)
        self.compiles += watch.compiles
        loss = -total / max(tokens, 1.0)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/examples": len(self.examples)}


# ------------------------------------------------------------------------------------ reward models


@dataclasses.dataclass
class RewardEvaluator:
    """Bradley-Terry loss, accuracy and reward margins of a reward model on held-out pairs.

    ``rewards(params) -> [N, 2]`` scores the pairs (:func:`jaxpref.reward_model.score_reward_pairs`).
    """

    rewards: Callable[[Any], np.ndarray]
    n_pairs: int
    postfix: str = "eval/accuracy"
    compiles: int = 0

    def __call__(self, step: int, state) -> dict[str, float]:
        with CompileWatch() as watch:
            r = np.asarray(self.rewards(state.params), np.float64)
        self.compiles += watch.compiles
        margin = r[:, 0] - r[:, 1]
        return {"eval/loss": float(np.mean(np.logaddexp(0.0, -margin))), "eval/accuracy": float(np.mean(margin > 0)),
                "eval/rewards/chosen": float(r[:, 0].mean()), "eval/rewards/rejected": float(r[:, 1].mean()),
                "eval/rewards/margins": float(margin.mean()), "eval/pairs": self.n_pairs}


# ------------------------------------------------------------------------------------ keep_best


def best_mode(metric: str, mode: str = "auto") -> str:
    """``max`` or ``min``: ``auto`` minimises losses, gaps and displacement, maximises the rest."""
    if mode != "auto":
        return mode
    name = metric.lower()
    return "min" if any(w in name for w in ("loss", "gap", "displaced", "perplexity")) else "max"


class BestCheckpoint:
    """Tracks the best eval step of ``checkpoint.keep_best`` (persisted in ``RUN_DIR/best_checkpoint.json``).

    Args:
      run_dir: the run directory.
      metric: the eval metric (``eval/`` prefix optional).
      mode: ``auto``, ``max`` or ``min`` (:func:`best_mode`).
      start: the step the run (re)starts at; a recorded best after it belongs to lost work and is dropped.
      committed: checkpoint steps on disk (a recorded best that is not among them is dropped).
    """

    def __init__(self, run_dir, metric: str, mode: str = "auto", *, start: int = 0, committed=()):
        self.path = pathlib.Path(run_dir) / BEST_FILE
        self.metric = metric if metric.startswith(PREFIX) else PREFIX + metric
        self.mode = best_mode(self.metric, mode)
        self.step: int | None = None
        self.value: float | None = None
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("metric") == self.metric and saved.get("step") is not None and \
                    saved["step"] <= start and saved["step"] in set(committed):
                self.step, self.value = int(saved["step"]), float(saved["value"])

    def improves(self, row: dict[str, float]) -> bool:
        """Whether ``row`` (an eval row) beats the best so far; ValueError when it lacks the metric."""
        if self.metric not in row:
            names = sorted(k for k in row if k.startswith(PREFIX))
            raise ValueError(f"checkpoint.keep_best={self.metric!r} is not an eval metric of this run "
                             f"(it logs {names})")
        v = row[self.metric]
        if not math.isfinite(v):
            return False
        return self.value is None or (v > self.value if self.mode == "max" else v < self.value)

    def update(self, step: int, row: dict[str, float]) -> None:
        self.step, self.value = int(step), float(row[self.metric])
        if jax.process_index() == 0:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"metric": self.metric, "mode": self.mode, "step": self.step,
                                       "value": self.value, "time": time.time()}, indent=1))
            tmp.replace(self.path)


# ------------------------------------------------------------------------------------ WRO prompts


def subset_table(table, positions: np.ndarray):
    """The rows ``positions`` of a :class:`jaxpref.training.wro.PromptTable` (nothing rejected)."""
    pos = [int(p) for p in positions]
    return type(table)(prompt_ids=[table.prompt_ids[p] for p in pos], prompts=[table.prompts[p] for p in pos],
                       rows=np.asarray(table.rows, np.int64)[pos],
                       responses=None if table.responses is None else [table.responses[p] for p in pos],
                       n_rejected=0)


@dataclasses.dataclass(frozen=True)
class _Row:
    row: int
    id: str


def split_prompts(table, *, fraction: float, seed: int, source: str, limit: int | None, run_dir, resume: bool):
    """``(train table, held-out table)``: ``data.eval_split`` of a WRO prompt table, by source row
    (:func:`jaxpref.data.split.hold_out`, recorded in ``RUN_DIR/eval_split.json``)."""
    from jaxpref.data import split as data_split

    rows = [_Row(int(r), f"row:{int(r)}") for r in table.rows]
    _, held, _ = data_split.hold_out(rows, fraction=fraction, seed=seed, source=source, limit=limit,
                                     run_dir=run_dir, resume=resume, write=jax.process_index() == 0)
    held_rows = {r.row for r in held}
    is_held = np.array([int(r) in held_rows for r in table.rows], bool)
    return subset_table(table, np.flatnonzero(~is_held)), subset_table(table, np.flatnonzero(is_held))


@dataclasses.dataclass
class WROEvaluator:
    """``eval/judge/win_rate`` (and ``eval/judge/value``) of a WRO policy on held-out prompts.

    Each eval samples ``samples_per_prompt`` responses per held-out prompt and judges them against the
    run's competitor exactly as a training step does (:meth:`jaxpref.training.wro.RolloutCollector.collect`),
    in batches of ``batch_size`` prompts (the training shapes; the last one is topped up with the first
    prompts again) with fixed sampling keys, so two evals differ only by the policy. The values are means
    over the batches.

    Attributes:
      collector: the held-out prompts' :class:`~jaxpref.training.wro.RolloutCollector`.
      batch_size: prompts per batch (``train.batch_size``).
      policy: ``params -> merged policy model``; reference: the merged reference model (or None).
      make_batch: ``(positions, key step) -> PromptBatch``.
    """

    collector: Any
    batch_size: int
    policy: Callable[[Any], Any]
    reference: Any
    make_batch: Callable[[np.ndarray, int], Any]
    postfix: str = "eval/judge/win_rate"
    compiles: int = 0
    KEY_OFFSET = 1 << 30  # sampling keys apart from the training steps'

    def __call__(self, step: int, state) -> dict[str, float]:
        n = len(self.collector.table)
        policy = self.policy(state.params)
        totals = {"judge/win_rate": 0.0, "judge/value": 0.0, "response_length": 0.0}
        batches = range(0, n, self.batch_size)
        with CompileWatch() as watch:
            for k, lo in enumerate(batches):
                pos = np.arange(lo, lo + self.batch_size) % n  # a full batch (the training shape); wraps around
                _, host = self.collector.collect(self.make_batch(pos, self.KEY_OFFSET + k), policy, self.reference)
                for name in totals:
                    totals[name] += host[name]
        self.compiles += watch.compiles
        return {**{f"{PREFIX}{k}": v / len(batches) for k, v in totals.items()}, "eval/prompts": n}
