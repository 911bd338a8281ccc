"""The training loop shared by ``train.preference``, ``train.sft`` and ``train.reward_model``.

A run directory holds::

    config.yaml      the resolved config            model.json     model + tokenizer specs
    metrics.jsonl    one line per logged step      rejects.jsonl  skipped rows with reasons
    tensorboard/     TensorBoard events (optional)  checkpoints/   Orbax steps (atomic)
    summary.json     final metrics, data and timing summary
    run.log          the log

Everything device-side is in :mod:`jaxpref.training.step`; this module wires config, data,
model, mesh, checkpoints and logging around it. ``--resume`` restores params, optimizer state,
step, RNG, the data-iterator position and (TR-DPO, ``reference.sync_every``) the synced reference,
so the resumed run sees exactly the batches and reference it would have seen and ends with the
same parameters (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxpref import losses, parallel
from jaxpref.compile_cache import CompileWatch
from jaxpref.config import ConfigError, RunConfig, save_config, to_dict
from jaxpref.data import formats as data_formats
from jaxpref.data import iterator as data_iterator
from jaxpref.data import multi_response
from jaxpref.data import packing as data_packing
from jaxpref.data import split as data_split
from jaxpref.data import tokenize as data_tokenize
from jaxpref.data.batching import choose_bucket
from jaxpref.loading import (
    LoadedModel,
    check_same_architecture,
    check_vocab,
    check_vocab_before_build,
    load_model,
    load_tokenizer,
    model_meta,
)
from jaxpref.training import adapters, eval_during, optim, reference, reference_samples
from jaxpref.training import checkpoint as ckpt
from jaxpref.training import step as steplib
from jaxpref.training.logging import AsyncMetrics, MetricsWriter, progress_bar
from jaxpref.training.prefetch import Prefetcher

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot start or continue (names the run directory and the reason)."""


