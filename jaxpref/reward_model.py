"""Bradley-Terry reward models: a linear head on a ported backbone, training, and use as a win-rate judge.

The reward of a sequence ``x + y (+ EOS)`` is ``r = ⟨w, h_last⟩ + b`` with ``h_last [D]`` the final hidden
state (post final norm) at the last non-padding position, ``w`` a learned ``[D]`` vector and ``b`` a
scalar (TRL's ``AutoModelForSequenceClassification`` with one label, read at the last token). Training
minimises the Bradley-Terry loss ``−log σ(r_w − r_l)`` (= ``softplus(−(r_w − r_l))``) over preference
pairs; the logged metrics follow TRL's ``RewardTrainer``: ``loss``, ``accuracy`` (share of pairs with
``r_w > r_l``), ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``.

Training (``python -m train.reward_model``) reuses the preference pipeline: the same
:class:`~jaxpref.config.RunConfig` (``loss`` is ignored; the objective is fixed), data loading and
tokenisation (:func:`jaxpref.training.loop.load_data`), batch iterator, optimizer, train-state,
Orbax checkpointer and metrics writer, and writes a run directory like ``train.preference`` (with
``model.json`` marking ``"reward_model": true``). The backbone may be any model spec (``preset:``,
``hf:``, ``run:`` ...).

With a ``lora:`` section the backbone's adapters (:mod:`jaxpref.training.adapters`) and the head train and are
checkpointed; the backbone is frozen, rebuilt from ``model.json``'s ``lora`` record on loading.

As a judge (``rm:RUN_DIR[@STEP]``), :class:`RewardModelJudge` tokenises ``(prompt, a, b)`` with the
run's tokenisation settings and returns ``P(a ≻ b) = σ(r(a) − r(b))``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref import logprobs, models, parallel
from jaxpref.config import RunConfig, load_config, to_dict
from jaxpref.data.formats import PreferenceRecord
from jaxpref.data.tokenize import tokenize_pairs
from jaxpref.loading import SpecError, load_tokenizer, parse_run_spec, single_device_target
from jaxpref.models import lora
from jaxpref.training import adapters, loop, optim
from jaxpref.training import checkpoint as ckpt
from jaxpref.training import step as steplib
from jaxpref.training.eval_during import RewardEvaluator
from jaxpref.training.logging import progress_bar
from jaxpref.types import PairBatch

log = logging.getLogger(__name__)

Array = jax.Array
# what a LoRA reward model trains: the backbone's adapters and the scalar head
TRAINED_WITH_LORA = nnx.Any(nnx.LoRAParam, nnx.PathContains("score_d"), nnx.PathContains("score_bias"))


class RewardModel(nnx.Module):
    """A causal-LM backbone plus a scalar head read at the last non-padding position.

    Attributes:
      backbone: the jaxpref causal LM (its unembedding is unused).
      score_d: ``[D]`` head weights (logical axis ``embed``), init ``N(0, 1/D)``.
      score_bias: ``[]`` head bias, init 0.
    """

    def __init__(self, backbone, *, seed: int = 0):
        self.backbone = backbone
        self.config = backbone.config
        d = backbone.config.hidden_size
        w = jax.random.normal(jax.random.key(seed), (d,), jnp.float32) / math.sqrt(d)
        self.score_d = parallel.logical_param(w, ("embed",))
        self.score_bias = parallel.logical_param(jnp.zeros((), jnp.float32), ())

    def __call__(self, input_ids: Array, *, positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        """``[N]`` float32 rewards of right-padded ``[N, T]`` sequences (``segment_ids`` 0 = padding)."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        hidden = self.backbone(input_ids, positions=positions, segment_ids=segment_ids).hidden
        last = logprobs.last_hidden(hidden, segment_ids)  # [N, D] float32
        return last @ self.score_d[...].astype(jnp.float32) + self.score_bias[...].astype(jnp.float32)


def pair_rewards(graphdef, params, rest, batch: PairBatch) -> Array:
    """``[B, 2]`` rewards of chosen and rejected in one forward of ``[2B, T]``."""
    b, two, t = batch.input_ids.shape
    flat = lambda x: x.reshape(b * two, t)
    model = steplib.merge_model(graphdef, params, rest)
    r = model(flat(batch.input_ids), positions=flat(batch.positions), segment_ids=flat(batch.segment_ids))
    return r.reshape(b, two)


def bt_metrics(rewards: Array, mask: Array) -> tuple[Array, dict[str, Array]]:
    """Masked mean BT loss ``softplus(−(r_w − r_l))`` and TRL-named metrics of ``[B, 2]`` rewards."""
    keep = mask.astype(jnp.float32)
    n = jnp.maximum(keep.sum(), 1.0)
    margin = rewards[:, 0] - rewards[:, 1]
    mean = lambda x: jnp.sum(x * keep) / n
    loss = mean(jax.nn.softplus(-margin))
    return loss, {"accuracy": mean((margin > 0).astype(jnp.float32)), "rewards/chosen": mean(rewards[:, 0]),
                  "rewards/rejected": mean(rewards[:, 1]), "rewards/margins": mean(margin)}


