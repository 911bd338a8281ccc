"""Typed run configs: frozen dataclasses as the schema, YAML files, dotted CLI overrides.

Parsing and validation go through OmegaConf structured configs (a maintained library): an
unknown key, a wrong type or a bad enum value is an error that names the full key, before
anything is compiled. A YAML file may start with ``base: other.yaml`` (relative to itself)
and then list only overrides (style R16). Overrides use dotted keys with YAML values::

    python -m train.preference --config configs/demo.yaml optim.lr=1e-5 'loss=[{name: ipo}]' \
        loss.0.hparams.beta=0.2 mesh.data=-1

**Merge or replace.** Sections (``model``, ``data``, ``optim``, ...) merge key by key down the ``base:``
chain and with overrides. Lists (``loss``, ``data.buckets``) and the free-form mappings of the schema
(``model.overrides``, ``data.fields``, a loss term's ``hparams``: ``dict`` fields, not dataclasses) are
values: a file or a ``key={...}`` override that sets one replaces it whole, so ``overrides: {}`` in a
child clears its base's ``{vocab_size: 512}``; a dotted key (``model.overrides.vocab_size=49152``) sets
one entry and keeps the rest.

The resolved config is saved into every run directory (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxpref.parallel import MeshConfig


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass(frozen=True)
class ModelRunConfig:
    """The run config's ``model:`` section: which model to train and how to hold it (the architecture
    itself is :class:`jaxpref.models.ModelConfig`).

    Attributes:
      source: ``preset:NAME`` (see :mod:`jaxpref.models.presets`), ``hf:DIR`` (an HF directory),
        ``gguf:FILE``, ``llama2c:DIR`` or ``run:RUN_DIR[@STEP]`` (a jaxpref checkpoint).
      overrides: :class:`jaxpref.models.ModelConfig` field overrides for ``preset:`` sources (e.g. ``{num_layers: 2}``).
      tokenizer: tokenizer source when it differs from ``source`` (same syntax), or ``byte``
        for the built-in byte tokenizer of synthetic runs.
      param_dtype: ``float32`` or ``bfloat16``.
      compute_dtype: ``float32`` or ``bfloat16``.
      remat: rematerialise each layer in the backward pass.
      remat_policy: what a rematerialised layer keeps: ``full`` (only its input), ``dots_no_batch``
        (the weight-matmul outputs) or ``dots`` (every matmul output); see
        :class:`jaxpref.models.ModelConfig`.
      attention: attention backend ``auto | xla | blocked | cudnn | splash | pallas_gpu``
        (:mod:`jaxpref.models.attention`).
      scan_layers: stack the layers' parameters on a leading ``layers`` axis and run them under
        ``lax.scan`` (compile time flat in depth; same numbers). Checkpoints convert between layouts.
      adapter: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) applied
        on top of ``source`` (:mod:`jaxpref.models.lora_peft`); None = none.
    """

    source: str = "preset:tiny_llama"
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    attention: str = "auto"
    scan_layers: bool = False
    adapter: str | None = None

    def model_overrides(self) -> dict[str, Any]:
        """``overrides`` plus the rematerialisation, attention and layer-layout settings: what model loading
        applies."""
        extra = {"remat": True, "remat_policy": self.remat_policy} if self.remat else {}
        if self.attention != "auto":
            extra["attention"] = self.attention
        if self.scan_layers:
            extra["scan_layers"] = True
        return {**self.overrides, **extra}


@dataclass(frozen=True)
class DataConfig:
    """Where pairs come from and how they are tokenised and batched.

    Attributes:
      train: local path (json/jsonl(.gz)/parquet) or HF hub id of the training pairs.
      eval: optional held-out pairs (same syntax), evaluated during training (``train.eval_every``).
      eval_split: hold out this fraction of ``train``'s records (after ``limit``) instead, ``0 < f < 1``
        (0 = none): seeded by ``split_seed``, disjoint from the training rows, recorded in
        ``RUN_DIR/eval_split.json`` and kept on resume (:mod:`jaxpref.data.split`). Exclusive with ``eval``.
      split_seed: seed of ``eval_split`` (None = ``train.seed``).
      split: split for hub datasets.
      format: ``auto``, ``explicit``, ``hh``, ``messages``, ``votes``, ``llmfao``, ``pandalm``,
        ``sft`` (prompt/response demonstrations), ``multi`` / ``ultrafeedback`` / ``completions`` /
        ``ratings`` (n scored responses per prompt, :mod:`jaxpref.data.multi_response`).
      multi_pairs: how ``multi`` rows become training (and held-out) pairs: ``best_vs_worst``,
        ``best_vs_random`` (seeded by ``train.seed`` and the source row) or ``all_pairs``; tied
        scores are never paired (skipped and counted in ``summary.json``'s ``data.pairs``). The
        held-out split is drawn over prompts, before the pairs.
      fields: field-name mapping, e.g. ``{prompt: question, chosen: good, rejected: bad}``.
      limit: keep only the first N rows (after loading), or None for all.
      max_length: longest prompt+response in tokens.
      max_prompt_length: longest prompt in tokens (None: no separate limit).
      truncation: ``keep_end`` (drop the oldest prompt tokens), ``truncate_response`` or ``drop``.
      buckets: allowed padded lengths (ascending, the last >= max_length); few shapes, few compiles.
      chat_template: render prompts with the tokenizer's chat template when it has one.
      add_eos: append EOS to responses (it is then a target token).
      shuffle: shuffle each epoch (seeded by ``train.seed``).
      packing: preference runs only: pack the chosen and rejected sequences of each batch into
        rows of ``max_length`` tokens by first-fit decreasing (:mod:`jaxpref.data.packing`; each
        sequence its own segment, so a pair's two sides never attend to each other; one static
        shape, ``buckets`` unused). Same losses and gradients as padded batches; on HH-RLHF at
        512 tokens 81 % of the slots are real tokens instead of 41 % (``bench/README.md``).
      pack_rows: rows per batch (over all processes) when packing; 0 = automatic (the batch's
        mean pair length at 90 % row occupancy, a multiple of ``train.micro_batches`` x the
        data-parallel devices). A pair that does not fit opens the next batch.
      share_prompt: preference runs only: one row per pair, ``[prompt | chosen | rejected]``, so each
        prompt is computed once (the rejected tokens attend to the prompt and themselves, never to
        chosen, with the positions of their own sequence; same log-probs, losses and gradients, see
        ``tests/test_shared_prompt.py``). With ``packing`` several such rows share a packed row;
        without, the row is padded to the smallest bucket that holds it (``buckets`` extended by
        doubling when ``prompt + chosen + rejected`` exceeds the largest).
    """

    train: str = ""
    eval: str | None = None
    eval_split: float = 0.0
    split_seed: int | None = None
    split: str = "train"
    format: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    multi_pairs: str = "best_vs_worst"
    limit: int | None = None
    max_length: int = 512
    max_prompt_length: int | None = None
    truncation: str = "keep_end"
    buckets: list[int] = field(default_factory=lambda: [128, 256, 512])
    chat_template: bool = True
    add_eos: bool = True
    shuffle: bool = True
    packing: bool = False
    pack_rows: int = 0
    share_prompt: bool = False

    def __post_init__(self):
        """The limits batching and tokenisation need, checked before anything is loaded."""
        if self.max_length < 2:
            raise ConfigError(f"data.max_length={self.max_length!r}: expected >= 2")
        from jaxpref.data.multi_response import PAIR_MODES

        if self.multi_pairs not in PAIR_MODES:
            raise ConfigError(f"data.multi_pairs={self.multi_pairs!r}: expected one of {list(PAIR_MODES)}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"data.eval_split={self.eval_split!r}: expected a fraction in [0, 1) (0 = no hold-out)")
        if self.eval_split and self.eval:
            raise ConfigError(f"data.eval={self.eval!r} and data.eval_split={self.eval_split!r}: give held-out data "
                              "one way (a file, or a fraction of data.train)")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(f"data.max_prompt_length={self.max_prompt_length!r}: expected in [1, data.max_length)")
        if not self.packing and (not self.buckets or list(self.buckets) != sorted(set(self.buckets))
                                 or self.buckets[-1] < self.max_length):
            raise ConfigError(f"data.buckets={list(self.buckets)!r}: expected ascending lengths, the last >= "
                              f"data.max_length={self.max_length}")


@dataclass(frozen=True)
class LossTermConfig:
    """One weighted term of the objective (the registry name and its hyperparameters)."""

    name: str = "sigmoid"
    weight: float = 1.0
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule (optax).

    Attributes:
      name: ``adamw``, ``adam``, ``rmsprop`` (as in Razin et al.), ``sgd`` or ``adafactor``.
      lr: peak learning rate.
      schedule: ``constant``, ``cosine`` or ``linear`` (decay after warmup to ``lr * end_factor``).
      warmup_steps: linear warmup from 0.
      end_factor: final lr as a fraction of ``lr`` for cosine / linear.
      weight_decay: decoupled weight decay (adamw) or L2 (others via optax.add_decayed_weights).
      decay_norms_and_biases: include 1-D parameters (norm scales, biases) in weight decay.
      b1, b2, eps: Adam moments; ``b2`` is RMSProp's decay.
      momentum: SGD / RMSProp momentum (0 = none).
      clip_norm: global gradient-norm clipping threshold (None = off).
      state_dtype: dtype of the optimizer state and update arithmetic (``float32`` keeps the Adam moments of
        bfloat16 parameters in float32); None = the parameters' dtype.
    """

    name: str = "adamw"
    lr: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    end_factor: float = 0.0
    weight_decay: float = 0.0
    decay_norms_and_biases: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    clip_norm: float | None = 1.0
    state_dtype: str | None = None


@dataclass(frozen=True)
class ReferenceSamplesConfig:
    """Responses sampled once from the frozen reference for every training prompt (TYPO's unsupervised
    term, :mod:`jaxpref.training.reference_samples`). Enable with ``reference.samples={}`` (defaults) or
    e.g. ``'reference.samples={n: 2, max_new_tokens: 64}'``; the reference is ``reference.source``
    (None: the initial policy) whatever ``reference.strategy`` is.

    Attributes:
      n: samples per pair's prompt; the loss uses the mean of their policy log-probs.
      max_new_tokens: longest sample (EOS included); a sample cut here is scored as it is.
      temperature: sampling temperature; 1 (with top_k 0, top_p 1) draws true samples of π_ref, which
        the KL(π_ref ‖ πθ) reading of the term assumes.
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus mass (1 = off).
      seed: base seed; draw ``j`` of source row ``r`` uses ``fold_in(fold_in(key(seed), r), j)``.
      batch_size: sequences per generation call.
      cache_dir: where samples are cached (keyed by reference params, prompts, these settings, seed).
    """

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    cache_dir: str = "~/.cache/jaxpref/reference_samples"

    def __post_init__(self):
        checks = {"n": self.n >= 1, "max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature > 0,
                  "top_k": self.top_k >= 0, "top_p": 0.0 < self.top_p <= 1.0, "batch_size": self.batch_size >= 1}
        wanted = {"n": ">= 1", "max_new_tokens": ">= 1", "temperature": "> 0 (samples, not greedy)",
                  "top_k": ">= 0 (0 = off)", "top_p": "in (0, 1]", "batch_size": ">= 1"}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"reference.samples.{name}={getattr(self, name)!r}: expected {wanted[name]}")