def prepare_run_dir(cfg: RunConfig, resume: bool) -> pathlib.Path:
    run_dir = pathlib.Path(cfg.run_dir).expanduser().resolve()
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if has_ckpt and not resume:
        raise RunError(f"run directory {run_dir} already has checkpoints: pass --resume to continue it, "
                       "or choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # one writer; the other processes share the directory
            save_config(cfg, run_dir / "config.yaml")
    except OSError as err:
        raise RunError(f"run directory {run_dir} is not writable: {err.strerror}") from None
    handler = logging.FileHandler(run_dir / ("run.log" if jax.process_index() == 0 else
                                             f"run.process{jax.process_index()}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("jaxpref").addHandler(handler)
    logging.getLogger("jaxpref").setLevel(logging.INFO)
    return run_dir


def tokenize_config(cfg: RunConfig) -> data_tokenize.TokenizeConfig:
    d = cfg.data
    return data_tokenize.TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                                        truncation=d.truncation, chat_template=d.chat_template, add_eos=d.add_eos)


@dataclasses.dataclass
class Datasets:
    """What :func:`load_datasets` hands a trainer.

    Attributes:
      train: the tokenised training rows (held-out rows removed).
      eval: the tokenised held-out rows (``data.eval`` or ``data.eval_split``), or None.
      eval_has_votes: the held-out records carry vote shares.
      eval_prompts: the held-out records' prompts, in order (the win-rate probe's).
      summary: rows kept / rejected, tokenisation stats and the hold-out (``summary.json``'s ``data``).
    """

    train: Any
    eval: Any
    eval_has_votes: bool
    summary: dict[str, Any]
    eval_prompts: list = dataclasses.field(default_factory=list)


def _tokenize(kind: str, records, tokenizer, tok_cfg, rejects):
    if kind == "sft":
        return data_tokenize.tokenize_sft(records, tokenizer, tok_cfg, rejects=rejects)
    return data_tokenize.tokenize_pairs(records, tokenizer, tok_cfg, rejects=rejects)


def load_datasets(cfg: RunConfig, tokenizer, run_dir: pathlib.Path, kind: str, *, resume: bool = False) -> Datasets:
    """Load -> normalise -> hold out -> tokenise; writes ``rejects.jsonl`` (and ``eval_split.json`` /
    ``eval_rejects.jsonl``). SFT accepts demonstrations (prompt/response) or pairs (their chosen side).

    Held-out rows (:mod:`jaxpref.data.split`): ``data.eval_split`` removes a seeded fraction of the
    train records (recorded in the run directory, the same on ``resume``); ``data.eval`` reads a file.
    """
    d = cfg.data
    if not d.train:
        raise RunError("data.train is empty: give a dataset path or hub id")
    fmt = data_formats.format_config(None if d.format == "auto" else d.format, fields=d.fields or None)
    data = data_formats.load_preferences(d.train, fmt, split=d.split)
    records = data.records[: d.limit] if d.limit else data.records
    held, held_rejects, split = None, data.rejects, None
    if not records:  # before the hold-out, whose own error would not name the bad rows
        data.rejects.write(run_dir / "rejects.jsonl")
        raise RunError(f"data.train {d.train}: no usable rows (first reject: {data.rejects.first()}; see "
                       f"{run_dir / 'rejects.jsonl'})")
    if d.eval_split:
        seed = cfg.train.seed if d.split_seed is None else d.split_seed
        records, held, split = data_split.hold_out(records, fraction=d.eval_split, seed=seed, source=d.train,
                                                   limit=d.limit, run_dir=run_dir, resume=resume,
                                                   write=jax.process_index() == 0)
    elif d.eval:
        ev = data_formats.load_preferences(d.eval, fmt, split=d.split)
        held, held_rejects = ev.records, ev.rejects
    # multi-response rows (format multi): pairs derived after the split, so it is drawn over prompts
    records, tok_rejects, pairs = multi_response.training_pairs(records, d.multi_pairs, cfg.train.seed, data.rejects,
                                                                d.train)
    held, held_tok_rejects, held_pairs = (None, None, None) if held is None else multi_response.training_pairs(
        held, d.multi_pairs, cfg.train.seed, held_rejects, d.eval or d.train)
    tok_cfg = tokenize_config(cfg)
    tokenized = _tokenize(kind, records, tokenizer, tok_cfg, tok_rejects)
    held_tok = None if held is None else _tokenize(kind, held, tokenizer, tok_cfg, held_tok_rejects)
    if jax.process_index() == 0:
        data.rejects.write(run_dir / "rejects.jsonl")
        if d.eval:
            held_rejects.write(run_dir / "eval_rejects.jsonl")
        for derived, prefix in ((pairs, "pairs"), (held_pairs, "eval_pairs")):
            if derived is not None:
                derived.write(run_dir, prefix)
    summary = {"rows_kept": len(tokenized), "rows_rejected": len(data.rejects),
               "rejects_by_reason": data.rejects.counts() if hasattr(data.rejects, "counts") else {},
               "tokenize": dataclasses.asdict(tokenized.stats)}
    if pairs is not None:
        summary["pairs"] = pairs.summary()
    if held_tok is not None:
        summary["eval"] = {"source": d.eval or f"{d.train} (data.eval_split={d.eval_split})",
                           "rows_held_out": len(held), "rows_kept": len(held_tok),
                           **({"split_file": str(run_dir / data_split.SPLIT_FILE), "split_seed": split.seed}
                              if split is not None else {}),
                           **({"pairs": held_pairs.summary()} if held_pairs is not None else {})}
    log.info("data %s: %s; %s", d.train, tokenized.stats.summary(), data.rejects.summary()
             if hasattr(data.rejects, "summary") else f"{len(data.rejects)} rows rejected")
    if len(tokenized) == 0:
        first = (tok_rejects if len(tok_rejects) else data.rejects).first()  # names the row and key
        raise RunError(f"data.train {d.train}: no usable rows (first reject: {first}; see {run_dir / 'rejects.jsonl'})")
    if held_tok is not None and len(held_tok) == 0:
        raise RunError(f"held-out data {summary['eval']['source']}: no usable rows (see "
                       f"{run_dir / ('eval_rejects.jsonl' if d.eval else 'rejects.jsonl')})")
    has_votes = held is not None and any(getattr(r, "alpha", None) is not None for r in held)
    return Datasets(tokenized, held_tok, has_votes, summary, [r.prompt for r in held or []])


def load_data(cfg: RunConfig, tokenizer, run_dir: pathlib.Path, kind: str, *, resume: bool = False):
    """``(tokenised training rows, summary)`` of :func:`load_datasets` (held-out rows removed)."""
    ds = load_datasets(cfg, tokenizer, run_dir, kind, resume=resume)
    return ds.train, ds.summary


def total_steps(cfg: RunConfig, n_rows: int) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    per_epoch = n_rows // cfg.train.batch_size
    if per_epoch == 0:
        raise RunError(f"train.batch_size={cfg.train.batch_size} exceeds the {n_rows} usable rows")
    return per_epoch * cfg.train.epochs


def _composition(cfg: RunConfig):
    spec = [{"name": t.name, "weight": t.weight, **t.hparams} for t in cfg.loss]
    try:
        return losses.compose(spec)
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"loss config: {err}") from None


def check_reference(cfg: RunConfig, comp) -> None:
    """RunError when ``reference.strategy=none`` but a term reads reference log-probs (its registered
    ``requires``, :func:`jaxpref.training.reference.reference_terms`)."""
    names = reference.reference_terms(comp)
    if cfg.reference.strategy == "none" and names:
        raise RunError(f"reference.strategy=none but loss terms {list(names)} need reference log-probs")


def _check_reference_samples(cfg: RunConfig, comp) -> tuple[str, ...]:
    """Terms needing reference samples (TYPO with λ > 0); ConfigError when ``reference.samples`` is unset."""
    terms = reference_samples.needs_reference_samples(comp)
    if terms and cfg.reference.samples is None:
        raise ConfigError(f"loss terms {list(terms)} need responses sampled from the reference (their unsupervised "
                          "term) but reference.samples is not set: add e.g. 'reference.samples={n: 1, "
                          "max_new_tokens: 128}' (or reference.samples={} for the defaults), or set their lam=0")
    if not terms and cfg.reference.samples is not None:
        log.warning("reference.samples is set but no loss term uses reference samples: not sampling")
    return terms


@dataclasses.dataclass
class RunSetup:
    """What :func:`setup_run` hands every trainer: the run directory, the loaded model (its
    ``tokenizer_spec`` resolved), the tokenizer and the ``model.json`` contents."""

    run_dir: pathlib.Path
    loaded: LoadedModel
    tokenizer: Any
    model_json: dict[str, Any]


def setup_run(cfg: RunConfig, mesh, *, resume: bool, extra_meta: dict[str, Any] | None = None) -> RunSetup:
    """The model side of a run, shared by every trainer (preference, SFT, reward model, WRO).

    Before anything is built: a ``model.tokenizer`` whose vocabulary exceeds the configured model's
    and, on ``resume``, a model whose architecture differs from the run's ``model.json`` are
    SpecErrors. Then prepares the run directory (:func:`prepare_run_dir`), loads the model onto
    ``mesh`` and the tokenizer (``model.tokenizer`` or the model's own), checks the vocabulary
    again on the built model and writes ``model.json`` (:func:`jaxpref.loading.model_meta` plus
    ``extra_meta``).
    """
    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer) if m.tokenizer else None
    if tokenizer is not None:  # fail on a vocabulary mismatch before building (compiling) anything
        check_vocab_before_build(m.source, m.overrides, tokenizer, m.tokenizer)
    saved_model = pathlib.Path(cfg.run_dir).expanduser() / "model.json"
    if resume and saved_model.is_file():  # a different model fails before anything is built
        check_same_architecture(json.loads(saved_model.read_text()), m.source, m.overrides,
                                f"resume of {saved_model.parent}")
    run_dir = prepare_run_dir(cfg, resume)
    # scan_layers explicitly: a run: source would otherwise keep its own layout, and the reference
    # (_reference_params) is loaded in this one
    loaded = load_model(m.source, overrides={**m.model_overrides(), "scan_layers": m.scan_layers},
                        seed=cfg.train.seed, mesh=mesh,
                        dtype=m.compute_dtype, param_dtype=m.param_dtype, adapter=m.adapter)
    loaded.tokenizer_spec = m.tokenizer or loaded.tokenizer_spec
    if tokenizer is None:
        tokenizer = load_tokenizer(loaded.tokenizer_spec)
    check_vocab(loaded.model, tokenizer, loaded.tokenizer_spec)
    model_json = {**model_meta(loaded), **(extra_meta or {})}
    if jax.process_index() == 0:
        (run_dir / "model.json").write_text(json.dumps(model_json, indent=2))
    return RunSetup(run_dir, loaded, tokenizer, model_json)


