"""Fast, exact preference training on the exact-oracle testbed (design.md §4), shared by the reproductions.

A run trains a policy over the testbed's K prompts × N responses on a sampled dataset of pairs
(:class:`jaxpref.data.synthetic.TestbedPairs`) with any jaxpref loss composition
(:func:`jaxpref.losses.compose`: DPO ``"sigmoid"``, ``"gamma_dpo"``, the ``rpo`` preset, ...) against a
frozen reference given as exact log-probs ``[K, N]``. The whole loop is one jitted program: a
``jax.lax.scan`` over record chunks, each an inner scan of ``record_every`` optimiser steps on
minibatches drawn epoch by epoch (a fresh seeded permutation of the M pairs per epoch). After every
chunk (and at step 0) the *exact* policy ``log π(y|x)`` for all (x, y) is recorded, so experiments get
exact ranking accuracy, win rate and KL trajectories without sampling.

Two policy classes (:class:`ExactPolicy`):

* :func:`lm_policy`: a tiny real jaxpref causal LM (``Testbed.init_model``; vocabulary = the alphabet, so
  its full softmax is the testbed's restricted one). Training steps score only the 2B minibatch
  sequences; the full ``[K, N]`` table is computed at record points.
* :func:`tabular_policy`: one free logit per (prompt, response) (:class:`jaxpref.data.synthetic.TabularPolicy`).

Runs vectorise with ``jax.vmap`` over any of (params, reference, data, key, hparams): ``vmap=[("params",
"ref_logps", "data", "key"), ("hparams",)]`` trains seeds × hyperparameter values in one program. Loss
hyperparameters (and term weights) that a sweep varies are passed as ``hparams={"<term key>.<field>":
values}``: each value is validated by the loss's own hparams record, then substituted as a traced scalar.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from flax import nnx

from jaxpref import losses
from jaxpref.config import OptimConfig
from jaxpref.data import synthetic
from jaxpref.data.synthetic import Testbed, TestbedPairs
from jaxpref.training.optim import make_optimizer

Array = jax.Array
TRAIN_ARGS = ("tables", "params", "ref_logps", "data", "key", "hparams")

__all__ = [
    "TestbedParams", "TrainConfig", "PairData", "ExactPolicy", "Trajectory", "lm_policy", "tabular_policy",
    "init_lm", "seed_stats", "train", "stack_trees", "trajectory_metrics", "auc",
]


# ------------------------------------------------------------------------------------ records


@dataclasses.dataclass(frozen=True)
class TestbedParams:
    """The testbed and tiny-Llama fields shared by the experiments' params records (Chen, Liu, Hu, Zhang).

    Subclasses add their own fields (all with defaults); the YAML ``params`` keys are these field names.

    Attributes:
      num_prompts, prompt_length, alphabet_size, response_length, testbed_seed: the testbed (N = A**L
        responses per prompt; :class:`jaxpref.data.synthetic.Testbed`).
      hidden_size, num_layers, num_heads, intermediate_size, init_std: the tiny Llama of
        ``Testbed.init_model`` (policy or reference).
    """

    __test__ = False  # a class attribute, not a field: keeps pytest from collecting ``Test*`` imports

    num_prompts: int = 8
    prompt_length: int = 3
    alphabet_size: int = 4
    response_length: int = 3
    testbed_seed: int = 0
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    init_std: float = 0.2

    def make_testbed(self) -> Testbed:
        """The exact-oracle testbed of these sizes."""
        return Testbed(num_prompts=self.num_prompts, prompt_length=self.prompt_length,
                       alphabet_size=self.alphabet_size, response_length=self.response_length, seed=self.testbed_seed)

    def model_kw(self) -> dict[str, Any]:
        """Keyword arguments of ``Testbed.init_model`` / :func:`init_lm` (``init_std`` and the model sizes)."""
        return {"init_std": self.init_std, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "num_heads": self.num_heads, "intermediate_size": self.intermediate_size}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a testbed run (hashable: part of the jit cache key).

    Attributes:
      steps: optimiser steps; a multiple of ``record_every``.
      batch_size: B pairs per step (B >= M means full-batch gradient descent on the M pairs).
      record_every: steps between exact records (the record at step 0 is the initial policy).
      optim: optimiser and schedule (:func:`jaxpref.training.optim.make_optimizer`); Chen et al. use
        RMSProp (``name="rmsprop", b2=0.99, eps=1e-8, clip_norm=None``).
    """

    steps: int = 500
    batch_size: int = 64
    record_every: int = 25
    optim: OptimConfig = OptimConfig(name="adam", lr=1e-3, clip_norm=None)

    def __post_init__(self):
        for name in ("steps", "batch_size", "record_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"TrainConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
        if self.steps % self.record_every:
            raise ValueError(f"TrainConfig.steps={self.steps} must be a multiple of record_every={self.record_every}")
        if not isinstance(self.optim, OptimConfig):
            raise TypeError(f"TrainConfig.optim must be a jaxpref.config.OptimConfig, got {type(self.optim).__name__}")

    @property
    def num_records(self) -> int:
        """Records including step 0: ``steps / record_every + 1``."""
        return self.steps // self.record_every + 1

    @property
    def record_steps(self) -> np.ndarray:
        """[R] int the optimiser step of each record (0, record_every, ..., steps)."""
        return np.arange(self.num_records) * self.record_every


@flax.struct.dataclass
class PairData:
    """The training pairs as device arrays (a pytree; stack several with :func:`stack_trees` to vmap).

    Attributes:
      prompt: [M] int32 prompt index.
      chosen: [M] int32 majority (chosen) response index.
      rejected: [M] int32 rejected response index.
      alpha: [M] float32 share of annotators preferring the chosen response (``LossInputs.votes``).
    """

    prompt: Array
    chosen: Array
    rejected: Array
    alpha: Array

    @classmethod
    def from_pairs(cls, pairs: TestbedPairs) -> PairData:
        return cls(prompt=jnp.asarray(pairs.prompt, jnp.int32), chosen=jnp.asarray(pairs.chosen, jnp.int32),
                   rejected=jnp.asarray(pairs.rejected, jnp.int32), alpha=jnp.asarray(pairs.alpha, jnp.float32))

    def __len__(self) -> int:
        return int(self.prompt.shape[-1])


@dataclasses.dataclass(frozen=True, eq=False)
class ExactPolicy:
    """A policy over the testbed's responses whose exact log-probs are cheap to compute.

    Hashed by identity (it is a static argument of the jitted trainer): build it once and reuse it.

    Attributes:
      kind: ``"lm"`` or ``"tabular"``.
      logps_fn: ``(params, tables) -> [K, N]`` exact log π(y|x).
      sequence_logps_fn: ``(params, tables, prompt [B], responses [B, J]) -> [B, J]`` log π of chosen entries.
      tables: arrays the functions read (token tables), passed to the jitted program as arguments.
      response_length: L, the token count of every response.
    """

    kind: str
    logps_fn: Callable[[Any, Any], Array]
    sequence_logps_fn: Callable[[Any, Any, Array, Array], Array]
    tables: Any
    response_length: int

    @functools.cached_property
    def _logps_jit(self):
        return jax.jit(self.logps_fn)

    def logps(self, params) -> Array:
        """[K, N] exact log π of ``params`` (jitted once per policy)."""
        return self._logps_jit(params, self.tables)


@flax.struct.dataclass
class Trajectory:
    """What a run records; with vmap every field gains the vmapped leading axes.

    Attributes:
      logps: [R, K, N] exact policy log-probs at each record (R = steps / record_every + 1), or whatever
        ``record_fn`` returned.
      param_sq_dist: [R] ``||θ_t − θ_0||²`` summed over all parameters.
      loss: [R] mean training minibatch loss over the chunk ending at each record (NaN at step 0).
      params: the final parameters.
    """

    logps: Any
    param_sq_dist: Array
    loss: Array
    params: Any


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structure pytrees (params, :class:`PairData`, ...) along a new leading axis (for vmap)."""
    if not trees:
        raise ValueError("stack_trees needs at least one tree")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


# ------------------------------------------------------------------------------------ policies


def _lm_logps_of_tokens(graphdef, params, rest, tokens: Array, prompt_length: int) -> Array:
    """[S, P+L] testbed tokens -> [S] summed response log-probs of the LM (vocabulary = alphabet)."""
    model = nnx.merge(graphdef, params, rest)
    hidden = model(tokens).hidden[:, prompt_length - 1: -1]  # position t-1 predicts token t
    logp = jax.nn.log_softmax(model.logits(hidden), axis=-1)  # [S, L, A] float32
    return jnp.take_along_axis(logp, tokens[:, prompt_length:, None], axis=-1)[..., 0].sum(-1)


def lm_policy(model, testbed: Testbed) -> tuple[ExactPolicy, Any]:
    """``(policy, params)`` for a jaxpref causal LM whose vocabulary is the testbed alphabet.

    ``model`` is e.g. ``testbed.init_model(seed)``; ``params`` is its ``nnx.Param`` state (the trainable
    part). Models of the same structure share the returned policy: train other seeds' params with it.
    Log-probs equal :func:`jaxpref.data.synthetic.response_logps` (the tokens are fed as table arguments,
    not compile-time constants).
    """
    if model.config.vocab_size != testbed.config.alphabet_size:
        raise ValueError(f"lm_policy needs vocab_size == alphabet_size = {testbed.config.alphabet_size} "
                         f"(Testbed.model_config), got vocab_size={model.config.vocab_size}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    p = testbed.config.prompt_length
    tables = {"prompts": jnp.asarray(testbed.prompts), "responses": jnp.asarray(testbed.responses)}

    def tokens_of(tables, prompt, responses):  # [B], [B, J] -> [B*J, P+L]
        b, j = responses.shape
        pr = jnp.broadcast_to(tables["prompts"][prompt][:, None, :], (b, j, p))
        return jnp.concatenate([pr, tables["responses"][responses]], axis=-1).reshape(b * j, -1)

    def sequence_logps_fn(params, tables, prompt, responses):
        lp = _lm_logps_of_tokens(graphdef, params, rest, tokens_of(tables, prompt, responses), p)
        return lp.reshape(responses.shape)

    def logps_fn(params, tables):
        k, n = tables["prompts"].shape[0], tables["responses"].shape[0]
        prompt = jnp.arange(k, dtype=jnp.int32)
        every = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (k, n))
        return sequence_logps_fn(params, tables, prompt, every)

    policy = ExactPolicy("lm", logps_fn, sequence_logps_fn, tables, testbed.config.response_length)
    return policy, params


def tabular_policy(testbed: Testbed, logps_init=None) -> tuple[ExactPolicy, Array]:
    """``(policy, params [K, N])`` of :class:`jaxpref.data.synthetic.TabularPolicy` (init: ``logps_init``/uniform)."""
    table = synthetic.TabularPolicy.for_testbed(testbed)

    def logps_fn(params, tables):
        del tables
        return table.logps(params)

    def sequence_logps_fn(params, tables, prompt, responses):
        del tables
        return jnp.take_along_axis(table.logps(params)[prompt], responses, axis=-1)

    policy = ExactPolicy("tabular", logps_fn, sequence_logps_fn, None, testbed.config.response_length)
    return policy, table.init(logps_init)


def init_lm(testbed: Testbed, seed: int, *, head_scale: float = 1.0, init_std: float = 0.2, **model_kw):
    """``testbed.init_model(seed)`` with its (untied) output head multiplied by ``head_scale``.

    A random LM at temperature ``1 / head_scale``: ``head_scale > 1`` makes π(·|x) peaked, so reference
    log-ratios between responses grow (real LMs give preference pairs log-ratios of tens of nats).
    """
    if not head_scale > 0:
        raise ValueError(f"head_scale must be > 0, got {head_scale}")
    model = testbed.init_model(seed, init_std=init_std, **model_kw)
    if model.config.tie_word_embeddings:
        raise ValueError("init_lm: head_scale needs an untied output head (tie_word_embeddings=False)")
    model.lm_head_dv.set_value(model.lm_head_dv[...] * head_scale)
    return model


# ------------------------------------------------------------------------------------ training


def _split_hparam_key(comp: losses.Composition, name: str) -> tuple[int, str]:
    key, _, field = name.partition(".")
    index = next((i for i, t in enumerate(comp.terms) if t.key == key), None)
    if index is None or not field:
        raise ValueError(f"hparams key {name!r}: expected '<term key>.<field>' with a term key among "
                         f"{[t.key for t in comp.terms]}")
    fields = {f.name for f in dataclasses.fields(comp.terms[index].hparams)} | {"weight"}
    if field not in fields:
        raise ValueError(f"hparams key {name!r}: term {key!r} ({comp.terms[index].name}) has fields {sorted(fields)}")
    return index, field


def _check_hparam_values(comp: losses.Composition, hparams: Mapping[str, Any]) -> None:
    """Validates every concrete swept value with the loss's own hparams record (range checks, types)."""
    for name, values in hparams.items():
        index, field = _split_hparam_key(comp, name)
        t = comp.terms[index]
        for v in np.asarray(values, np.float64).reshape(-1):
            if field == "weight":
                losses.term(t.name, float(v), t.key, **{f.name: getattr(t.hparams, f.name)
                                                       for f in dataclasses.fields(t.hparams)})
            else:
                current = getattr(t.hparams, field)
                value = type(current)(v) if isinstance(current, int | float) and not isinstance(current, bool) else v
                dataclasses.replace(t.hparams, **{field: value})


def _with_hparams(comp: losses.Composition, hparams: Mapping[str, Array]) -> losses.Composition:
    """A copy of ``comp`` whose named fields hold the (traced) scalars of ``hparams`` (values pre-validated)."""
    terms = list(comp.terms)
    for name, value in hparams.items():
        index, field = _split_hparam_key(comp, name)
        t = terms[index]
        if field == "weight":
            terms[index] = _replace_frozen(t, weight=value)
        else:
            terms[index] = _replace_frozen(t, hparams=_replace_frozen(t.hparams, **{field: value}))
    return losses.Composition(tuple(terms))


def _replace_frozen(obj, **fields):
    """A shallow copy of a frozen dataclass with ``fields`` set, skipping ``__post_init__`` (tracers pass)."""
    new = copy.copy(obj)
    for name, value in fields.items():
        object.__setattr__(new, name, value)
    return new


def _epoch_batches(key: Array, num_pairs: int, steps: int, batch_size: int) -> Array:
    """[steps, B] pair indices: consecutive batches of fresh per-epoch permutations (full batch if B >= M)."""
    if batch_size >= num_pairs:
        return jnp.broadcast_to(jnp.arange(num_pairs, dtype=jnp.int32), (steps, num_pairs))
    epochs = -(-steps * batch_size // num_pairs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, num_pairs))(jax.random.split(key, epochs))
    return perms.reshape(-1)[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def _train_impl(policy: ExactPolicy, comp: losses.Composition, config: TrainConfig, record_fn, tables, params,
                ref_logps, data: PairData, key, hparams):
    comp = _with_hparams(comp, hparams or {})
    opt, _ = make_optimizer(config.optim, config.steps)
    tokens = float(policy.response_length)
    batches = _epoch_batches(key, data.prompt.shape[0], config.steps, config.batch_size)
    batches = batches.reshape(config.num_records - 1, config.record_every, -1)
    params0 = params

    def loss_fn(p, idx):
        prompt = data.prompt[idx]
        responses = jnp.stack([data.chosen[idx], data.rejected[idx]], axis=1)  # [B, 2]
        lp = policy.sequence_logps_fn(p, tables, prompt, responses)
        ref = ref_logps[prompt[:, None], responses]
        count = jnp.full(prompt.shape, tokens, jnp.float32)
        inputs = losses.LossInputs(policy_chosen_logps=lp[:, 0], policy_rejected_logps=lp[:, 1],
                                   reference_chosen_logps=ref[:, 0], reference_rejected_logps=ref[:, 1],
                                   chosen_tokens=count, rejected_tokens=count, votes=data.alpha[idx])
        return comp(inputs)[0]

    def step(carry, idx):
        p, opt_state = carry
        value, grads = jax.value_and_grad(loss_fn)(p, idx)
        updates, opt_state = opt.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), value

    def record(p):
        dist = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params0)))
        return record_fn(policy.logps_fn(p, tables)), dist

    def chunk(carry, chunk_batches):
        carry, values = jax.lax.scan(step, carry, chunk_batches)
        rec, dist = record(carry[0])
        return carry, (rec, dist, jnp.mean(values))

    (final, _), (recs, dists, chunk_losses) = jax.lax.scan(chunk, (params, opt.init(params)), batches)
    rec0, dist0 = record(params)
    logps = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), rec0, recs)
    return Trajectory(logps=logps, param_sq_dist=jnp.concatenate([dist0[None], dists]),
                      loss=jnp.concatenate([jnp.full((1,), jnp.nan), chunk_losses]), params=final)