def make_reward_step(graphdef, rest, optimizer: optax.GradientTransformation, *, micro_batches: int = 1,
                     nan_policy: str = "skip", frozen_base: bool = False, lora_dropout: float = 0.0) -> Callable:
    """``step(state, batch) -> (state, metrics)`` minimising the BT loss, with exact accumulation.

    Each micro-batch contributes ``sum(loss) / n_valid(full batch)``, so ``k`` micro-batches give the
    full batch's loss and gradients. ``frozen_base`` (LoRA): ``step(state, base, batch)`` with ``state.params``
    the adapters and the head (:data:`TRAINED_WITH_LORA`), ``base`` the frozen backbone (non-donated, not
    differentiated) and ``lora_dropout`` the adapter dropout (:func:`jaxpref.training.step.make_preference_step`).
    """
    dropping = frozen_base and lora_dropout > 0

    def step(state: steplib.TrainState, batch: PairBatch, base=None):
        n_valid = jnp.maximum(batch.example_mask.sum(), 1).astype(jnp.float32)

        def micro_loss(params, mb: PairBatch, key=None):
            params = params if base is None else nnx.merge_state(params, base)
            with lora.dropout(jax.random.fold_in(key, 0), lora_dropout) if dropping else contextlib.nullcontext():
                r = pair_rewards(graphdef, params, rest, mb)
            loss, metrics = bt_metrics(r, mb.example_mask)
            w = mb.example_mask.sum().astype(jnp.float32) / n_valid  # micro-batch mean -> share of the batch
            return loss * w, {k: v * w for k, v in metrics.items()}

        loss, metrics, grads = steplib.accumulate_gradients(micro_loss, state.params, (batch,), micro_batches,
                                                            key=steplib.step_key(state) if dropping else None)
        new_state, norms = steplib._apply(state, grads, loss, optimizer, nan_policy, {})
        metrics = {**metrics, **norms, "loss": loss, "tokens": (batch.segment_ids != 0).sum().astype(jnp.float32),
                   "pairs": batch.example_mask.sum().astype(jnp.float32)}
        return new_state, metrics

    return (lambda state, base, batch: step(state, batch, base)) if frozen_base else step


_eval_rewards = jax.jit(pair_rewards, static_argnums=0)


def score_reward_pairs(model: RewardModel, pairs, *, batch_size: int = 8, buckets: Sequence[int] | None = None,
                       mesh=None, progress: bool = False) -> np.ndarray:
    """``[N, 2]`` float32 rewards of tokenised pairs (dataset order)."""
    from jaxpref.evaluation import iterate_pair_batches

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = np.zeros((len(pairs), 2), np.float32)
    bar = progress_bar(math.ceil(len(pairs) / batch_size), enabled=progress, desc="rewards")
    try:
        for idx, batch in iterate_pair_batches(pairs, batch_size=batch_size, buckets=buckets, mesh=mesh):
            out[idx] = np.asarray(jax.device_get(_eval_rewards(graphdef, params, rest, batch)))[: len(idx)]
            bar.update(1)
    finally:
        bar.close()
    return out


# ------------------------------------------------------------------------------------ training