@dataclass(frozen=True)
class ReferenceConfig:
    """How reference log-probs are obtained.

    Attributes:
      strategy: ``live`` (frozen reference params, forward inside the step), ``precomputed``
        (computed once, cached on disk, read with the batch) or ``none`` (reference-free losses).
      source: reference model (same syntax as ``model.source``); None = the initial policy.
      cache_dir: where precomputed log-probs are cached (keyed by fingerprints).
      batch_size: batch size of the precompute pass (larger than training's: forward only).
      sync_every: TR-DPO reference syncing every N steps (0 = never). Needs ``strategy: live`` (the
        reference params are updated); the synced reference is checkpointed, so ``--resume`` continues
        with it.
      sync_alpha: soft update ``ref <- alpha * policy + (1 - alpha) * ref`` at each sync, in (0, 1].
      samples: reference samples for TYPO's unsupervised term (:class:`ReferenceSamplesConfig`); None =
        off (a loss that needs them is then a config error). Drawn once from the initial reference.
    """

    strategy: str = "live"
    source: str | None = None
    cache_dir: str = "~/.cache/jaxpref/reference_logps"
    batch_size: int = 32
    sync_every: int = 0
    sync_alpha: float = 1.0
    samples: ReferenceSamplesConfig | None = None

    def __post_init__(self):
        if self.sync_every < 0:
            raise ConfigError(f"reference.sync_every={self.sync_every!r}: expected >= 0 (0 = never sync)")
        if not 0.0 < self.sync_alpha <= 1.0:
            raise ConfigError(f"reference.sync_alpha={self.sync_alpha!r}: expected a value in (0, 1]")
        if self.sync_every and self.strategy in ("precomputed", "none"):
            held = "cached log-probs" if self.strategy == "precomputed" else "no reference"
            raise ConfigError(f"reference.sync_every={self.sync_every} needs reference params to update, but "
                              f"reference.strategy={self.strategy} holds {held}: use reference.strategy=live "
                              "or reference.sync_every=0")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the policy (:mod:`jaxpref.models.lora`): only the adapters train, the base is frozen and
    the DPO reference is the base with the adapters off (no second parameter tree; with ``reference.sync_every``,
    TR-DPO, the base plus a copy of the adapters taken at each sync, ``reference.sync_alpha`` 1 only). Enable with
    ``lora={}`` (defaults) or e.g. ``'lora={rank: 16, alpha: 32}'``.

    Attributes:
      rank: adapter rank r >= 1.
      alpha: the update is ``alpha / rank * B A``.
      dropout: dropout rate on the adapters' input in training steps (PEFT's ``lora_dropout``; never in the
        reference, evaluation or generation), keyed by ``train.seed`` and the step.
      targets: regex (``re.search``) over projection paths such as ``layers.0.attn.query_dnh`` or
        ``layers.3.mlp.down_fd``; the default takes every attention and MLP projection.
      quantize: ``int8`` or ``int4``: store the frozen base quantised (QLoRA, :func:`jaxpref.models.lora.quantize`);
        None = as loaded.
      seed: seeds the adapters' ``A`` init.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r"(attn\.(query_dnh|key_dkh|value_dkh|out_nhd)|mlp\.(gate_df|up_df|down_fd))$"
    quantize: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.rank <= 0:
            raise ConfigError(f"lora.rank={self.rank!r}: expected a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout!r}: expected a rate in [0, 1)")
        if not self.targets:
            raise ConfigError("lora.targets is empty: expected a regex over parameter paths")