def _identity(logps):
    return logps


@functools.lru_cache(maxsize=32)
def _compiled(policy, comp, config, record_fn, vmap_levels):
    fn = functools.partial(_train_impl, policy, comp, config, record_fn)
    for level in vmap_levels:  # innermost first
        fn = jax.vmap(fn, in_axes=tuple(0 if name in level else None for name in TRAIN_ARGS))
    return jax.jit(fn)


def train(policy: ExactPolicy, loss, config: TrainConfig, params, ref_logps, data: PairData | TestbedPairs,
          key, hparams: Mapping[str, Any] | None = None, *, vmap: Sequence[Sequence[str]] = (),
          record_fn: Callable[[Array], Any] | None = None) -> Trajectory:
    """Trains ``params`` on ``data`` with ``loss`` against the frozen ``ref_logps``; one jitted program.

    Args:
      policy: from :func:`lm_policy` / :func:`tabular_policy` (reuse the object: it keys the jit cache).
      loss: a :class:`jaxpref.losses.Composition` or a spec for :func:`jaxpref.losses.compose`
        (e.g. ``{"name": "sigmoid", "beta": 0.1}``, ``{"name": "rpo", "beta": 0.1, "eta": 1.0}``).
      config: :class:`TrainConfig`.
      params: initial parameters (also the origin of ``param_sq_dist``).
      ref_logps: [K, N] exact reference log-probs (usually ``policy.logps(params)``: π_ref = initial policy).
      data: the M training pairs.
      key: PRNG key of the minibatch order.
      hparams: ``{"<term key>.<field>": value}`` substituted into the composition as traced scalars
        (``"gamma_dpo.gamma"``, ``"nll_sum.weight"``, ...), so one program serves a sweep via ``vmap``.
        Every value is validated by the loss's hparams record first. Only fields the loss uses
        arithmetically can be swept.
      vmap: vmap levels, innermost first; each names the arguments (``params``, ``ref_logps``, ``data``,
        ``key``, ``hparams``) that carry a leading axis at that level.
      record_fn: ``[K, N] log π -> pytree`` recorded instead of the full table (e.g. a few metrics).

    Returns:
      :class:`Trajectory` with records at ``config.record_steps``; vmapped axes lead, outermost first.
    """
    comp = loss if isinstance(loss, losses.Composition) else losses.compose(loss)
    hparams = dict(hparams or {})
    _check_hparam_values(comp, hparams)
    levels = tuple(tuple(level) for level in vmap)
    for level in levels:
        unknown = set(level) - set(TRAIN_ARGS[1:])
        if unknown or not level:
            raise ValueError(f"vmap level {list(level)}: name one or more of {list(TRAIN_ARGS[1:])}")
    if isinstance(data, TestbedPairs):
        data = PairData.from_pairs(data)
    hparams = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
    fn = _compiled(policy, comp, config, record_fn or _identity, levels)
    return fn(policy.tables, params, jnp.asarray(ref_logps, jnp.float32), data, key, hparams)