def run_reward_training(cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    """Trains a BT reward model (module docstring); returns the summary dict (also ``summary.json``)."""
    parallel.maybe_initialize_distributed()
    adapters.check_supported(cfg, "reward", loop.RunError)
    try:
        mesh = parallel.make_mesh(cfg.mesh)
    except ValueError as err:
        raise loop.RunError(f"{err} (jax sees {jax.device_count()} devices)") from None
    if cfg.train.batch_size % cfg.train.micro_batches:
        raise loop.RunError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                            f"train.micro_batches={cfg.train.micro_batches}")
    setup = loop.setup_run(cfg, mesh, resume=resume,
                           extra_meta={"reward_model": {"head": "linear_last_token", "loss": "bradley_terry"}})
    run_dir, tokenizer = setup.run_dir, setup.tokenizer

    datasets = loop.load_datasets(cfg, tokenizer, run_dir, "preference", resume=resume)
    data, data_summary = datasets.train, datasets.summary
    steps = loop.total_steps(cfg, len(data))
    lora_parts = None if cfg.lora is None else adapters.attach_for_run(cfg, setup, mesh)  # on the backbone
    rm = RewardModel(setup.loaded.model, seed=cfg.train.seed)
    base = None
    if lora_parts is None:
        graphdef, params, rest = steplib.split_model(rm)
    else:  # the adapters and the head train; the frozen backbone is the step's non-donated base
        graphdef, params, base, rest = nnx.split(rm, TRAINED_WITH_LORA, nnx.Param, ...)
        params, base = parallel.place_params(params, mesh), parallel.place_params(base, mesh)
    eval_rest = rest if base is None else nnx.merge_state(base, rest)
    optimizer, schedule = optim.make_optimizer(cfg.optim, steps)
    state = steplib.build_state(params, optimizer, cfg.train.seed, mesh)
    it = loop.open_iterator(cfg, data)
    checkpointer, state, start = loop.open_checkpoints(cfg, run_dir, state, it, resume)
    evaluator = None
    if datasets.eval is not None:  # held-out pairs (data.eval / data.eval_split) every train.eval_every steps
        evaluator = RewardEvaluator(lambda p: score_reward_pairs(
            nnx.merge(graphdef, p, eval_rest), datasets.eval, batch_size=cfg.train.eval_batch_size,
            buckets=tuple(cfg.data.buckets), mesh=mesh), len(datasets.eval))

    fn = loop.make_train_step(cfg, "reward", graphdef, rest, optimizer,
                              base_graphdef=None if lora_parts is None else lora_parts["base_graphdef"])
    state_sh = parallel.tree_shardings(state)
    base_sh = None if base is None else parallel.tree_shardings(base)
    jitted = loop.per_shape(lambda batch: loop.jit_train_step(fn, "reward", mesh, state_sh, batch, ref_sh=base_sh))

    def call(state, placed):
        return jitted(placed)(state, placed) if base is None else jitted(placed)(state, base, placed)

    result = loop.run_steps(cfg, run_dir, state=state, it=it, checkpointer=checkpointer, call=call, steps=steps,
                            start=start, resume=resume, schedule=schedule, ckpt_meta={"config": to_dict(cfg)},
                            desc="reward model", postfix=("loss", "accuracy"),
                            place=lambda batch: parallel.shard_batch(batch, mesh), evaluator=evaluator)
    state, last = result.state, result.last
    summary = {"steps": steps, "resumed_from": start, "final_metrics": last, "data": data_summary,
               "skipped_updates": int(state.skipped), "seconds": result.seconds, **result.timing(),
               **result.eval_summary()}
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ------------------------------------------------------------------------------------ loading and judging


def load_reward_model(spec: str, *, mesh=None) -> tuple[RewardModel, Any, RunConfig]:
    """``(model, tokenizer, run config)`` of a reward-model run ``RUN_DIR[@STEP]`` (latest step by default)."""
    run_dir, step = parse_run_spec(spec)
    meta_path = run_dir / "model.json"
    if not meta_path.is_file():
        raise SpecError(f"reward model {spec!r}: {run_dir} has no model.json (is it a jaxpref run directory?)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("reward_model"):
        raise SpecError(f"reward model {spec!r}: {run_dir} is not a reward-model run (train it with "
                        "python -m train.reward_model)")
    if "lora" in meta:  # the recorded backbone rebuilt with fresh adapters; the checkpoint holds adapters + head
        rm = RewardModel(adapters.rebuild(meta["lora"], mesh=mesh).model)
        graphdef, params, rest = nnx.split(rm, TRAINED_WITH_LORA, ...)
    else:
        config = models.ModelConfig.from_hf_config(meta["hf_config"])
        rm = RewardModel(models.abstract_model(config) if mesh is None else models.build_model(config, rngs=0))
        graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    params = single_device_target(params) if mesh is None else parallel.place_params(params, mesh)
    params, _ = ckpt.restore_params(run_dir / "checkpoints", params, step)
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    return nnx.merge(graphdef, params, rest), load_tokenizer(meta.get("tokenizer")), cfg


class RewardModelJudge:
    """``judge(prompts, a, b) -> [N] σ(r(a) − r(b))`` from a reward-model run (``rm:RUN_DIR[@STEP]``).

    Pairs the tokeniser rejects (e.g. ``a == b`` after truncation) get 0.5.
    """

    def __init__(self, spec: str, *, batch_size: int = 8, mesh=None):
        self.model, self.tokenizer, self.cfg = load_reward_model(spec, mesh=mesh)
        self.batch_size, self.mesh = batch_size, mesh

    def rewards(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """``[N, 2]`` rewards of ``(prompt, a)`` and ``(prompt, b)``; NaN for rejected pairs."""
        records = [PreferenceRecord(row=i, id=str(i), prompt=p, chosen=x, rejected=y)
                   for i, (p, x, y) in enumerate(zip(prompts, a, b, strict=True))]
        pairs = tokenize_pairs(records, self.tokenizer, loop.tokenize_config(self.cfg))
        out = np.full((len(records), 2), np.nan, np.float32)
        if len(pairs):
            r = score_reward_pairs(self.model, pairs, batch_size=self.batch_size, mesh=self.mesh)
            out[pairs.row] = r
        return out

    def __call__(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        r = self.rewards(prompts, a, b)
        p = 1.0 / (1.0 + np.exp(-(r[:, 0].astype(np.float64) - r[:, 1])))
        return np.where(np.isnan(p), 0.5, p)