def _check_syncable(cfg: RunConfig, ref_params, policy_params) -> None:
    """RunError unless the reference has the policy's parameter structure and shapes (TR-DPO mixes them)."""
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
    if jax.tree.structure(ref_params) != jax.tree.structure(policy_params) or \
            shapes(ref_params) != shapes(policy_params):
        raise RunError(f"reference.sync_every={cfg.reference.sync_every} mixes the policy into the reference, but "
                       f"reference.source={cfg.reference.source} has other parameters than model.source="
                       f"{cfg.model.source}")


def _restore_synced_reference(cfg: RunConfig, checkpointer: ckpt.RunCheckpointer, ref_params, start: int):
    """The reference a resumed TR-DPO run continues with: the synced one saved at ``start`` (the
    initial one when no sync happened before ``start``)."""
    if start == 0:
        return ref_params
    if checkpointer.has_reference(start):
        log.info("restored the synced reference of step %d", start)
        return checkpointer.restore_reference(ref_params, start)
    if start >= cfg.reference.sync_every:
        raise RunError(f"resume of {checkpointer.directory.parent} at step {start}: reference.sync_every="
                       f"{cfg.reference.sync_every} synced the reference before that step, but the checkpoint holds "
                       "no synced reference (written with reference.sync_every=0 or by an older jaxpref)")
    return ref_params


