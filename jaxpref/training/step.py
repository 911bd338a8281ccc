"""The pure train steps: preference (any loss composition) and SFT, with exact accumulation.

Both steps are built once per run by :func:`make_preference_step` / :func:`make_sft_step` and
jitted once by :func:`jit_step` with explicit in/out shardings and the train state donated.
The reference parameters are a separate, non-donated argument (or ``None`` when reference
log-probs are precomputed or the loss is reference-free) and are never differentiated.

Gradient accumulation (style R13): the batch ``[B, ...]`` is split into ``k`` micro-batches of
strided rows (row ``i`` goes to micro-batch ``i % k``, so each micro-batch stays spread over the
data-parallel devices) and scanned with ``lax.scan``. Every loss term's batch value is
``sum(numerator) / sum(denominator)`` with denominators that depend only on token counts, so
the denominators of the *whole* batch are computed first and each micro-batch contributes
``numerator / global_denominator``: the accumulated loss and gradients equal the full batch's.

Reference samples (TYPO's unsupervised term): when a term needs ``LossInputs.reference_sample_logps``
(:func:`jaxpref.training.reference_samples.needs_reference_samples`), ``batch.ref_samples`` holds
``S`` reference responses per pair; the policy scores them in the same differentiated loss (one more
forward of ``[B*S, T']``) and the per-pair mean over the ``S`` samples enters the loss. They are
part of the batch pytree, so micro-batches split them with their pairs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref import logprobs, parallel
from jaxpref.losses import Composition, LossInputs
from jaxpref.models import lora
from jaxpref.training.reference_samples import needs_reference_samples
from jaxpref.types import PackedPairBatch, PairBatch, ReferenceSampleBatch, SFTBatch

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed).

    Attributes:
      step: [] int32 optimizer steps taken.
      params: policy parameters (an ``nnx.State`` of ``nnx.Param``).
      opt_state: optax state.
      rng: [2] uint32 raw PRNG key data of ``train.seed`` (LoRA adapter dropout: :func:`step_key`).
      bco_delta: [] float32 running mean of BCO rewards (TRL's RunningMoments; unused otherwise).
      skipped: [] int32 updates skipped by the NaN guard.
    """

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    bco_delta: Array
    skipped: Array


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        bco_delta=jnp.zeros((), jnp.float32),
        skipped=jnp.zeros((), jnp.int32),
    )


def split_model(model: nnx.Module):
    """``(graphdef, params, rest)``: trainable ``nnx.Param`` state apart from everything else."""
    return nnx.split(model, nnx.Param, ...)


def merge_model(graphdef, params, rest) -> nnx.Module:
    """The model of :func:`split_model`'s parts, for use inside a traced (differentiated) step.

    The merge copies the variables (``copy=True``): without it the model reuses the ``nnx.Variable``
    objects JAX unflattened the params into, which belong to an outer trace, and a rematerialised layer
    (``model.remat``, ``nnx.remat``) then fails with "Cannot mutate Param from a different trace level".
    """
    return nnx.merge(graphdef, params, rest, copy=True)


def forward_logps(graphdef, params, rest, input_ids, segment_ids, positions, loss_mask, *, seq_chunk, vocab_chunk,
                  right_padded: bool = False):
    """Summed response log-probs of ``[N, T]`` sequences in one forward pass.

    ``right_padded``: the rows are the padded layout of :mod:`jaxpref.data.batching` (one sequence
    from slot 0, then padding), which lets kernel attention backends that take lengths serve them.

    Returns:
      :class:`jaxpref.logprobs.SequenceLogProbs` with ``[N]`` sums / counts / means.
    """
    model = merge_model(graphdef, params, rest)
    out = model(input_ids, positions=positions, segment_ids=segment_ids, right_padded=right_padded)
    matrix, layout = model.unembedding()
    return logprobs.sequence_logprobs(out.hidden, matrix, input_ids, loss_mask, layout=layout,
                                      seq_chunk=seq_chunk, vocab_chunk=vocab_chunk,
                                      softcap=model.config.final_logit_softcap)