@dataclass(frozen=True)
class TrainLoopConfig:
    """Steps, batch sizes and cadence.

    Attributes:
      steps: optimizer steps (0 = one epoch of the data).
      epochs: used when ``steps == 0``.
      batch_size: pairs (or SFT examples) per optimizer step, over all processes.
      micro_batches: gradient-accumulation micro-batches per step (divides ``batch_size``).
      seed: seeds init, dropout-free sampling and data order.
      log_every: metrics cadence in steps.
      eval_every: held-out evaluation every N steps, and at step 0 and the last step (0 = only at the
        last step); needs ``data.eval`` or ``data.eval_split`` (:mod:`jaxpref.training.eval_during`).
      eval_batch_size: pairs (or examples) per eval forward (packed: their tokens, on average).
      win_rate_every: preference runs: also the judge win rate of the policy against the initial reference
        on ``eval.win_rate_prompts`` held-out prompts, every N-th eval (steps divisible by
        ``eval_every * N``) and at the last step; 0 = never. Needs ``eval.judge``.
      nan_policy: ``skip`` (drop the update, count it) or ``stop`` (save the batch ids and stop).
      seq_chunk, vocab_chunk: chunk sizes of :func:`jaxpref.logprobs.sequence_logprobs`.
      prefetch: batches drawn and placed on the device ahead of the running step, in a background
        thread (:mod:`jaxpref.training.prefetch`); 0 = synchronous. Resuming is exact either way.
    """

    steps: int = 0
    epochs: int = 1
    batch_size: int = 8
    micro_batches: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_batch_size: int = 8
    win_rate_every: int = 0
    nan_policy: str = "skip"
    seq_chunk: int = 128
    vocab_chunk: int = 8192
    prefetch: int = 2

    def __post_init__(self):
        if self.prefetch < 0:
            raise ConfigError(f"train.prefetch={self.prefetch!r}: expected >= 0 (0 = no prefetch thread)")
        if self.win_rate_every < 0:
            raise ConfigError(f"train.win_rate_every={self.win_rate_every!r}: expected >= 0 (0 = never)")
        if self.eval_every < 0 or self.eval_batch_size < 1:
            bad = "eval_every" if self.eval_every < 0 else "eval_batch_size"
            raise ConfigError(f"train.{bad}={getattr(self, bad)!r}: expected "
                              f"{'>= 0 (0 = only at the end)' if bad == 'eval_every' else '>= 1'}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing.

    Attributes:
      every: save every N steps (and always at the end); 0 = only at the end.
      keep: how many checkpoints to keep (the last ones).
      async_save: write in the background while training continues.
      keep_best: an eval metric (``eval/loss``, ``eval/ranking_accuracy``, ...; the ``eval/`` prefix may be
        left out): the checkpoint of the best eval step so far is also kept, beside the last ``keep``
        (a checkpoint is written at an eval step that improves it). None = off.
      keep_best_mode: ``max``, ``min`` or ``auto`` (``min`` for metrics named ``*loss*``, ``*gap*`` or
        ``*displaced*``, else ``max``).
    """

    every: int = 100
    keep: int = 2
    async_save: bool = True
    keep_best: str | None = None
    keep_best_mode: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """The judge win rate logged during preference training (``train.win_rate_every``), as ``eval.win_rate``
    computes it: one response per prompt from the policy and from the initial reference (the same seed per
    prompt), judged in a seeded random order, ties counted ½, a seeded percentile bootstrap interval.

    Attributes:
      win_rate_prompts: the first N held-out prompts.
      judge: ``module:function``, ``path/file.py:function`` or ``rm:RUN_DIR[@STEP]`` (see ``eval.win_rate``).
      max_new_tokens: sampled response length limit.
      temperature: sampling temperature (0 = greedy).
      max_prompt_length: prompts longer than this lose their oldest tokens.
      batch_size: prompts per generation call.
      seed: sampling, position and bootstrap seed.
    """

    win_rate_prompts: int = 64
    judge: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.7
    max_prompt_length: int = 256
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides ``metrics.jsonl`` (always written)."""

    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class WROConfig:
    """Win-rate optimisation (``train.wro``; papers-addendum.md "Win-rate optimisation", a reconstruction).

    Each step takes ``train.batch_size`` prompts, samples K responses per prompt from the policy, judges
    each against C competitor responses, and takes one REINFORCE step with RLOO advantages and a KL
    penalty to the frozen reference (:mod:`jaxpref.losses.wro`).

    Attributes:
      prompts: prompt data: a ``.txt`` file (one prompt per line), rows with a ``prompt`` field, or any
        preference / SFT dataset the data pipeline reads (its prompts; its responses for ``dataset``).
      prompts_format: data format of ``prompts`` (``auto`` detects; see ``data.format``).
      prompts_limit: keep only the first N prompts (None = all).
      max_prompt_length: prompts longer than this lose their oldest tokens.
      samples_per_prompt: K policy samples per prompt (>= 2: the leave-one-out baseline needs them).
      competitor: ``reference`` (samples of the frozen reference), ``self_play`` (fresh samples of the
        current policy, treated as constants) or ``dataset`` (the prompts file's responses).
      competitor_samples: C competitor samples per prompt for ``reference`` / ``self_play``.
      dataset_responses: for ``dataset``: ``chosen`` (or an SFT file's response), ``rejected`` or ``both``.
      h: ``identity`` (win rate), ``logit`` (RLHF under a BT judge) or ``log``.
      beta: KL(π ‖ π_ref) coefficient (0 = none; then no reference forward is needed).
      kl_estimator: ``k1``, ``k2`` or ``k3`` (how the KL enters the gradient: jaxpref.losses.wro).
      max_new_tokens: sampled response length limit (EOS included).
      temperature: sampling temperature; 1 samples from π itself, which the unbiased estimator assumes.
      judge: ``module:function`` / ``path/file.py:function`` returning P(a ≻ b) for ``(prompts, a, b)``
        texts, ``rm:RUN_DIR[@STEP]`` (a jaxpref reward model), or ``token:module:object`` (a token-level
        judge: jaxpref.training.wro.TokenJudge; a class is instantiated without arguments).
      judge_batch_size: batch size of reward-model judges.
      swap_positions: show the policy's response second to the judge for a random half of the pairs
        (cancels position bias; P is mapped back to P(policy ≻ competitor)).
    """

    prompts: str = ""
    prompts_format: str = "auto"
    prompts_limit: int | None = None
    max_prompt_length: int = 256
    samples_per_prompt: int = 4
    competitor: str = "reference"
    competitor_samples: int = 1
    dataset_responses: str = "chosen"
    h: str = "identity"
    beta: float = 0.05
    kl_estimator: str = "k1"
    max_new_tokens: int = 64
    temperature: float = 1.0
    judge: str = ""
    judge_batch_size: int = 16
    swap_positions: bool = True


@dataclass(frozen=True)
class RunConfig:
    """A whole training run (``train.sft``, ``train.preference``, ``train.reward_model``, ``train.wro``)."""

    run_dir: str = "runs/default"
    model: ModelRunConfig = field(default_factory=ModelRunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: list[LossTermConfig] = field(default_factory=lambda: [LossTermConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wro: WROConfig = field(default_factory=WROConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig | None = None


_CHOICES = {
    "optim.name": ("adamw", "adam", "rmsprop", "sgd", "adafactor"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "optim.state_dtype": ("float32", "bfloat16"),
    "reference.strategy": ("live", "precomputed", "none"),
    "data.truncation": ("keep_end", "truncate_response", "drop"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("full", "dots_no_batch", "dots"),
    "model.attention": ("auto", "xla", "blocked", "cudnn", "splash", "pallas_gpu"),
    "train.nan_policy": ("skip", "stop"),
    "checkpoint.keep_best_mode": ("auto", "max", "min"),
    "wro.competitor": ("reference", "self_play", "dataset"),
    "wro.dataset_responses": ("chosen", "rejected", "both"),
    "wro.h": ("identity", "logit", "log"),
    "wro.kl_estimator": ("k1", "k2", "k3"),
    "lora.quantize": ("int8", "int4"),
}


def _unfreeze(node) -> None:
    """OmegaConf marks frozen dataclasses read-only; lift that on every node so merges work."""
    OmegaConf.set_readonly(node, False)
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for k in keys:
        child = node._get_node(k)
        if isinstance(child, DictConfig | ListConfig):
            _unfreeze(child)


def _read_yaml(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> list[dict]:
    """Reads a YAML file and its ``base:`` chain, base first."""
    path = path.expanduser().resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _read_yaml(path.parent / base, (*seen, path)) if base else []
    return [*chain, {"__file__": str(path), **data}]


def load_config(schema: type, path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()):
    """Builds a frozen config instance of ``schema`` from YAML and dotted overrides.

    Args:
      schema: a dataclass type (e.g. :class:`RunConfig`).
      path: optional YAML file (may use ``base:``).
      overrides: ``key.sub=value`` strings; values are parsed as YAML.

    Raises:
      ConfigError: naming the file or override and the offending key.
    """
    cfg = OmegaConf.structured(schema)
    _unfreeze(cfg)
    for layer in _read_yaml(pathlib.Path(path)) if path else []:
        source = layer.pop("__file__")
        try:
            cfg = _merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {_merge_error(cfg, layer, err)}") from None
        _unfreeze(cfg)
        _check_choices(cfg, where=f"{source}: ")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            cfg = _apply_override(cfg, key.strip(), yaml.safe_load(raw))
        except (OmegaConfBaseException, yaml.YAMLError, ConfigError) as err:
            raise ConfigError(f"override {item!r}: {_first_lines(err)}") from None
        _unfreeze(cfg)
        _check_choices(cfg, where=f"override {item!r}: ")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_first_lines(err)) from None
    _check_choices(obj)
    return obj


def _merge(cfg, layer: dict):
    """Merges ``layer`` into ``cfg``; the free-form mappings it sets replace the old ones (module docstring)."""
    for dotted in _free_form_keys(cfg, layer):
        OmegaConf.update(cfg, dotted, {}, merge=False)
    return OmegaConf.merge(cfg, OmegaConf.create(layer))


def _free_form_keys(node, layer: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``layer`` that set a ``dict`` field of the schema (as opposed to a dataclass section)."""
    out = []
    for key, value in layer.items():
        child = node._get_node(key) if isinstance(node, DictConfig) and isinstance(key, str) and key in node else None
        if not (isinstance(child, DictConfig) and isinstance(value, dict)):
            continue
        meta = child._metadata
        if dataclasses.is_dataclass(meta.object_type) or dataclasses.is_dataclass(meta.ref_type):
            if not child._is_none():  # an unset optional section (reference.samples) holds nothing to replace
                out += _free_form_keys(child, value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _apply_override(cfg, key: str, value):
    """Sets one dotted key. Containers merge through the schema (so ``loss=[{name: ipo}]`` builds
    typed entries); scalars and list-index keys (``loss.0.weight``) are set in place."""
    parts = key.split(".")
    if isinstance(value, dict | list) and not any(p.isdigit() for p in parts):
        nested = value
        for part in reversed(parts):
            nested = {part: nested}
        return _merge(cfg, nested)
    node = cfg
    for i, part in enumerate(parts[:-1]):  # a clear message for list indices past the end
        node = node[int(part)] if isinstance(node, ListConfig) and part.isdigit() else node.get(part)
        if node is None:  # an unset optional section (lora, reference.samples)
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is not set: set the section itself, e.g. "
                              f"{'.'.join(parts[:i + 1])}={{{parts[i + 1]}: ...}}")
        nxt = parts[i + 1]
        if isinstance(node, ListConfig) and nxt.isdigit() and int(nxt) >= len(node):
            raise ConfigError(f"index {nxt} is out of range ({'.'.join(parts[:i + 1])} has {len(node)} entries)")
        if not isinstance(node, DictConfig | ListConfig):
            break
    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _merge_error(cfg, layer: dict, err: Exception) -> str:
    """The merge error, located in a list of typed entries when OmegaConf loses the path (``loss.0``)."""
    for key, value in layer.items():
        node = cfg._get_node(key) if isinstance(cfg, DictConfig) and key in cfg else None
        element = getattr(getattr(node, "_metadata", None), "element_type", None)
        if not (isinstance(node, ListConfig) and isinstance(value, list) and dataclasses.is_dataclass(element)):
            continue
        for i, item in enumerate(value):
            entry = OmegaConf.structured(element)
            _unfreeze(entry)
            try:
                OmegaConf.merge(entry, item)
            except OmegaConfBaseException as item_err:
                return f"{key}.{i}: {_first_lines(item_err)}"
    return _first_lines(err)


def _first_lines(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines()[:2])


def _check_choices(obj, where: str = "") -> None:
    """Checks the enumerated fields of a config (instance or OmegaConf node); ``where`` prefixes errors."""
    for dotted, allowed in _CHOICES.items():
        node = obj
        for part in dotted.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None and node not in allowed:
            raise ConfigError(f"{where}{dotted}={node!r}: expected one of {list(allowed)}")


def to_dict(obj) -> dict:
    """A plain (JSON/YAML-able) dict of a config instance."""
    return dataclasses.asdict(obj)


def save_config(obj, path: str | pathlib.Path) -> None:
    """Writes the resolved config as YAML (atomic rename)."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    tmp.replace(path)


def config_from_dict(schema: type, data: dict):
    """Rebuilds a config instance from :func:`to_dict` output (e.g. a saved ``config.yaml``)."""
    cfg = OmegaConf.structured(schema)
    _unfreeze(cfg)
    try:
        return OmegaConf.to_object(OmegaConf.merge(cfg, OmegaConf.create(data)))
    except OmegaConfBaseException as err:
        raise ConfigError(_first_lines(err)) from None
