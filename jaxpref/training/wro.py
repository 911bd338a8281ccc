"""On-policy win-rate optimisation (``python -m train.wro``; papers-addendum.md "Win-rate optimisation").

Each step, for ``train.batch_size`` = B prompts (a deterministic, resumable walk over the prompt data):

1. sample K = ``wro.samples_per_prompt`` responses per prompt from the current policy
   (:func:`jaxpref.generation.generate`, one compile per prompt-length bucket);
2. draw C competitor responses per prompt: samples of the frozen reference (``reference``), fresh
   samples of the current policy treated as constants (``self_play``), or the data's responses
   (``dataset``);
3. judge all B·K·C (policy, competitor) pairs with a :class:`TokenJudge` (positions randomly swapped,
   then mapped back to P(policy ≻ competitor));
4. values ``v = mean_c h(p)``, RLOO advantages (:mod:`jaxpref.losses.wro`);
5. one optimizer step on the REINFORCE surrogate, with the policy's log-probs from one chunked forward of
   the ``[B·K, T]`` prompt+response sequences and a per-token KL estimator against the frozen reference.

Sampling keys are ``fold_in(key(train.seed), step)``, so a resumed run draws exactly the samples an
uninterrupted run would, and ends with the same parameters. Run directories, checkpoints, metrics JSONL,
progress bars and the NaN policy are those of :mod:`jaxpref.training.loop`.

Judges. Everything is adapted to the token-level :class:`TokenJudge` protocol: text callables and
``rm:`` reward models through :class:`TextJudge` (responses decoded with the policy's tokenizer, prompts
given as the original prompt text), and any Python object implementing the protocol (e.g. the exact
oracle of the synthetic testbed) directly, through ``run_wro(cfg, judge=obj)`` or ``wro.judge:
token:module:object``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref import parallel
from jaxpref.config import RunConfig, to_dict
from jaxpref.data import formats as data_formats
from jaxpref.data.formats import SFTRecord
from jaxpref.data.sources import DataError
from jaxpref.data.tokenize import tokenize_sft
from jaxpref.generation import SamplingConfig, generate, left_pad
from jaxpref.loading import SpecError
from jaxpref.losses import wro as wro_losses
from jaxpref.training import adapters, eval_during, loop, optim
from jaxpref.training import step as steplib
from jaxpref.training.loop import RunError

log = logging.getLogger(__name__)

Array = jax.Array


# ------------------------------------------------------------------------------------ judges


@runtime_checkable
class TokenJudge(Protocol):
    """``judge(prompt_ids, a_ids, a_mask, b_ids, b_mask) -> p [n]``: P(response a ≻ response b | prompt).

    Args (host NumPy):
      prompt_ids: ``[n, P]`` int32 prompts as the policy saw them, left padded with ``-1`` (real tokens are
        ``>= 0``; no column is padding in every row).
      a_ids, b_ids: ``[n, N]`` int32 responses (EOS included where emitted), right padded.
      a_mask, b_mask: ``[n, N]`` int32, 1 on response tokens.

    Returns:
      ``[n]`` probabilities in [0, 1].
    """

    def __call__(self, prompt_ids: np.ndarray, a_ids: np.ndarray, a_mask: np.ndarray, b_ids: np.ndarray,
                 b_mask: np.ndarray) -> np.ndarray: ...


class TextJudge:
    """Adapts a text judge ``fn(prompts, responses_a, responses_b) -> [n]`` to :class:`TokenJudge`.

    Responses are decoded with ``tokenizer`` (special tokens and the trailing EOS dropped); prompts are
    the original prompt objects when ``prompt_texts`` knows their token ids, else decoded.

    Args:
      fn: the text judge (:func:`jaxpref.evaluation.load_judge` returns one; reward models included).
      tokenizer: the policy's tokenizer.
      prompt_texts: ``{tuple(prompt token ids): prompt}``.
    """

    def __init__(self, fn, tokenizer, prompt_texts: dict[tuple[int, ...], Any] | None = None):
        self.fn, self.tokenizer, self.prompt_texts = fn, tokenizer, prompt_texts or {}
        self._eos = {t for t in (tokenizer.eos_token_id,) if t is not None}

    def decode(self, ids: np.ndarray, mask: np.ndarray) -> str:
        toks = [int(t) for t in np.asarray(ids)[np.asarray(mask) > 0]]
        while toks and toks[-1] in self._eos:
            toks.pop()
        return self.tokenizer.decode(toks, skip_special_tokens=True)

    def prompt(self, row: np.ndarray) -> Any:
        key = tuple(int(t) for t in row if t >= 0)
        return self.prompt_texts[key] if key in self.prompt_texts else self.tokenizer.decode(
            list(key), skip_special_tokens=True)

    def __call__(self, prompt_ids, a_ids, a_mask, b_ids, b_mask) -> np.ndarray:
        prompts = [self.prompt(r) for r in prompt_ids]
        a = [self.decode(i, m) for i, m in zip(a_ids, a_mask, strict=True)]
        b = [self.decode(i, m) for i, m in zip(b_ids, b_mask, strict=True)]
        return np.asarray(self.fn(prompts, a, b), np.float64)


def load_token_judge(spec: str, tokenizer, prompt_texts: dict | None = None, *, batch_size: int = 16) -> TokenJudge:
    """A :class:`TokenJudge` from ``wro.judge``: ``token:module:object``, ``rm:RUN_DIR[@STEP]`` or a text
    callable ``module:function`` / ``path/file.py:function`` (the last two through :class:`TextJudge`)."""
    from jaxpref.evaluation import _import_callable, load_judge

    if not spec:
        raise RunError("wro.judge is empty: give module:function, path/file.py:function, rm:RUN_DIR or "
                       "token:module:object")
    if spec.startswith("token:"):
        obj = _import_callable(spec[len("token:"):])
        obj = obj() if isinstance(obj, type) else obj
        return obj
    fn = load_judge(spec, batch_size=batch_size) if spec.startswith("rm:") else load_judge(spec)
    return TextJudge(fn, tokenizer, prompt_texts)


# ------------------------------------------------------------------------------------ prompts


@dataclasses.dataclass
class PromptTable:
    """Tokenised prompts (and, for ``competitor=dataset``, responses) in load order.

    Attributes:
      prompt_ids: per prompt, ``[P_i]`` int32 token ids (rendered as in training, oldest tokens dropped
        past ``wro.max_prompt_length``).
      prompts: the original prompt objects (texts or turns), for text judges.
      rows: ``[n]`` int64 row of each prompt in its source.
      responses: per prompt, the C dataset responses (``[N_c]`` int32 ids each, EOS included when
        ``data.add_eos``), or None.
      n_rejected: prompts the tokenisation pipeline rejected.
    """

    prompt_ids: list[np.ndarray]
    prompts: list[Any]
    rows: np.ndarray
    responses: list[list[np.ndarray]] | None
    n_rejected: int

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def texts_by_ids(self) -> dict[tuple[int, ...], Any]:
        return {tuple(int(t) for t in ids): p for ids, p in zip(self.prompt_ids, self.prompts, strict=True)}


_UNBOUNDED_RESPONSE = 1 << 20


def load_prompt_table(cfg: RunConfig, tokenizer) -> PromptTable:
    """Reads ``wro.prompts`` (module docstring); dataset responses only for ``competitor=dataset``."""
    w = cfg.wro
    tok_cfg = dataclasses.replace(loop.tokenize_config(cfg), max_length=w.max_prompt_length + w.max_new_tokens,
                                  max_prompt_length=w.max_prompt_length)
    if w.competitor != "dataset":
        from jaxpref.evaluation import encode_prompts, load_prompts

        _, prompts = load_prompts(w.prompts, format=w.prompts_format, split=cfg.data.split, limit=w.prompts_limit)
        encoded = encode_prompts(tokenizer, prompts, tok_cfg)
        keep = [i for i, e in enumerate(encoded) if e is not None and len(e) > 0]
        return PromptTable([np.asarray(encoded[i], np.int32) for i in keep], [prompts[i] for i in keep],
                           np.asarray(keep, np.int64), None, len(prompts) - len(keep))
    # Room for any response, so that the prompt budget is max_prompt_length alone (keep_end would otherwise
    # shorten prompts to fit long responses); responses are cut at max_new_tokens below, like samples.
    tok_cfg = dataclasses.replace(tok_cfg, max_length=w.max_prompt_length + _UNBOUNDED_RESPONSE)
    fmt = data_formats.format_config(None if w.prompts_format == "auto" else w.prompts_format)
    data = data_formats.load_preferences(w.prompts, fmt, split=cfg.data.split)
    records = data.records[: w.prompts_limit] if w.prompts_limit else data.records
    if not records:
        raise RunError(f"wro.prompts {w.prompts}: no usable rows ({data.rejects.summary()})")
    if isinstance(records[0], SFTRecord):
        if w.dataset_responses != "chosen":
            raise RunError(f"wro.dataset_responses={w.dataset_responses!r}: {w.prompts} holds demonstrations "
                           "(one response per prompt); use chosen")
        fields = ["response"]
    else:
        fields = {"chosen": ["chosen"], "rejected": ["rejected"], "both": ["chosen", "rejected"]}[w.dataset_responses]
    per_field = [tokenize_sft([SFTRecord(r.row, r.id, r.prompt, getattr(r, f)) for r in records], tokenizer, tok_cfg)
                 for f in fields]
    common = sorted(set.intersection(*(set(t.row.tolist()) for t in per_field)))
    if not common:
        raise RunError(f"wro.prompts {w.prompts}: no row survived tokenisation")
    pos = [{int(r): i for i, r in enumerate(t.row)} for t in per_field]
    by_row = {r.row: r for r in records}
    first = per_field[0]
    return PromptTable(
        prompt_ids=[np.asarray(first.prompt[pos[0][r]], np.int32) for r in common],
        prompts=[by_row[r].prompt for r in common],
        rows=np.asarray(common, np.int64),
        responses=[[np.asarray(t.response[p[r]][: w.max_new_tokens], np.int32) for t, p in zip(per_field, pos,
                                                                                              strict=True)]
                   for r in common],
        n_rejected=len(records) - len(common))


@dataclasses.dataclass
class PromptBatch:
    """One step's prompts: ``positions`` into the :class:`PromptTable`, their source ``index``, the step."""

    positions: np.ndarray
    index: np.ndarray
    step: int