def pair_logps(graphdef, params, rest, batch: PairBatch, **chunks) -> tuple[Array, Array]:
    """Chosen and rejected in ONE forward of ``[2B, T]``: returns ``(sums [B, 2], counts [B, 2])``."""
    b, two, t = batch.input_ids.shape
    flat = lambda x: x.reshape(b * two, t)
    lp = forward_logps(graphdef, params, rest, flat(batch.input_ids), flat(batch.segment_ids),
                       flat(batch.positions), flat(batch.loss_mask), right_padded=True, **chunks)
    return lp.sums.reshape(b, two), lp.counts.reshape(b, two)


def packed_pair_logps(graphdef, params, rest, batch: PackedPairBatch, *, num_segments: int,
                      **chunks) -> tuple[Array, Array]:
    """Packed pairs: ONE forward of the ``[R, T]`` rows and ONE chunked log-prob pass, summed per
    segment (:func:`jaxpref.logprobs.segment_logprobs`) and gathered by ``batch.pair_segments``.
    Shared-prompt rows (``batch.branch_ids``) compute each prompt once per pair.

    Args:
      num_segments: ``2 B + 1`` of the *whole* batch (segment ids are global batch slots, also
        inside a micro-batch).

    Returns:
      ``(sums [B, 2], counts [B, 2])`` as :func:`pair_logps` (0 for padding pairs).
    """
    model = merge_model(graphdef, params, rest)
    branch = {} if batch.branch_ids is None else {"branch_ids": batch.branch_ids}  # shared-prompt rows
    out = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids, **branch)
    matrix, layout = model.unembedding()
    lp = logprobs.segment_logprobs(out.hidden, matrix, batch.input_ids, batch.loss_mask, batch.segment_ids,
                                   batch.branch_ids, num_segments=num_segments, layout=layout,
                                   softcap=model.config.final_logit_softcap, **chunks)
    return lp.sums[batch.pair_segments], lp.counts[batch.pair_segments]


def batch_pair_logps(graphdef, params, rest, batch: PairBatch | PackedPairBatch, *, num_segments: int | None = None,
                     **chunks) -> tuple[Array, Array]:
    """:func:`pair_logps` or :func:`packed_pair_logps` by batch type: ``(sums [B, 2], counts [B, 2])``."""
    if isinstance(batch, PackedPairBatch):
        return packed_pair_logps(graphdef, params, rest, batch, num_segments=num_segments or batch.num_segments,
                                 **chunks)
    return pair_logps(graphdef, params, rest, batch, **chunks)


def pair_counts(batch: PairBatch | PackedPairBatch) -> Array:
    """[B, 2] float32 response (target) tokens of chosen and rejected, padded or packed."""
    if isinstance(batch, PackedPairBatch):
        per_segment = logprobs.segment_counts(batch.loss_mask, batch.segment_ids, batch.num_segments,
                                              batch.branch_ids)
        return per_segment[batch.pair_segments]
    return batch.loss_mask[..., 1:].sum(-1).astype(jnp.float32)


def reference_sample_logps(graphdef, params, rest, samples: ReferenceSampleBatch, **chunks) -> tuple[Array, Array]:
    """Policy log-probs of the reference samples in one forward of ``[B*S, T]``.

    Returns:
      ``(sums [B], counts [B])``: the summed response log-prob and the response token count, each
      averaged over the ``S`` samples of a pair (the Monte-Carlo estimate of ``E_{y~π_ref}[log πθ(y|x)]``).
    """
    b, s, t = samples.input_ids.shape
    flat = lambda x: x.reshape(b * s, t)
    lp = forward_logps(graphdef, params, rest, flat(samples.input_ids), flat(samples.segment_ids),
                       flat(samples.positions), flat(samples.loss_mask), right_padded=True, **chunks)
    return lp.sums.reshape(b, s).mean(1), lp.counts.reshape(b, s).mean(1)


def _split_micro(tree, k: int):
    """[B, ...] leaves -> [k, B/k, ...] with strided rows (row i -> micro-batch i % k)."""

    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={k}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, tree)