def run_training(cfg: RunConfig, *, kind: str = "preference", resume: bool = False) -> dict[str, Any]:
    """Runs (or resumes) a preference or SFT training run; returns the summary dict."""
    parallel.maybe_initialize_distributed()
    try:
        mesh = parallel.make_mesh(cfg.mesh)
    except ValueError as err:
        raise RunError(f"{err} (jax sees {jax.device_count()} devices)") from None
    if cfg.train.batch_size % cfg.train.micro_batches:
        raise RunError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                       f"train.micro_batches={cfg.train.micro_batches}")
    comp = _composition(cfg) if kind == "preference" else None
    sample_terms: tuple[str, ...] = ()
    if comp is not None:
        check_reference(cfg, comp)
        sample_terms = _check_reference_samples(cfg, comp)
    _check_packing(cfg, kind, sample_terms)
    adapters.check_supported(cfg, kind, RunError)
    setup = setup_run(cfg, mesh, resume=resume)
    run_dir, tokenizer, model_json = setup.run_dir, setup.tokenizer, setup.model_json

    datasets = load_datasets(cfg, tokenizer, run_dir, kind, resume=resume)
    data, data_summary = datasets.train, datasets.summary
    steps = total_steps(cfg, len(data))
    lora_parts = None if cfg.lora is None else adapters.attach_for_run(cfg, setup, mesh)
    if lora_parts is None:
        graphdef, params, rest = steplib.split_model(setup.loaded.model)
    else:  # only the adapters train (and are checkpointed); the frozen base is the step's ref_params
        graphdef, params, rest = lora_parts["graphdef"], lora_parts["adapters"], lora_parts["rest"]
    optimizer, schedule = optim.make_optimizer(cfg.optim, steps)
    state = steplib.build_state(params, optimizer, cfg.train.seed, mesh)
    syncing = kind == "preference" and cfg.reference.sync_every > 0  # live strategy (config check)
    lora_sync = syncing and lora_parts is not None  # TR-DPO reference: the base + a synced copy of the adapters
    sync_adapters = jax.tree.map(lambda x: x.copy(), state.params) if lora_sync else None  # the initial adapters
    ref_params, ref_cache = None, None
    lora_ref = None  # LoRA with reference.source: (graphdef, params) of that reference
    if lora_parts is not None:
        ref_params = lora_parts["base"]
        if kind == "preference" and cfg.reference.source is not None and cfg.reference.strategy != "none":
            lora_ref = adapters.load_reference(cfg, mesh, setup.loaded.model.config.vocab_size, RunError)
    elif kind == "preference" and cfg.reference.strategy != "none":
        ref_params = _reference_params(cfg, state.params, mesh)
    samples = None
    if sample_terms:  # drawn from the initial reference, before any checkpoint is restored
        if lora_parts is not None:  # generated with the adapters off (or in reference.source's own graph)
            sample_gd, sample_params = lora_ref or (lora_parts["base_graphdef"], ref_params)
        else:
            sample_gd = graphdef
            sample_params = ref_params if ref_params is not None else _reference_params(cfg, state.params, mesh)
        samples = _sample_reference(cfg, sample_gd, rest, sample_params, data, tokenizer)
    evaluator = None
    if datasets.eval is not None and cfg.train.eval_every > 0:  # scores the initial policy (and reference) first
        # LoRA: the frozen base travels with the non-trainable state, so the evaluator's merge is the LoRA model
        eval_rest = rest if lora_parts is None else nnx.merge_state(lora_parts["base"], rest)
        evaluator = make_evaluator(cfg, kind, datasets, graphdef, eval_rest, mesh,
                                   comp=None if sample_terms else comp, tokenizer=tokenizer, steps=steps,
                                   current_reference=(lambda: ref_params) if syncing else None,
                                   reference_graph=None if lora_ref is None else (lora_ref[0], rest))
        if kind == "preference":
            # the initial reference when it is not the initial policy (a LoRA run's base is its initial policy)
            initial_ref = lora_ref[1] if lora_ref is not None else \
                ref_params if cfg.reference.source and lora_parts is None else None
            evaluator.prepare(run_dir, state.params, initial_ref, resume=resume)
    it = open_iterator(cfg, data, ref_samples=samples, packing=pack_spec(cfg, data, mesh),
                       share_prompt=cfg.data.share_prompt)
    checkpointer, state, start = open_checkpoints(cfg, run_dir, state, it, resume)
    if syncing:
        ref_params = sync_adapters if lora_sync else ref_params
        _check_syncable(cfg, ref_params, state.params)
        ref_params = _restore_synced_reference(cfg, checkpointer, ref_params, start)
    if kind == "preference" and cfg.reference.strategy == "precomputed":
        ref_gd, ref_tree = (graphdef, ref_params) if lora_parts is None else \
            lora_ref or (lora_parts["base_graphdef"], ref_params)  # LoRA: the base with the adapters off
        ref_cache = _precompute(cfg, ref_gd, rest, ref_tree, data, mesh)
        ref_params = None if lora_parts is None else ref_params
    elif lora_ref is not None:  # a live reference of its own: the step takes (frozen base, reference)
        ref_params = (lora_parts["base"], lora_ref[1])

    fn = make_train_step(cfg, kind, graphdef, rest, optimizer, comp,
                         base_graphdef=None if lora_parts is None else lora_parts["base_graphdef"],
                         reference_graphdef=lora_ref[0] if lora_ref is not None and ref_cache is None else None)
    state_sh = parallel.tree_shardings(state)
    step_ref = (lambda: (lora_parts["base"], ref_params)) if lora_sync else (lambda: ref_params)  # noqa: E731
    ref_sh = None if ref_params is None else parallel.tree_shardings(step_ref())

    def build(batch):
        return jit_train_step(fn, kind, mesh, state_sh, batch, ref_sh=ref_sh, ref_logps=ref_cache is not None)

    jitted = per_shape(build)

    def place(batch):  # runs in the prefetch thread
        rl = None
        if ref_cache is not None:
            rl = parallel.shard_batch(ref_cache.lookup(_positions(data, batch.index)), mesh)
        return parallel.shard_batch(batch, mesh), rl

    def call(state, placed):
        batch, rl = placed
        if kind == "preference":
            return jitted(batch)(state, step_ref(), batch, rl)
        return jitted(batch)(state, batch) if lora_parts is None else jitted(batch)(state, ref_params, batch)

    after_step = None
    if syncing:  # built once, not per sync; the synced reference keeps its shardings
        sync = jax.jit(reference.sync_reference, static_argnums=2, out_shardings=parallel.tree_shardings(ref_params))

        def after_step(s, state):
            nonlocal ref_params
            if s % cfg.reference.sync_every == 0:
                ref_params = sync(ref_params, state.params, cfg.reference.sync_alpha)

    result = run_steps(cfg, run_dir, state=state, it=it, checkpointer=checkpointer, call=call, steps=steps,
                       start=start, resume=resume, schedule=schedule,
                       ckpt_meta={"config": to_dict(cfg), "model": model_json}, after_step=after_step, place=place,
                       reference=(lambda: ref_params) if syncing else None, evaluator=evaluator)
    state, last, elapsed = result.state, result.last, result.seconds
    tokens_total = result.tokens
    summary = {"steps": steps, "resumed_from": start, "final_metrics": last, "data": data_summary,
               "skipped_updates": int(state.skipped), "seconds": elapsed,
               "tokens_per_s": tokens_total / max(elapsed, 1e-9), **result.timing(),
               "reference_logps": None if ref_cache is None else
               {"cache": str(ref_cache.path), "computed": ref_cache.computed},
               "reference_samples": None if samples is None else samples.summary(), **result.eval_summary()}
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def make_train_step(cfg: RunConfig, kind: str, graphdef, rest, optimizer, comp=None, base_graphdef=None,
                    reference_graphdef=None) -> Callable:
    """The step function a ``kind`` run trains with (``preference``: :func:`~jaxpref.training.step.make_preference_step`
    with the loss composition ``comp``; ``sft``: :func:`~jaxpref.training.step.make_sft_step`; ``reward``:
    :func:`jaxpref.reward_model.make_reward_step`), built from the config's train settings. The trainers
    and the memory planner (:mod:`jaxpref.training.plan`) both build their step here. ``base_graphdef``: a LoRA
    run's graph without adapters, ``reference_graphdef`` its own reference's graph
    (:func:`~jaxpref.training.step.make_preference_step`)."""
    chunks = {"seq_chunk": cfg.train.seq_chunk, "vocab_chunk": cfg.train.vocab_chunk}
    common = {"micro_batches": cfg.train.micro_batches, "nan_policy": cfg.train.nan_policy}
    dropout = cfg.lora.dropout if cfg.lora is not None and base_graphdef is not None else 0.0
    if kind == "preference":
        return steplib.make_preference_step(graphdef, rest, optimizer, comp, reference=cfg.reference.strategy,
                                            base_graphdef=base_graphdef, reference_graphdef=reference_graphdef,
                                            lora_dropout=dropout, reference_adapters=base_graphdef is not None and
                                            cfg.reference.sync_every > 0, **common, **chunks)
    if kind == "sft":
        return steplib.make_sft_step(graphdef, rest, optimizer, base_graphdef=base_graphdef, lora_dropout=dropout,
                                     **common, **chunks)
    if kind == "reward":
        from jaxpref.reward_model import make_reward_step

        return make_reward_step(graphdef, rest, optimizer, frozen_base=base_graphdef is not None,
                                lora_dropout=dropout, **common)
    raise ValueError(f"unknown run kind {kind!r}: expected preference, sft or reward")