# ------------------------------------------------------------------------------------ exact metrics


@jax.jit
def trajectory_metrics(logps, ref_logps, pref, data: PairData) -> dict[str, Array]:
    """Exact metrics of every record: ``logps [..., K, N]`` -> dict of ``[...]`` arrays.

    Keys: ``ranking_accuracy`` (Chen Def. 2.3 on ``data``, ties correct), ``win_rate`` (exact, vs the
    reference, under ``pref``), ``kl`` (mean over prompts of KL(π || π_ref)), ``chosen_logps`` /
    ``rejected_logps`` (mean log π over the pairs). ``ref_logps [K, N]`` and ``data`` are shared.
    """
    def one(lp):
        chosen, rejected = lp[data.prompt, data.chosen], lp[data.prompt, data.rejected]
        return {"ranking_accuracy": jnp.mean((chosen >= rejected).astype(jnp.float32)),
                "win_rate": synthetic.win_rate(lp, ref_logps, pref),
                "kl": synthetic.mean_kl(lp, ref_logps),
                "chosen_logps": jnp.mean(chosen), "rejected_logps": jnp.mean(rejected)}

    flat = logps.reshape((-1,) + logps.shape[-2:])
    out = jax.lax.map(one, flat)
    return {k: v.reshape(logps.shape[:-2]) for k, v in out.items()}


def seed_stats(values) -> tuple[float, float, float]:
    """``(mean, sd, se)`` of per-seed values (NaNs dropped; sd with ddof 1, 0 for one value; se = sd / √n)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), sd, sd / float(np.sqrt(v.size))


def auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann–Whitney U, ties half); NaN if one class."""
    scores, labels = np.asarray(scores, np.float64).reshape(-1), np.asarray(labels, bool).reshape(-1)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