def accumulate_gradients(micro_loss: Callable, params, args: tuple, micro_batches: int, key=None):
    """``(loss, aux, grads)`` of ``micro_loss(params, *args) -> (loss, aux)`` summed over micro-batches.

    Each micro-batch returns its share of the batch loss (and of every aux metric), so the sums equal
    the full-batch values; ``micro_batches > 1`` splits every ``[B, ...]`` leaf of ``args`` with
    :func:`_split_micro` and accumulates gradients in a ``lax.scan`` (one micro-batch of activations
    live at a time). With a PRNG ``key``, micro-batch ``i`` gets ``fold_in(key, i)`` as ``micro_loss``'s
    last argument (LoRA adapter dropout: each micro-batch its own masks).
    """
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(micro_batches))
    if micro_batches == 1:
        (loss, aux), grads = grad_fn(params, *args, *(() if keys is None else (keys[0],)))
        return loss, aux, grads
    mbs = _split_micro(args, micro_batches)
    mbs = mbs if keys is None else (*mbs, keys)

    def body(carry, xs):
        g_acc, l_acc, a_acc = carry
        (l, a), g = grad_fn(params, *xs)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, a_acc, a)), None

    first = jax.tree.map(lambda x: x[0], mbs)
    aux_shape = jax.eval_shape(lambda: micro_loss(params, *first)[1])
    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()),
             jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))
    (grads, loss, aux), _ = jax.lax.scan(body, zeros, mbs)
    return loss, aux, grads


def _loss_inputs(sums, counts, batch: PairBatch, ref_sums, bco_delta, samples=None) -> LossInputs:
    """``samples``: None or ``(sums [B], counts [B])`` of the reference samples under the policy."""
    return LossInputs(
        policy_chosen_logps=sums[:, 0],
        policy_rejected_logps=sums[:, 1],
        reference_chosen_logps=None if ref_sums is None else ref_sums[:, 0],
        reference_rejected_logps=None if ref_sums is None else ref_sums[:, 1],
        chosen_tokens=counts[:, 0],
        rejected_tokens=counts[:, 1],
        votes=batch.votes.astype(jnp.float32),
        reference_sample_logps=None if samples is None else samples[0],
        reference_sample_tokens=None if samples is None else samples[1],
        bco_delta=bco_delta,
    )


def _denominators(composition: Composition, batch: PairBatch, uses_reference: bool, bco_delta,
                  uses_samples: bool = False) -> dict:
    """Per-term ``sum(denom * mask)`` of the whole batch; denominators depend on counts only."""
    counts = pair_counts(batch)  # [B, 2]
    zeros = jnp.zeros_like(counts)
    samples = None
    if uses_samples:
        sample_counts = batch.ref_samples.loss_mask[..., 1:].sum(-1).astype(jnp.float32).mean(-1)  # [B]
        samples = (zeros[:, 0], sample_counts)
    inputs = _loss_inputs(zeros, counts, batch, zeros if uses_reference else None, bco_delta, samples)
    outs = composition.outputs(inputs)
    return {key: sum_ for key, (_, sum_) in composition.sums(outs, batch.example_mask).items()}


def _norm_metrics(grads, params, updates) -> dict[str, Array]:
    return {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates)}