def jit_train_step(fn: Callable, kind: str, mesh, state_sh, batch, *, ref_sh=None, ref_logps: bool = False):
    """``fn`` jitted for ``batch``'s shape (arrays or ``jax.ShapeDtypeStruct``) with the run's shardings: the
    state's ``state_sh``, the batch split over the mesh's ``batch`` axes; for ``preference`` also the
    reference params' ``ref_sh`` (None: no live reference) and, with ``ref_logps``, the precomputed
    ``[B, 2]`` reference log-probs split like the batch; for a LoRA ``sft`` step ``ref_sh`` is its frozen base's."""
    batch_sh = jax.tree.map(lambda x: parallel.batch_sharding(mesh, len(np.shape(x))), batch)
    if kind == "preference":
        rl_sh = parallel.batch_sharding(mesh, 2) if ref_logps else None
        return steplib.jit_step(fn, state_sh, (ref_sh, batch_sh, rl_sh))
    return steplib.jit_step(fn, state_sh, (batch_sh,) if ref_sh is None else (ref_sh, batch_sh))


def open_iterator(cfg: RunConfig, data, ref_samples=None, packing: data_packing.PackSpec | None = None,
                  share_prompt: bool = False):
    """The run's deterministic, checkpointable, process-sharded batch iterator (``ref_samples``: attach
    :class:`~jaxpref.training.reference_samples.ReferenceSamples` to every pair batch; ``packing``:
    yield :class:`~jaxpref.types.PackedPairBatch` of that shape, see :func:`pack_spec`; ``share_prompt``: the
    caller's step takes shared-prompt rows)."""
    if cfg.data.packing and packing is None:
        raise RunError("data.packing=true is supported by train.preference only")
    if cfg.data.share_prompt and not share_prompt:
        raise RunError("data.share_prompt=true is supported by train.preference only")
    it = data_iterator.batch_iterator(data, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                      shuffle=cfg.data.shuffle, buckets=tuple(cfg.data.buckets),
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      ref_samples=ref_samples, packing=packing,
                                      share_prompt=share_prompt and packing is None)
    shapes = batch_shapes(it.dataset)
    log.info("training batch shapes (per process, rows x tokens): at most %d, %s%s", len(shapes), shapes,
             " (shared-prompt rows)" if cfg.data.share_prompt else "")
    return it


def batch_shapes(dataset: data_iterator.BatchDataset) -> list[tuple[int, int]]:
    """The ladder of per-process ``[rows, T]`` batch shapes a run can see (one step compile each): the
    packed shape, or one per bucket that fits the data's longest row (shared-prompt buckets when sharing)."""
    b = dataset.local_batch_size
    if dataset.packing is not None:
        return [(dataset.packing.rows, dataset.packing.seq_len)]
    if dataset.share_prompt:
        return [(b, t) for t in dataset.shared_buckets]
    rows = b if isinstance(dataset.data, data_tokenize.TokenizedSFT) else 2 * b
    longest = int(dataset._lengths.max()) if len(dataset.data) else 1
    return [(rows, t) for t in dataset.buckets if t < longest] + [(rows, choose_bucket(longest, dataset.buckets))]


def _check_packing(cfg: RunConfig, kind: str, sample_terms: tuple[str, ...]) -> None:
    if cfg.data.share_prompt and kind != "preference":
        raise RunError(f"data.share_prompt=true lays out preference pairs; it does not apply to {kind} runs")
    if cfg.data.share_prompt and sample_terms:
        raise RunError(f"data.share_prompt=true cannot carry the reference samples that loss terms "
                       f"{list(sample_terms)} need; set data.share_prompt=false")
    if not cfg.data.packing:
        return
    if kind != "preference":
        raise RunError(f"data.packing=true packs preference pairs; it does not apply to {kind} runs")
    if sample_terms:
        raise RunError(f"data.packing=true cannot carry the reference samples that loss terms {list(sample_terms)} "
                       "need; set data.packing=false")
    unit = cfg.train.micro_batches * jax.process_count()
    if cfg.data.pack_rows < 0 or cfg.data.pack_rows % unit or 0 < cfg.data.pack_rows < 2 * unit:
        raise RunError(f"data.pack_rows={cfg.data.pack_rows} must be 0 (automatic) or a multiple of "
                       f"train.micro_batches x processes = {unit} with at least 2 rows per micro-batch and process")