class PromptIterator:
    """Deterministic walk over the prompts: step s takes positions ``[(s−1)·B, s·B)`` of the concatenated
    per-epoch orders (a seeded permutation per epoch when ``shuffle``). Its state is the step count."""

    def __init__(self, table: PromptTable, batch_size: int, seed: int, shuffle: bool):
        self.table, self.batch_size, self.seed, self.shuffle = table, batch_size, seed, shuffle
        self.step = 0
        self._plans: dict[int, np.ndarray] = {}

    def _plan(self, epoch: int) -> np.ndarray:
        if epoch not in self._plans:
            n = len(self.table)
            self._plans = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n)}
        return self._plans[epoch]

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> PromptBatch:
        n = len(self.table)
        g = self.step * self.batch_size + np.arange(self.batch_size)
        positions = np.asarray([self._plan(int(e))[i] for e, i in zip(g // n, g % n, strict=True)], np.int64)
        self.step += 1
        return PromptBatch(positions, self.table.rows[positions], self.step)

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


# ------------------------------------------------------------------------------------ rollouts


@flax.struct.dataclass
class Rollout:
    """The policy samples of one step, flattened to ``[B·K, ...]`` (row ``b·K + k``).

    Attributes:
      input_ids: [B·K, T] int32 left-padded prompt then sampled response.
      segment_ids: [B·K, T] int32 1 on real tokens (0 = padding).
      positions: [B·K, T] int32 position ids (``cumsum(segment) − 1``).
      loss_mask: [B·K, T] int32 1 on response tokens (EOS included).
      advantages: [B·K] float32 RLOO advantages of the judge values.
      sample_logps: [B·K] float32 summed log-probs reported by the sampler (a train/sample consistency check).
      example_mask: [B·K] bool valid rows.
    """

    input_ids: Array
    segment_ids: Array
    positions: Array
    loss_mask: Array
    advantages: Array
    sample_logps: Array
    example_mask: Array


def _pad_right(seqs: Sequence[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def _widen(ids: np.ndarray, mask: np.ndarray, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    extra = width - ids.shape[1]
    return (np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id), np.pad(mask, ((0, 0), (0, extra))))


def _bucket(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


class RolloutCollector:
    """Samples, judges and scores one step's prompts (host side); see the module docstring.

    Args:
      cfg: the run config (``wro`` section, ``train.seed``).
      table: the prompts.
      tokenizer: the policy's tokenizer (EOS / pad ids).
      judge: a :class:`TokenJudge`.
      judge_name: how errors name the judge.
    """

    def __init__(self, cfg: RunConfig, table: PromptTable, tokenizer, judge: TokenJudge, judge_name: str):
        self.cfg, self.w, self.table, self.judge, self.judge_name = cfg, cfg.wro, table, judge, judge_name
        eos = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        self.pad_id = int(pad)
        self.sampling = SamplingConfig(max_new_tokens=self.w.max_new_tokens, temperature=self.w.temperature,
                                       eos_token_ids=eos, pad_token_id=self.pad_id)
        self.base_key = jax.random.key(cfg.train.seed)

    def _sample(self, model, ids: np.ndarray, mask: np.ndarray, repeats: int, key: Array):
        rep_ids, rep_mask = np.repeat(ids, repeats, axis=0), np.repeat(mask, repeats, axis=0)
        keys = jax.random.split(key, rep_ids.shape[0])
        return jax.device_get(generate(model, rep_ids, rep_mask, key=keys, config=self.sampling))

    def _competitors(self, batch: PromptBatch, policy, reference, ids, mask, key) -> tuple[np.ndarray, np.ndarray]:
        """``[B·C, N_c]`` competitor responses and masks (row ``b·C + c``)."""
        if self.w.competitor == "dataset":
            seqs = [r for p in batch.positions for r in self.table.responses[p]]
            return _pad_right(seqs, max(1, max(len(s) for s in seqs)), self.pad_id)
        model = reference if self.w.competitor == "reference" else policy
        out = self._sample(model, ids, mask, self.w.competitor_samples, key)
        return out.completion, out.completion_mask

    def _judge(self, prompt_ids, a, a_mask, b, b_mask, swap) -> np.ndarray:
        width = max(a.shape[1], b.shape[1])
        a, a_mask = _widen(a, a_mask, width, self.pad_id)
        b, b_mask = _widen(b, b_mask, width, self.pad_id)
        s = swap[:, None]
        first, first_m = np.where(s, b, a), np.where(s, b_mask, a_mask)
        second, second_m = np.where(s, a, b), np.where(s, a_mask, b_mask)
        try:
            p = np.asarray(self.judge(prompt_ids, first, first_m, second, second_m), np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise RunError(f"wro.judge {self.judge_name!r} failed: {err}") from None
        if p.shape[0] != len(prompt_ids):
            raise RunError(f"wro.judge {self.judge_name!r} returned {p.shape[0]} values for {len(prompt_ids)} pairs")
        if not np.all(np.isfinite(p) & (p >= 0) & (p <= 1)):
            raise RunError(f"wro.judge {self.judge_name!r} returned values outside [0, 1] (or NaN)")
        return np.where(swap, 1.0 - p, p)

    def collect(self, batch: PromptBatch, policy, reference) -> tuple[Rollout, dict[str, float]]:
        """``(rollout, host metrics)`` of one step (``policy`` / ``reference``: merged NNX models)."""
        w, pad = self.w, self.pad_id
        b, k = len(batch.positions), w.samples_per_prompt
        prompts = [self.table.prompt_ids[p] for p in batch.positions]
        ids, mask = left_pad(prompts, pad_id=pad, length=_bucket(max(map(len, prompts))))
        step_key = jax.random.fold_in(self.base_key, batch.step)
        t0 = time.perf_counter()
        out = self._sample(policy, ids, mask, k, jax.random.fold_in(step_key, 0))
        comp, comp_mask = self._competitors(batch, policy, reference, ids, mask, jax.random.fold_in(step_key, 1))
        t1 = time.perf_counter()
        c = comp.shape[0] // b
        # all (b, k, c) pairs, c fastest
        pi, ki, ci = (x.reshape(-1) for x in np.meshgrid(np.arange(b), np.arange(k), np.arange(c), indexing="ij"))
        longest = max(map(len, prompts))
        judge_prompts = np.where(mask[:, -longest:] > 0, ids[:, -longest:], -1)[pi]
        swap = (np.random.default_rng([self.cfg.train.seed, batch.step]).random(len(pi)) < 0.5
                if w.swap_positions else np.zeros(len(pi), bool))
        p = self._judge(judge_prompts, out.completion[pi * k + ki], out.completion_mask[pi * k + ki],
                        comp[pi * c + ci], comp_mask[pi * c + ci], swap).reshape(b, k, c)
        t2 = time.perf_counter()
        values = wro_losses.judge_values(jnp.asarray(p, jnp.float32), w.h)
        adv = np.asarray(wro_losses.rloo_advantages(values)).reshape(-1)
        seg = np.asarray(out.mask)
        rollout = Rollout(input_ids=np.asarray(out.tokens), segment_ids=seg,
                          positions=np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32),
                          loss_mask=np.concatenate([np.zeros_like(mask.repeat(k, 0)), out.completion_mask], 1),
                          advantages=adv.astype(np.float32), sample_logps=np.asarray(out.logprobs).sum(1),
                          example_mask=np.ones(b * k, bool))
        metrics = {"judge/win_rate": float(p.mean()), "judge/value": float(np.mean(values)),
                   "advantage_std": float(adv.std()), "response_length": float(out.lengths.mean()),
                   "competitor_length": float(comp_mask.sum(1).mean()), "time/generate": t1 - t0,
                   "time/judge": t2 - t1}
        return rollout, metrics


# ------------------------------------------------------------------------------------ the step


def make_wro_step(graphdef, optimizer: optax.GradientTransformation, *, samples_per_prompt: int, beta: float,
                  kl_estimator: str = "k1", micro_batches: int = 1, seq_chunk: int = 128, vocab_chunk: int = 8192,
                  nan_policy: str = "skip"):
    """Builds ``step(state, ref_params, rest, rollout) -> (state, metrics)``: one gradient step on the surrogate.

    The ``[B·K, T]`` rollout is regrouped as ``[B, K, T]``; micro-batches take whole prompts (strided), and
    each contributes ``surrogate · (its valid samples / all valid samples)``, so accumulation is exact.
    ``ref_params`` is only read when ``beta > 0`` (the KL estimator's reference forward). ``rest`` (the
    model's non-trainable state) is an argument, not a closure, so runs can share the compiled step.
    """
    k = samples_per_prompt
    chunks = {"seq_chunk": seq_chunk, "vocab_chunk": vocab_chunk}

    def step(state: steplib.TrainState, ref_params, rest, rollout: Rollout):
        grouped = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]), rollout)
        n_valid = jnp.maximum(rollout.example_mask.sum(), 1).astype(jnp.float32)

        def micro_loss(params, mb: Rollout):
            b = mb.advantages.shape[0]
            flat = lambda x: x.reshape(b * k, *x.shape[2:])
            args = (flat(mb.input_ids), flat(mb.segment_ids), flat(mb.positions), flat(mb.loss_mask))
            with jax.named_scope("policy"):
                lp = steplib.forward_logps(graphdef, params, rest, *args, **chunks)
            seq = lp.sums.reshape(b, k)
            kl_terms = None
            if beta > 0:
                with jax.named_scope("reference"):
                    ref = jax.lax.stop_gradient(steplib.forward_logps(graphdef, ref_params, rest, *args, **chunks))
                kl_terms = wro_losses.kl_estimate(lp.token_logps.reshape(b, k, -1), ref.token_logps.reshape(b, k, -1),
                                                  mb.loss_mask, kl_estimator)
            loss, aux = wro_losses.wro_loss(seq, mb.advantages, kl_terms, beta=beta, mask=mb.example_mask,
                                            kl_estimator=kl_estimator)
            keep = mb.example_mask.astype(jnp.float32)
            n_mb = jnp.maximum(keep.sum(), 1.0)
            metrics = {"pg_loss": aux["pg_loss"], "kl": aux["kl"], "kl_surrogate": aux["kl_surrogate"],
                       "logps/policy": jnp.sum(jax.lax.stop_gradient(seq) * keep) / n_mb,
                       "logps/sampler_gap": jnp.sum(jnp.abs(jax.lax.stop_gradient(seq) - mb.sample_logps) * keep)
                       / n_mb}
            share = keep.sum() / n_valid
            return loss * share, {name: v * share for name, v in metrics.items()}

        loss, metrics, grads = steplib.accumulate_gradients(micro_loss, state.params, (grouped,), micro_batches)
        new_state, norms = steplib._apply(state, grads, loss, optimizer, nan_policy, {})
        metrics = {**metrics, **norms, "loss": loss, "tokens": (rollout.segment_ids != 0).sum().astype(jnp.float32)}
        return new_state, metrics

    return step


# ------------------------------------------------------------------------------------ the run

_STEP_CACHE: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
_STEP_CACHE_SIZE = 4


def compiled_step(cfg: RunConfig, graphdef, optimizer, steps: int, mesh, state, rest, ref_params):
    """``rollout -> jitted step`` (one compile per rollout shape), shared by the runs of one process whose
    steps would compile identically (a sweep or a test suite running several small runs in-process).

    The key holds everything the step closes over: the model structure, the optimizer config (and the run
    length when the schedule depends on it), the WRO and chunking settings, the mesh and the state
    shardings. The last ``_STEP_CACHE_SIZE`` entries are kept.
    """
    o = cfg.optim
    schedule_steps = None if (o.schedule == "constant" and o.warmup_steps == 0) else steps
    state_sh, rest_sh = parallel.tree_shardings(state), parallel.tree_shardings(rest)
    ref_sh = None if ref_params is None else parallel.tree_shardings(ref_params)
    key = (graphdef, o, schedule_steps, cfg.wro.samples_per_prompt, cfg.wro.beta, cfg.wro.kl_estimator,
           cfg.train.micro_batches, cfg.train.seq_chunk, cfg.train.vocab_chunk, cfg.train.nan_policy, mesh,
           tuple(jax.tree.leaves(state_sh)), tuple(jax.tree.leaves(rest_sh)), ref_sh is None)
    if key in _STEP_CACHE:
        _STEP_CACHE.move_to_end(key)
        return _STEP_CACHE[key]
    fn = make_wro_step(graphdef, optimizer, samples_per_prompt=cfg.wro.samples_per_prompt, beta=cfg.wro.beta,
                       kl_estimator=cfg.wro.kl_estimator, micro_batches=cfg.train.micro_batches,
                       seq_chunk=cfg.train.seq_chunk, vocab_chunk=cfg.train.vocab_chunk,
                       nan_policy=cfg.train.nan_policy)
    jitted = loop.per_shape(lambda r: steplib.jit_step(
        fn, state_sh, (ref_sh, rest_sh, jax.tree.map(lambda x: parallel.batch_sharding(mesh, np.ndim(x)), r))))
    _STEP_CACHE[key] = jitted
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.popitem(last=False)
    return jitted


def check_wro_config(cfg: RunConfig, n_batch_devices: int = 1, has_judge: bool = False) -> None:
    """Range checks of the ``wro`` section and what it needs elsewhere (RunError naming the key), before
    anything is built. ``has_judge``: a judge object is passed, so ``wro.judge`` may be empty."""
    w = cfg.wro
    problems = [
        (not w.prompts, "wro.prompts is empty: give a prompt file (.txt, .jsonl with a prompt field, or pairs)"),
        (not w.judge and not has_judge, "wro.judge is empty: give module:function, path/file.py:function, "
                                        "rm:RUN_DIR or token:module:object"),
        (w.samples_per_prompt < 2, f"wro.samples_per_prompt={w.samples_per_prompt}: the leave-one-out baseline "
                                   "needs at least 2 samples per prompt"),
        (w.competitor_samples < 1, f"wro.competitor_samples={w.competitor_samples}: must be >= 1"),
        (w.beta < 0, f"wro.beta={w.beta}: must be >= 0"),
        (w.max_new_tokens < 1, f"wro.max_new_tokens={w.max_new_tokens}: must be >= 1"),
        (w.max_prompt_length < 1, f"wro.max_prompt_length={w.max_prompt_length}: must be >= 1"),
        (w.temperature <= 0, f"wro.temperature={w.temperature}: must be > 0 (REINFORCE needs sampled responses)"),
        (cfg.train.batch_size % cfg.train.micro_batches != 0,
         f"train.batch_size={cfg.train.batch_size} is not divisible by train.micro_batches="
         f"{cfg.train.micro_batches}"),
        ((cfg.train.batch_size * w.samples_per_prompt) % n_batch_devices != 0,
         f"train.batch_size * wro.samples_per_prompt = {cfg.train.batch_size * w.samples_per_prompt} sequences "
         f"are not divisible by the mesh's {n_batch_devices} batch devices"),
        (cfg.reference.strategy == "precomputed",
         "reference.strategy=precomputed: WRO scores fresh samples every step; use live"),
        (cfg.reference.strategy == "none" and (w.beta > 0 or w.competitor == "reference"),
         f"reference.strategy=none, but wro.beta={w.beta} and wro.competitor={w.competitor!r} need the reference"),
        (cfg.reference.sync_every > 0, f"reference.sync_every={cfg.reference.sync_every}: train.wro keeps its "
                                       "reference frozen (TR-DPO syncing is train.preference's); set it to 0"),
        (jax.process_count() > 1, "train.wro runs in a single process (host-side judging is not sharded yet)"),
    ]
    for bad, message in problems:
        if bad:
            raise RunError(message)


def _held_out_prompts(cfg: RunConfig, table: PromptTable, tokenizer, run_dir, resume: bool):
    """``(training prompts, held-out prompts or None)``: ``data.eval_split`` of ``wro.prompts`` (seeded,
    recorded in the run directory), or the prompts of the ``data.eval`` file."""
    d = cfg.data
    if d.eval_split:
        seed = cfg.train.seed if d.split_seed is None else d.split_seed
        try:
            return eval_during.split_prompts(table, fraction=d.eval_split, seed=seed, source=cfg.wro.prompts,
                                             limit=cfg.wro.prompts_limit, run_dir=run_dir, resume=resume)
        except DataError as err:
            raise RunError(f"wro.prompts: {err}") from None
    if d.eval:
        held = load_prompt_table(dataclasses.replace(cfg, wro=dataclasses.replace(cfg.wro, prompts=d.eval,
                                                                                  prompts_limit=None)), tokenizer)
        if len(held) == 0:
            raise RunError(f"data.eval {d.eval}: no usable prompts ({held.n_rejected} rejected)")
        return table, held
    return table, None


def run_wro(cfg: RunConfig, *, resume: bool = False, judge: TokenJudge | None = None) -> dict[str, Any]:
    """Runs (or resumes) WRO training (module docstring); returns the summary (also ``summary.json``).

    Args:
      cfg: the run config; the ``wro`` section drives sampling, judging and the objective.
      resume: continue ``cfg.run_dir`` from its last checkpoint.
      judge: a :class:`TokenJudge` object used instead of ``wro.judge``.
    """
    adapters.check_supported(cfg, "wro", RunError)  # a lora section is refused, not silently ignored
    try:
        mesh = parallel.make_mesh(cfg.mesh)
    except ValueError as err:
        raise RunError(f"{err} (jax sees {jax.device_count()} devices)") from None
    check_wro_config(cfg, int(np.prod([mesh.shape[a] for a in ("data", "fsdp")])), has_judge=judge is not None)
    setup = loop.setup_run(cfg, mesh, resume=resume)
    run_dir, tokenizer, model_json = setup.run_dir, setup.tokenizer, setup.model_json

    table = load_prompt_table(cfg, tokenizer)
    if len(table) == 0:
        raise RunError(f"wro.prompts {cfg.wro.prompts}: no usable prompts ({table.n_rejected} rejected)")
    judge_name = cfg.wro.judge if judge is None else type(judge).__name__
    try:
        judge = judge if judge is not None else load_token_judge(cfg.wro.judge, tokenizer, table.texts_by_ids(),
                                                                 batch_size=cfg.wro.judge_batch_size)
    except SpecError as err:
        raise RunError(f"wro.judge: {err}") from None
    table, eval_table = _held_out_prompts(cfg, table, tokenizer, run_dir, resume)
    collector = RolloutCollector(cfg, table, tokenizer, judge, judge_name)

    steps = loop.total_steps(cfg, len(table))
    graphdef, params, rest = steplib.split_model(setup.loaded.model)
    optimizer, schedule = optim.make_optimizer(cfg.optim, steps)
    state = steplib.build_state(params, optimizer, cfg.train.seed, mesh)
    needs_ref = cfg.wro.beta > 0 or cfg.wro.competitor == "reference"
    ref_params = loop._reference_params(cfg, state.params, mesh) if needs_ref else None
    it = PromptIterator(table, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
    checkpointer, state, start = loop.open_checkpoints(cfg, run_dir, state, it, resume)

    step_ref = ref_params if cfg.wro.beta > 0 else None
    jitted = compiled_step(cfg, graphdef, optimizer, steps, mesh, state, rest, step_ref)
    reference = None if ref_params is None else nnx.merge(graphdef, ref_params, rest)

    def call(state, batch: PromptBatch):
        policy = nnx.merge(graphdef, state.params, rest)
        rollout, host = collector.collect(batch, policy, reference)
        state, metrics = jitted(rollout)(state, step_ref, rest, parallel.shard_batch(rollout, mesh))
        return state, {**metrics, **host}

    evaluator = None
    if eval_table is not None:  # judge win rate on held-out prompts (data.eval / data.eval_split)
        evaluator = eval_during.WROEvaluator(
            RolloutCollector(cfg, eval_table, tokenizer, judge, judge_name), cfg.train.batch_size,
            lambda p: nnx.merge(graphdef, p, rest), reference,
            lambda pos, key_step: PromptBatch(pos, eval_table.rows[pos], key_step))
    result = loop.run_steps(cfg, run_dir, state=state, it=it, checkpointer=checkpointer, call=call, steps=steps,
                            start=start, resume=resume, schedule=schedule,
                            ckpt_meta={"config": to_dict(cfg), "model": model_json}, desc="wro",
                            postfix=("loss", "judge/win_rate", "kl"), evaluator=evaluator)
    summary = {"steps": steps, "resumed_from": start, "final_metrics": result.last,
               "prompts": {"source": cfg.wro.prompts, "kept": len(table), "rejected": table.n_rejected},
               "skipped_updates": int(result.state.skipped), "seconds": result.seconds,
               "tokens_per_s": result.tokens / max(result.seconds, 1e-9), **result.timing(),
               **result.eval_summary()}
    if eval_table is not None:
        summary["prompts"]["held_out"] = len(eval_table)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