def step_key(state: TrainState) -> Array:
    """The PRNG key of ``state``'s step: ``fold_in(run key, step)``. The run key (``train.seed``) and the step are
    checkpointed, so a resumed run draws the same keys (LoRA adapter dropout) as an uninterrupted one."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _apply(state: TrainState, grads, loss, optimizer, nan_policy: str, extra: dict) -> tuple[TrainState, dict]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _norm_metrics(grads, state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    if nan_policy == "skip":
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    metrics["nonfinite"] = (~finite).astype(jnp.int32)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        skipped=state.skipped + (~finite).astype(jnp.int32), **extra)
    return new, metrics


def make_preference_step(
    graphdef,
    rest,
    optimizer: optax.GradientTransformation,
    composition: Composition,
    *,
    reference: str = "live",
    micro_batches: int = 1,
    seq_chunk: int = 128,
    vocab_chunk: int = 8192,
    nan_policy: str = "skip",
    bco_momentum: float = 0.0,
    base_graphdef=None,
    reference_graphdef=None,
    lora_dropout: float = 0.0,
    reference_adapters: bool = False,
) -> Callable:
    """Builds ``step(state, ref_params, batch, ref_logps) -> (state, metrics)``.

    Args:
      graphdef, rest: from :func:`split_model` (the model structure and non-trainable state).
      optimizer: the optax transformation.
      composition: the weighted loss terms (:func:`jaxpref.losses.compose`).
      reference: ``live`` (``ref_params`` given), ``precomputed`` (``ref_logps [B, 2]`` given)
        or ``none`` (reference-free losses).
      micro_batches: gradient-accumulation micro-batches per step.
      nan_policy: ``skip`` keeps params and optimizer state when the loss or grad norm is
        non-finite (counted in ``state.skipped``); ``stop`` applies nothing special here (the
        loop stops on ``metrics['nonfinite']``).
      bco_momentum: unused unless a ``bco_pair`` term is present (running mean of its rewards).
      base_graphdef: LoRA (:mod:`jaxpref.models.lora`): the graph of the model without adapters. Then
        ``state.params`` holds the adapters alone, ``ref_params`` the frozen base (passed whatever the
        reference strategy, never donated nor differentiated), the policy is ``graphdef`` over both and a
        ``live`` reference is ``base_graphdef`` over the base: the base with the adapters off.
      reference_graphdef: LoRA with a ``live`` reference of its own (``reference.source``): its graph; then
        ``ref_params`` is the pair ``(frozen base, reference params)``.
      reference_adapters: LoRA TR-DPO (``reference.sync_every``): ``ref_params`` is the pair ``(frozen base,
        reference adapters)`` and the reference is the LoRA graph over both: the base plus the adapters as they were
        at the last sync.
      lora_dropout: LoRA adapter dropout rate p (:func:`jaxpref.models.lora.dropout`) in the policy's forwards,
        keyed by :func:`step_key`, micro-batch and forward (pairs 0, reference samples 1); the reference never
        drops. 0: the dropout-free program.

    ``batch`` may be a padded :class:`~jaxpref.types.PairBatch` or a
    :class:`~jaxpref.types.PackedPairBatch` (``data.packing``; same losses and gradients, see
    ``tests/test_packing.py``); a packed batch is split into micro-batches along its interleaved
    groups, so ``micro_batches`` must divide ``batch.groups``.

    When a term needs reference samples (TYPO with λ > 0), every batch must carry
    ``batch.ref_samples`` (:class:`~jaxpref.types.ReferenceSampleBatch`); they are scored by the
    policy with gradients and logged as ``logps/reference_sample`` and ``reference_sample/kl``
    (mean ``log π_ref(y) − log πθ(y)`` over the samples: the KL(π_ref ‖ πθ) estimate).
    """
    chunks = {"seq_chunk": seq_chunk, "vocab_chunk": vocab_chunk}
    uses_ref = reference != "none"
    bco_keys = [t.key for t in composition.terms if t.name == "bco_pair"]
    sample_terms = needs_reference_samples(composition)
    ref_graphdef = reference_graphdef or (graphdef if base_graphdef is None or reference_adapters else base_graphdef)
    own_reference = base_graphdef is not None and (reference_graphdef is not None or reference_adapters)
    dropping = base_graphdef is not None and lora_dropout > 0

    def step(state: TrainState, ref_params, batch: PairBatch | PackedPairBatch, ref_logps):
        packed = isinstance(batch, PackedPairBatch)
        if packed and (sample_terms or batch.groups % micro_batches):
            raise ValueError(f"loss terms {list(sample_terms)} need reference samples, which packed batches do not "
                             "carry (data.packing=false)" if sample_terms else
                             f"train.micro_batches={micro_batches} must divide the packed batch's groups "
                             f"({batch.groups}): pack with PackSpec(groups=micro_batches)")
        if sample_terms and batch.ref_samples is None:
            raise ValueError(f"loss terms {list(sample_terms)} need reference samples but batch.ref_samples is "
                             "None: configure reference.samples (see jaxpref.training.reference_samples)")
        n_seg = batch.num_segments if packed else None  # of the whole batch, also inside micro-batches
        dens = _denominators(composition, batch, uses_ref, state.bco_delta, bool(sample_terms))
        n_valid = jnp.maximum(batch.example_mask.sum(), 1).astype(jnp.float32)

        def micro_loss(params, mb: PairBatch, mb_ref, key=None):
            frozen, ref_tree = ref_params if own_reference else (ref_params, ref_params)
            if base_graphdef is not None:  # LoRA: adapters (differentiated) + the frozen base
                params = nnx.merge_state(params, frozen)
            if reference_adapters:  # LoRA TR-DPO: the base with the synced copy of the adapters
                ref_tree = nnx.merge_state(ref_tree, frozen)
            drop = (lambda i: lora.dropout(jax.random.fold_in(key, i), lora_dropout)) if dropping else \
                (lambda i: contextlib.nullcontext())
            with jax.named_scope("policy"), drop(0):
                sums, counts = batch_pair_logps(graphdef, params, rest, mb, num_segments=n_seg, **chunks)
            ref_sums = None
            if reference == "live":
                with jax.named_scope("reference"):
                    ref_sums = jax.lax.stop_gradient(
                        batch_pair_logps(ref_graphdef, ref_tree, rest, mb, num_segments=n_seg, **chunks)[0])
            elif reference == "precomputed":
                ref_sums = mb_ref
            samples = None
            if sample_terms:
                with jax.named_scope("reference_samples"), drop(1):
                    samples = reference_sample_logps(graphdef, params, rest, mb.ref_samples, **chunks)
            inputs = _loss_inputs(sums, counts, mb, ref_sums, state.bco_delta, samples)
            total, _, metrics = composition(inputs, mb.example_mask, denominators=dens)
            w = mb.example_mask.sum().astype(jnp.float32) / n_valid  # share of valid rows
            keep = mb.example_mask
            # loss/<term> already is numerator / global denominator: micro-batches add up exactly.
            metrics = {k: (v if k.startswith("loss/") else v * w) for k, v in metrics.items() if k != "loss"}
            metrics["logps/chosen"] = _masked_sum(sums[:, 0], keep) / n_valid
            metrics["logps/rejected"] = _masked_sum(sums[:, 1], keep) / n_valid
            if samples is not None:
                sample_lp = jax.lax.stop_gradient(samples[0])
                metrics["logps/reference_sample"] = _masked_sum(sample_lp, keep) / n_valid
                ref_lp = mb.ref_samples.reference_logps.mean(-1)
                metrics["reference_sample/kl"] = _masked_sum(ref_lp - sample_lp, keep) / n_valid
            return total, metrics

        loss, metrics, grads = accumulate_gradients(micro_loss, state.params, (batch, ref_logps), micro_batches,
                                                    key=step_key(state) if dropping else None)
        extra = {}
        if bco_keys:
            mean = metrics.get(f"{bco_keys[0]}/bco/reward_mean", state.bco_delta)
            extra["bco_delta"] = jnp.where(state.step == 0, mean,
                                           bco_momentum * state.bco_delta + (1 - bco_momentum) * mean)
        new_state, norms = _apply(state, grads, loss, optimizer, nan_policy, extra)
        metrics = {**metrics, **norms, "loss": loss,
                   "tokens": (batch.segment_ids != 0).sum().astype(jnp.float32),
                   "pairs": batch.example_mask.sum().astype(jnp.float32)}
        if sample_terms:
            metrics["sample_tokens"] = (batch.ref_samples.segment_ids != 0).sum().astype(jnp.float32)
        return new_state, metrics

    return step


def _masked_sum(x, mask):
    return jnp.where(mask, x, 0.0).sum()


def make_sft_step(graphdef, rest, optimizer, *, micro_batches: int = 1, seq_chunk: int = 128,
                  vocab_chunk: int = 8192, nan_policy: str = "skip", base_graphdef=None,
                  lora_dropout: float = 0.0) -> Callable:
    """Builds ``step(state, batch: SFTBatch) -> (state, metrics)``: token-mean NLL of responses.

    With ``base_graphdef`` (LoRA, see :func:`make_preference_step`) it is ``step(state, base, batch)``:
    ``state.params`` are the adapters, ``base`` the frozen (non-donated, undifferentiated) base parameters, and
    ``lora_dropout`` the adapter dropout rate (keyed as in :func:`make_preference_step`).
    """
    dropping = base_graphdef is not None and lora_dropout > 0
    chunks = {"seq_chunk": seq_chunk, "vocab_chunk": vocab_chunk}

    def step(state: TrainState, batch: SFTBatch, base=None):
        mask = batch.loss_mask * batch.example_mask[:, None]
        total_tokens = jnp.maximum(mask[:, 1:].sum(), 1).astype(jnp.float32)

        def micro_loss(params, mb: SFTBatch, key=None):
            m = mb.loss_mask * mb.example_mask[:, None]
            params = params if base is None else nnx.merge_state(params, base)
            with lora.dropout(jax.random.fold_in(key, 0), lora_dropout) if dropping else contextlib.nullcontext():
                lp = forward_logps(graphdef, params, rest, mb.input_ids, mb.segment_ids, mb.positions, m,
                                   right_padded=True, **chunks)
            nll = -lp.sums.sum() / total_tokens
            return nll, {"nll": jax.lax.stop_gradient(nll)}

        loss, metrics, grads = accumulate_gradients(micro_loss, state.params, (batch,), micro_batches,
                                                    key=step_key(state) if dropping else None)
        new_state, norms = _apply(state, grads, loss, optimizer, nan_policy, {})
        metrics = {**metrics, **norms, "loss": loss, "tokens": (batch.segment_ids != 0).sum().astype(jnp.float32),
                   "target_tokens": total_tokens}
        return new_state, metrics

    if base_graphdef is None:
        return step
    return lambda state, base, batch: step(state, batch, base)


def jit_step(step: Callable, state_sharding, other_shardings: tuple, *, donate: bool = True):
    """Jits a step once with explicit shardings; the state (argument 0) is donated.

    Args:
      step: from :func:`make_preference_step` or :func:`make_sft_step`.
      state_sharding: pytree of ``NamedSharding`` matching the :class:`TrainState`.
      other_shardings: shardings of the remaining arguments (None leaves = replicated/unspecified).
    """
    mesh = jax.tree.leaves(state_sharding)[0].mesh
    return jax.jit(parallel.with_activation_sharding(step, mesh), in_shardings=(state_sharding, *other_shardings),
                   out_shardings=(state_sharding, None), donate_argnums=(0,) if donate else ())


def state_shardings(state, param_shardings, mesh) -> TrainState:
    """The ``NamedSharding`` of every leaf of a :class:`TrainState` on ``mesh``.

    Parameters keep ``param_shardings`` (from their logical axes, :func:`jaxpref.parallel.state_shardings`);
    every optimizer-state leaf that is a copy of a parameter (Adam / RMSProp moments, momentum: its key
    path ends with the parameter's path and it has the parameter's shape) is sharded like that
    parameter; the rest (step counts, factored statistics, the RNG and scalars) is replicated.

    Args:
      state: a :class:`TrainState` of arrays or ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of
        :func:`init_state`).
      param_shardings: a pytree of ``NamedSharding`` with the structure of ``state.params``.
    """
    from jaxpref import parallel

    rep = parallel.replicated(mesh)
    by_path = {tuple(path): (np.shape(x), sh) for (path, x), sh in
               zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(param_shardings),
                   strict=True)}
    depths = sorted({len(p) for p in by_path}, reverse=True)

    def opt_leaf(path, x):
        for n in depths:
            shape, sh = by_path.get(tuple(path[-n:]), (None, None))
            if sh is not None and shape == np.shape(x):
                return sh
        return rep

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state)
    return TrainState(step=rep, params=param_shardings, opt_state=opt_sh, rng=rep, bco_delta=rep, skipped=rep)


def build_state(params, optimizer: optax.GradientTransformation, seed: int, mesh=None) -> TrainState:
    """A :class:`TrainState` whose params and optimizer moments are sharded on ``mesh`` like the params
    (:func:`state_shardings`; a moment left to XLA's propagation came out replicated on every device)."""
    from jaxpref import parallel

    init = lambda p: init_state(p, optimizer, seed)  # noqa: E731
    if mesh is None:
        return jax.jit(init)(params)
    params = parallel.place_params(params, mesh)
    shardings = state_shardings(jax.eval_shape(init, params), parallel.tree_shardings(params), mesh)
    return jax.jit(init, out_shardings=shardings)(params)