def pack_spec(cfg: RunConfig, data, mesh) -> data_packing.PackSpec | None:
    """The per-process packed-batch shape of a ``data.packing`` run (None when not packing).

    Rows of ``data.max_length`` tokens; ``data.pack_rows`` rows per global batch, or automatic
    (:func:`jaxpref.data.packing.auto_rows`, a multiple of micro-batches x this process's
    data-parallel devices so the rows shard evenly); one interleaved group per micro-batch.
    """
    if not cfg.data.packing:
        return None
    procs, k = jax.process_count(), cfg.train.micro_batches
    batch_axes = dict(parallel.DEFAULT_RULES)["batch"] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    devices = max(1, int(np.prod([mesh.shape[a] for a in batch_axes])) // procs)
    rows = cfg.data.pack_rows // procs
    seq_len = cfg.data.max_length
    share = cfg.data.share_prompt
    if share:  # a [prompt | chosen | rejected] row may exceed max_length: rows of max_length * 2^j tokens
        longest = int(data_packing.shared_lengths(data).max()) if len(data) else 1
        while seq_len < longest:
            seq_len *= 2
    items = data_packing.shared_lengths(data)[:, None] if share else data.lengths()
    if not rows:
        rows = data_packing.auto_rows(items, cfg.train.batch_size // procs, seq_len, groups=k, devices=devices)
    elif rows % (k * devices):
        raise RunError(f"data.pack_rows={cfg.data.pack_rows} gives {rows} rows per process, not a multiple of "
                       f"train.micro_batches x data-parallel devices per process = {k * devices}")
    spec = data_packing.PackSpec(seq_len=seq_len, rows=rows, groups=k, share_prompt=share)
    log.info("packing pairs into %d rows x %d tokens per process batch (%d micro-batch groups%s)", rows,
             spec.seq_len, k, ", shared prompts" if share else "")
    return spec


def make_evaluator(cfg: RunConfig, kind: str, datasets: Datasets, graphdef, rest, mesh, *, comp=None,
                   current_reference=None, tokenizer=None, steps: int = -1, reference_graph=None):
    """The held-out evaluator of a preference or SFT run (:mod:`jaxpref.training.eval_during`);
    ``reference_graph``: see :class:`~jaxpref.training.eval_during.PreferenceEvaluator`."""
    chunks = {"seq_chunk": cfg.train.seq_chunk, "vocab_chunk": cfg.train.vocab_chunk}
    if kind == "preference":
        if comp is None:
            log.warning("eval/loss is not computed: the loss needs reference samples of the held-out prompts")
        return eval_during.PreferenceEvaluator(
            datasets.eval, datasets.eval_has_votes, graphdef, rest, comp,
            uses_reference=cfg.reference.strategy != "none", mesh=mesh, batch_size=cfg.train.eval_batch_size,
            chunks=chunks, current_reference=current_reference, reference_graph=reference_graph,
            win_rate=_win_rate_probe(cfg, datasets, tokenizer),
            win_rate_steps=cfg.train.eval_every * cfg.train.win_rate_every, last_step=steps)
    return eval_during.SFTEvaluator(datasets.eval, graphdef, rest, mesh=mesh, batch_size=cfg.train.eval_batch_size,
                                    buckets=tuple(cfg.data.buckets), chunks=chunks)


def _win_rate_probe(cfg: RunConfig, datasets: Datasets, tokenizer) -> eval_during.WinRateProbe | None:
    """The judge win rate of ``train.win_rate_every`` (None when 0); RunError without a usable ``eval.judge``."""
    if not cfg.train.win_rate_every:
        return None
    e = cfg.eval
    if not e.judge:
        raise RunError(f"train.win_rate_every={cfg.train.win_rate_every} needs a judge: set eval.judge "
                       "(module:function, path/file.py:function or rm:RUN_DIR)")
    from jaxpref.evaluation import load_judge
    from jaxpref.loading import SpecError

    try:
        judge = load_judge(e.judge)
    except SpecError as err:
        raise RunError(f"eval.judge: {err}") from None
    return eval_during.WinRateProbe(datasets.eval_prompts[: e.win_rate_prompts], judge, tokenizer,
                                    max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                                    max_prompt_length=e.max_prompt_length, chat_template=cfg.data.chat_template,
                                    batch_size=e.batch_size, seed=e.seed)


def open_checkpoints(cfg: RunConfig, run_dir: pathlib.Path, state, it, resume: bool):
    """``(checkpointer, state, start_step)``; on ``resume`` restores the state and the iterator position."""
    checkpointer = ckpt.RunCheckpointer(run_dir / "checkpoints", every=cfg.checkpoint.every,
                                        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                                        keep_best=bool(cfg.checkpoint.keep_best))
    start = 0
    if resume and checkpointer.latest_step() is not None:
        state, meta, start = checkpointer.restore(state)
        it.set_state(meta["data_iterator"])
        log.info("resumed %s at step %d", run_dir, start)
    return checkpointer, state, start


def per_shape(build: Callable[[Any], Callable]) -> Callable[[Any], Callable]:
    """Caches ``build(batch)`` (a jitted step) per batch shape: one compile per bucket, reused after."""
    cache: dict[tuple, Callable] = {}

    def get(batch):
        key = tuple(jax.tree.leaves(jax.tree.map(np.shape, batch)))
        if key not in cache:
            cache[key] = build(batch)
        return cache[key]

    return get


@dataclasses.dataclass
class LoopResult:
    """What :func:`run_steps` hands back: final state, last logged metrics, tokens seen, wall seconds, and
    the time to the first step's metrics and what the loop compiled (:class:`jaxpref.compile_cache.CompileWatch`)."""

    state: Any
    last: dict[str, Any]
    tokens: float
    seconds: float
    first_step_s: float | None = None
    compiles: int = 0
    cache_loads: int = 0
    compile_s: float = 0.0
    eval_s: float = 0.0
    eval_compiles: int = 0
    eval_compile_s: float = 0.0
    eval_last: dict[str, Any] | None = None
    best: dict[str, Any] | None = None

    def timing(self) -> dict[str, Any]:
        """The ``summary.json`` timing record: compile and eval time apart from steady-state throughput
        (``compiles`` / ``compile_s`` include the evaluator's; ``eval_compiles`` counts those alone)."""
        steady = max(self.seconds - (self.compile_s - self.eval_compile_s) - self.eval_s, 1e-9)
        return {"time_to_first_step_s": self.first_step_s, "compiles": self.compiles,
                "cache_loads": self.cache_loads, "compile_s": self.compile_s, "eval_s": self.eval_s,
                "steady_tokens_per_s": self.tokens / steady}

    def eval_summary(self) -> dict[str, Any]:
        """``summary.json``'s ``eval`` record: the last eval row, the eval compiles and the best checkpoint."""
        if self.eval_last is None:
            return {}
        return {"eval": {"last": self.eval_last, "compiles": self.eval_compiles, "seconds": self.eval_s,
                         **({"best_checkpoint": self.best} if self.best is not None else {})}}


def run_steps(cfg: RunConfig, run_dir: pathlib.Path, *, state, it, checkpointer, call, steps: int, start: int,
              resume: bool, schedule, ckpt_meta: dict, after_step=None, desc: str = "train",
              postfix: tuple[str, ...] = ("loss", "tokens_per_s"), place=None,
              reference: Callable[[], Any] | None = None, evaluator=None) -> LoopResult:
    """The step loop shared by every trainer: batches prefetched to the device
    (:mod:`jaxpref.training.prefetch`, ``train.prefetch`` ahead), metrics fetched one step late,
    logging, progress bar, the NaN stop policy, checkpoints (with the iterator state of the step's
    own batch) and fault injection for tests.

    Args:
      place: ``place(host_batch) -> step input`` (device placement, reference-cache lookup), run
        ahead in the prefetch thread; default: the host batch itself.
      call: ``call(state, place(host_batch)) -> (state, device metrics)``.
      ckpt_meta: extra JSON saved with every checkpoint (config, model).
      after_step: optional ``after_step(step, state)`` hook (e.g. reference syncing).
      reference: ``reference() -> params`` saved with every checkpoint (after ``after_step`` ran), for
        runs whose reference changes (TR-DPO syncing); None: no reference item.
      evaluator: ``evaluator(step, state) -> {"eval/...": float}`` on held-out data
        (:mod:`jaxpref.training.eval_during`), run at step 0 and every ``train.eval_every`` steps (when
        it is > 0) and at the last step; its rows are their own ``metrics.jsonl`` lines with ``eval/time_s``. With
        ``checkpoint.keep_best`` an eval step that improves the metric is checkpointed and kept.
    """
    writer = MetricsWriter(run_dir, tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                           config=to_dict(cfg), resume_step=start if resume else None)
    bar = progress_bar(steps, start, cfg.logging.progress, desc=desc)
    pending = AsyncMetrics()
    last: dict[str, Any] = {}
    tokens_total, t_start = 0.0, time.perf_counter()
    first_step_s = None
    shown: dict[str, str] = {}  # the latest eval value on the progress bar
    ev = _EvalState()
    best = None
    if evaluator is not None and cfg.checkpoint.keep_best:
        best = eval_during.BestCheckpoint(run_dir, cfg.checkpoint.keep_best, cfg.checkpoint.keep_best_mode,
                                          start=start, committed=checkpointer.all_steps())

    def record(item):
        nonlocal last, tokens_total, first_step_s
        if item is None:
            return
        s, host, dt = item
        if first_step_s is None:  # the first step's metrics are on the host: it ran, compile included
            first_step_s = time.perf_counter() - t_start
        tokens_total += float(host["tokens"])
        host = {**host, "lr": float(schedule(s - 1)), "tokens_per_s": float(host["tokens"]) / max(dt, 1e-9)}
        if host.get("nonfinite") and cfg.train.nan_policy == "stop":
            rows = [int(r) for r in np.asarray(host.get("_rows", [])) if r >= 0]
            report = run_dir / f"nonfinite_step{s}.json"
            if jax.process_index() == 0:
                report.write_text(json.dumps({"step": s, "source_rows": rows, "metrics": {
                    k: float(np.asarray(v)) for k, v in host.items() if k != "_rows"}}, indent=1))
            raise RunError(f"non-finite loss or gradient at step {s} (batch rows {rows}, saved to {report}); "
                           f"stopping as train.nan_policy=stop; last good checkpoint: {checkpointer.latest_step()}")
        host.pop("_rows", None)
        if s % cfg.train.log_every == 0 or s == steps:
            last = writer.write(s, host)
        bar.set_postfix({**{k: f"{host[k]:.4g}" for k in postfix if k in host}, **shown})

    def evaluate(s, state) -> dict[str, Any]:
        t0 = time.perf_counter()
        with CompileWatch() as w:
            row = evaluator(s, state)
        dt = time.perf_counter() - t0
        ev.seconds, ev.compile_s = ev.seconds + dt, ev.compile_s + w.seconds
        ev.last = {**row, "eval/time_s": dt, "eval/compiles": w.compiles + w.cache_loads}
        ev.last = writer.write(s, ev.last)
        key = getattr(evaluator, "postfix", None)
        if key in row:
            shown[key] = f"{row[key]:.4g}"
            bar.set_postfix(shown)
        return row

    # Fault injection for the reliability tests: SIGKILL before step N, or right after the
    # (asynchronous) checkpoint write of step N was started.
    kill_at = int(os.environ.get("JAXPREF_FAULT_KILL_AT_STEP", "0"))
    kill_after_save = int(os.environ.get("JAXPREF_FAULT_KILL_AFTER_SAVE_STEP", "0"))
    feed = Prefetcher(it, place, depth=cfg.train.prefetch) if start < steps else None
    watch = CompileWatch().__enter__()
    try:
        if evaluator is not None and start == 0 and cfg.train.eval_every > 0:
            evaluate(0, state)
        for s in range(start + 1, steps + 1):
            if s == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            t_wait = time.perf_counter()
            item = next(feed)
            t0 = time.perf_counter()
            state, metrics = call(state, item.placed)
            metrics = {**metrics, "data_wait_s": t0 - t_wait}
            if cfg.train.nan_policy == "stop":
                metrics = {**metrics, "_rows": item.host.index}
            record(pending.push(s, metrics, t0))
            bar.update(1)
            if after_step is not None:
                after_step(s, state)
            new_best = False
            if evaluator is not None and eval_during.due(s, cfg.train.eval_every, steps):
                record(pending.flush())  # the step's own time, without the eval's
                row = evaluate(s, state)
                try:
                    new_best = best is not None and best.improves(row)
                except ValueError as err:
                    raise RunError(str(err)) from None
            if checkpointer.should_save(s) or s == steps or new_best:
                record(pending.flush())
                meta = {"data_iterator": item.iterator_state, "step": s, **ckpt_meta}
                checkpointer.save(s, state, meta, force=(s == steps or new_best),
                                  reference=None if reference is None else reference())
                if new_best:
                    best.update(s, ev.last)
                checkpointer.prune(None if best is None else best.step)
                if s == kill_after_save:
                    os.kill(os.getpid(), signal.SIGKILL)
        record(pending.flush())
        checkpointer.wait()
    finally:
        watch.__exit__()
        if feed is not None:
            feed.close()
        bar.close()
        writer.close()
        checkpointer.close()
    if jax.process_count() > 1:  # leave together, so no process waits alone at the runtime's shutdown barrier
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxpref:end_of_training")
    return LoopResult(state, last, tokens_total, time.perf_counter() - t_start, first_step_s, watch.compiles,
                      watch.cache_loads, watch.seconds, eval_s=ev.seconds, eval_compile_s=ev.compile_s,
                      eval_compiles=getattr(evaluator, "compiles", 0), eval_last=ev.last,
                      best=None if best is None or best.step is None else
                      {"metric": best.metric, "mode": best.mode, "step": best.step, "value": best.value})


@dataclasses.dataclass
class _EvalState:
    seconds: float = 0.0
    compile_s: float = 0.0
    last: dict[str, Any] | None = None


def _positions(data, rows: np.ndarray) -> np.ndarray:
    lookup = getattr(data, "_row_to_pos", None)
    if lookup is None:
        lookup = {int(r): i for i, r in enumerate(data.row)}
        data._row_to_pos = lookup
    return np.array([lookup.get(int(r), -1) for r in rows], np.int64)


def _reference_params(cfg: RunConfig, policy_params, mesh):
    """Frozen reference params: a copy of the initial policy, or another model's params."""
    if cfg.reference.source is None:
        return jax.tree.map(lambda x: x.copy(), policy_params)  # never donated, never updated
    # the policy's layer layout: one graphdef runs both (and TR-DPO mixes their parameters)
    ref = load_model(cfg.reference.source, seed=cfg.train.seed, mesh=mesh, dtype=cfg.model.compute_dtype,
                     param_dtype=cfg.model.param_dtype, overrides={"scan_layers": cfg.model.scan_layers})
    return nnx.split(ref.model, nnx.Param, ...)[1]


def _precompute(cfg: RunConfig, graphdef, rest, ref_params, data, mesh) -> reference.ReferenceLogpCache:
    """Reference log-probs of every pair, computed once (forward only) and cached on disk."""
    data_fp = reference.tokens_fingerprint([data.prompt, data.chosen, data.rejected], data.pad_id)
    key = reference.cache_key(reference.params_fingerprint(ref_params), data_fp)
    bs = cfg.reference.batch_size

    def compute() -> np.ndarray:
        from jaxpref.data.batching import pair_batch

        fwd = jax.jit(parallel.with_activation_sharding(
            lambda p, b: steplib.pair_logps(graphdef, p, rest, b, seq_chunk=cfg.train.seq_chunk,
                                            vocab_chunk=cfg.train.vocab_chunk)[0], mesh))
        out = np.zeros((len(data), 2), np.float32)
        for lo in range(0, len(data), bs):
            idx = list(range(lo, min(lo + bs, len(data))))
            batch = pair_batch(data, idx, buckets=tuple(cfg.data.buckets), batch_size=bs)
            out[lo:lo + len(idx)] = np.asarray(fwd(ref_params, parallel.shard_batch(batch, mesh)))[: len(idx)]
        return out

    return reference.ReferenceLogpCache.load_or_compute(cfg.reference.cache_dir, key, len(data), compute,
                                                       meta={"model": cfg.reference.source or cfg.model.source})


def _sample_reference(cfg: RunConfig, graphdef, rest, ref_params, data,
                      tokenizer) -> reference_samples.ReferenceSamples:
    """Reference samples of every training prompt (TYPO), drawn once and cached on disk."""
    from jaxpref.generation import SamplingConfig

    sc = cfg.reference.samples
    eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    sampling = SamplingConfig(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
                              top_p=sc.top_p, eos_token_ids=eos, pad_token_id=int(data.pad_id))
    return reference_samples.reference_samples_for(
        nnx.merge(graphdef, ref_params, rest), data, n_samples=sc.n, sampling=sampling, seed=sc.seed,
        batch_size=sc.batch_size, cache_dir=sc.cache_dir, buckets=tuple(cfg.data.buckets), params=ref_params,
        progress=cfg.logging.progress, meta={"model": cfg.reference.source or cfg.model.source})
