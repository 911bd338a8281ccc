"""Responses sampled from the frozen reference for every training prompt (TYPO's unsupervised term).

TYPO (Hu, He, Wipf 2024; the reconstruction in ``papers-addendum.md`` and :mod:`jaxpref.losses.typo`)
adds ``λ · E_x E_{y ~ π_ref(·|x)}[−log πθ(y|x)]``, which equals KL(π_ref ‖ πθ) up to a θ-independent
constant. The expectation over ``y`` is estimated with ``S`` responses drawn **once** from the frozen
reference for each training pair's prompt (no labels), cached on disk, and scored under πθ inside the
train step (:func:`jaxpref.training.step.reference_sample_logps`).

Sampling (:func:`sample_responses`) uses :func:`jaxpref.generation.generate`: temperature 1 and no
top-k / top-p by default, i.e. true samples of π_ref; a row stops at EOS (kept as a target token) or
after ``max_new_tokens`` (then the response is a truncated sample and is scored as it is). Draw ``j``
of the pair from source row ``r`` uses the key ``fold_in(fold_in(key(seed), r), j)``, so a sample
depends only on its prompt, the seed and the reference, never on the batch size or the other prompts
of its batch. Prompts are sorted by length, left padded to power-of-two lengths and sampled in
batches of fixed size (few compilations).

Cache (the scheme of :mod:`jaxpref.training.reference`): ``<cache_dir>/<key>.npz`` where the key is a
SHA-256 over the reference *parameters* fingerprint, the *tokenised prompts* (ids, source rows, pad
id), the sampling settings (``S``, ``max_new_tokens``, temperature, top-k, top-p, EOS and pad ids) and
the seed. A mismatch is a miss, never a wrong hit; a file with the wrong shapes is recomputed; writes
are atomic (temporary file + rename). The file holds, per pair position ``i`` and draw ``j``: the
sampled ids ``tokens[i, j, :lengths[i, j]]``, whether EOS ended the sample (``ended``) and its summed
log-prob under the reference that drew it (``logps``, for the ``reference_sample/kl`` diagnostic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.data.batching import choose_bucket
from jaxpref.generation import SamplingConfig, generate, left_pad
from jaxpref.losses import Composition, LossInputs, get
from jaxpref.training.reference import params_fingerprint, tokens_fingerprint
from jaxpref.types import ReferenceSampleBatch

log = logging.getLogger(__name__)

SAMPLES_VERSION = 1
_MIN_PROMPT_BUCKET = 16


def needs_reference_samples(composition: Composition) -> tuple[str, ...]:
    """Keys of the terms of ``composition`` that read ``LossInputs.reference_sample_logps`` / ``_tokens``.

    Each term is traced abstractly (``jax.eval_shape``, nothing runs) on ``[1]`` inputs holding every
    ``LossInputs`` field except the reference-sample ones; a term that then raises the registry's
    missing-input error (:func:`jaxpref.losses.registry.require`) needs samples. The answer follows the
    hyperparameters (TYPO with ``lam=0`` needs none) with no list of loss names to keep in sync.
    """
    one = jnp.ones((1,), jnp.float32)
    fields = {f.name: one for f in dataclasses.fields(LossInputs) if not f.name.startswith("reference_sample")}
    inputs = LossInputs(**{**fields, "bco_delta": jnp.zeros((), jnp.float32)})
    keys = []
    for t in composition.terms:
        try:
            jax.eval_shape(lambda x, t=t: get(t.name)(x, t.hparams), inputs)
        except ValueError as err:
            if "LossInputs.reference_sample" not in str(err):
                raise
            keys.append(t.key)
    return tuple(keys)


@dataclasses.dataclass(frozen=True)
class SampledResponses:
    """``S`` responses per prompt (``L = max_new_tokens``).

    Attributes:
      tokens: [N, S, L] int32 sampled ids; the pad id after ``lengths``.
      lengths: [N, S] int32 response lengths (EOS included when generated), >= 1.
      ended: [N, S] bool, the sample ended with an EOS (else it was cut at ``max_new_tokens``).
      logps: [N, S] float32 summed log-prob of the sample under the model that drew it (untempered).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    ended: np.ndarray
    logps: np.ndarray

    def check(self, n_prompts: int, n_samples: int, max_new_tokens: int, where: str) -> None:
        """ValueError naming ``where`` unless the arrays have the shapes of these settings."""
        want = {"tokens": (n_prompts, n_samples, max_new_tokens), "lengths": (n_prompts, n_samples),
                "ended": (n_prompts, n_samples), "logps": (n_prompts, n_samples)}
        for name, shape in want.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"{where}: {name} has shape {got}, expected {shape}")


def _prompt_bucket(n: int) -> int:
    return max(_MIN_PROMPT_BUCKET, 1 << max(0, n - 1).bit_length())


@jax.jit
def _draw_keys(seed_key: jax.Array, rows: jax.Array, draws: jax.Array) -> jax.Array:
    """[B] keys ``fold_in(fold_in(seed_key, row), draw)``: one per (prompt row, draw)."""
    return jax.vmap(lambda r, d: jax.random.fold_in(jax.random.fold_in(seed_key, r), d))(rows, draws)


def sample_responses(
    model,
    prompts: Sequence[np.ndarray],
    rows: np.ndarray,
    *,
    n_samples: int,
    sampling: SamplingConfig,
    seed: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> SampledResponses:
    """Draws ``n_samples`` responses from ``model`` for every prompt (module docstring).

    Args:
      model: the frozen reference (a jaxpref causal LM).
      prompts: N prompt id arrays ([P_i] int, each non-empty).
      rows: [N] int source row of each prompt (what the per-draw keys are folded from).
      n_samples: S draws per prompt.
      sampling: the :class:`~jaxpref.generation.SamplingConfig` (EOS and pad ids included).
      seed: base seed of the per-draw keys.
      batch_size: sequences per generation call (static: the last batch is filled with copies).
      progress: called with the number of sequences finished after each batch.

    Returns:
      :class:`SampledResponses` in prompt order.
    """
    n, length = len(prompts), sampling.max_new_tokens
    rows = np.asarray(rows, np.int64)
    if rows.shape != (n,):
        raise ValueError(f"rows has shape {rows.shape}, expected ({n},)")
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} (source row {rows[empty[0]]}) is empty: nothing to condition on")
    out = SampledResponses(tokens=np.full((n, n_samples, length), sampling.pad_token_id, np.int32),
                           lengths=np.zeros((n, n_samples), np.int32), ended=np.zeros((n, n_samples), bool),
                           logps=np.zeros((n, n_samples), np.float32))
    # (prompt, draw) jobs, shortest prompts first: batches need little padding.
    jobs = sorted(((i, j) for i in range(n) for j in range(n_samples)), key=lambda job: len(prompts[job[0]]))
    seed_key = jax.random.key(seed)
    eos = np.asarray(sampling.eos_token_ids, np.int32)
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo:lo + batch_size]
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))  # extra rows are discarded
        seqs = [np.asarray(prompts[i]).tolist() for i, _ in filled]
        ids, mask = left_pad(seqs, pad_id=sampling.pad_token_id, length=_prompt_bucket(max(map(len, seqs))))
        keys = _draw_keys(seed_key, jnp.asarray([rows[i] for i, _ in filled], jnp.uint32),
                          jnp.asarray([j for _, j in filled], jnp.uint32))
        res = jax.device_get(generate(model, ids, mask, key=keys, config=sampling))
        for b, (i, j) in enumerate(chunk):
            k = int(res.lengths[b])
            out.tokens[i, j, :k] = res.completion[b, :k]
            out.lengths[i, j] = k
            out.ended[i, j] = bool(np.isin(res.completion[b, k - 1], eos)) if eos.size else False
            out.logps[i, j] = float(res.logprobs[b, :k].sum(dtype=np.float32))
        if progress is not None:
            progress(len(chunk))
    return out


def prompts_fingerprint(prompts: Sequence[np.ndarray], rows: np.ndarray, pad_id: int) -> str:
    """Hash of the tokenised prompts and their source rows (the per-draw keys fold the rows in)."""
    return tokens_fingerprint([prompts, [np.asarray(rows, np.int64).astype(np.int32)]], pad_id)


def sample_cache_key(params_fp: str, prompts_fp: str, sampling: SamplingConfig, n_samples: int, seed: int) -> str:
    """32 hex chars of a SHA-256 over every input the samples depend on."""
    settings = json.dumps({"n_samples": n_samples, "seed": seed, **dataclasses.asdict(sampling)}, sort_keys=True)
    return hashlib.sha256(f"samples-v{SAMPLES_VERSION}|{params_fp}|{prompts_fp}|{settings}".encode()).hexdigest()[:32]


class ReferenceSamples:
    """Cached reference samples of a tokenised pair dataset, with its prompts; builds step batches.

    Attributes:
      prompts: per pair position, [P_i] int32 prompt ids (``TokenizedPairs.prompt``).
      samples: the :class:`SampledResponses` (row ``i`` = pair position ``i``).
      pad_id: padding id of the batches.
      buckets: allowed padded lengths ``T`` of the sample sequences (the data buckets, plus the longest
        prompt + sample when that exceeds them).
      path: the cache file.
      computed: True if this process sampled them (False when loaded from the cache).
    """

    def __init__(self, prompts: Sequence[np.ndarray], samples: SampledResponses, pad_id: int,
                 buckets: Sequence[int], path: pathlib.Path, computed: bool):
        self.prompts, self.samples, self.pad_id = prompts, samples, int(pad_id)
        self.path, self.computed = path, computed
        n = len(prompts)
        prompt_len = np.fromiter(map(len, prompts), np.int32, n)
        self.seq_lengths = (prompt_len + (samples.lengths.max(axis=1) if n else 0)).astype(np.int32)  # [N]
        longest = int(self.seq_lengths.max()) if n else 1
        buckets = tuple(sorted(int(b) for b in buckets))
        self.buckets = buckets if buckets and buckets[-1] >= longest else (*buckets, longest)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_samples(self) -> int:
        return int(self.samples.lengths.shape[1])

    def batch(self, indices: Sequence[int], *, seq_len: int | None = None,
              batch_size: int | None = None) -> ReferenceSampleBatch:
        """Prompt + sample sequences of the pairs ``indices`` (positions; -1 = padding row).

        Args:
          indices: [b] pair positions in batch order.
          seq_len: ``T``; None: the smallest of ``buckets`` that fits the longest sequence.
          batch_size: ``B`` >= b; missing rows are padding (all segment ids 0).

        Returns:
          :class:`~jaxpref.types.ReferenceSampleBatch` of NumPy arrays ``[B, S, T]`` / ``[B, S]``.
        """
        idx = np.asarray(indices, np.int64).reshape(-1)
        b = len(idx) if batch_size is None else batch_size
        if len(idx) > b:
            raise ValueError(f"{len(idx)} indices do not fit batch_size {b}")
        if np.any(idx >= len(self)) or np.any(idx < -1):
            raise IndexError(f"pair positions out of range for {len(self)} prompts with reference samples")
        idx = np.concatenate([idx, np.full(b - len(idx), -1, np.int64)])
        real = np.flatnonzero(idx >= 0)
        longest = int(self.seq_lengths[idx[real]].max()) if len(real) else 1
        if seq_len is None:
            seq_len = choose_bucket(longest, self.buckets)
        elif longest > seq_len:
            raise ValueError(f"a prompt + reference sample of {longest} tokens does not fit seq_len {seq_len}")
        s = self.n_samples
        input_ids = np.full((b, s, seq_len), self.pad_id, np.int32)
        loss_mask = np.zeros((b, s, seq_len), np.int32)
        segment_ids = np.zeros((b, s, seq_len), np.int32)
        ref_logps = np.zeros((b, s), np.float32)
        for row in real:
            i = idx[row]
            p = np.asarray(self.prompts[i])
            for j in range(s):
                k = int(self.samples.lengths[i, j])
                n_p, n = len(p), len(p) + k
                input_ids[row, j, :n_p] = p
                input_ids[row, j, n_p:n] = self.samples.tokens[i, j, :k]
                loss_mask[row, j, n_p:n] = 1
                segment_ids[row, j, :n] = 1
            ref_logps[row] = self.samples.logps[i]
        positions = np.where(segment_ids != 0, np.arange(seq_len, dtype=np.int32), 0).astype(np.int32)
        return ReferenceSampleBatch(input_ids=input_ids, loss_mask=loss_mask, segment_ids=segment_ids,
                                    positions=positions, reference_logps=ref_logps)

    def summary(self) -> dict:
        """Cache path, whether it was computed, and length / EOS statistics of the samples."""
        lengths, ended = self.samples.lengths, self.samples.ended
        return {"cache": str(self.path), "computed": self.computed, "prompts": len(self),
                "samples_per_prompt": self.n_samples,
                "mean_length": float(lengths.mean()) if lengths.size else 0.0,
                "eos_rate": float(ended.mean()) if ended.size else 0.0,
                "mean_reference_logp": float(self.samples.logps.mean()) if lengths.size else 0.0}


def _read(path: pathlib.Path) -> SampledResponses:
    with np.load(path) as f:
        return SampledResponses(tokens=f["tokens"], lengths=f["lengths"], ended=f["ended"], logps=f["logps"])


def load_or_sample(
    cache_dir: str | os.PathLike,
    key: str,
    prompts: Sequence[np.ndarray],
    *,
    n_samples: int,
    max_new_tokens: int,
    pad_id: int,
    buckets: Sequence[int],
    compute: Callable[[], SampledResponses],
    meta: dict | None = None,
) -> ReferenceSamples:
    """The cached samples for ``key`` (checked against the expected shapes), or ``compute()`` saved there.

    Logs ``reference samples: loaded ...`` or ``... sampled ...``; ``computed`` records which happened.
    """
    directory = pathlib.Path(cache_dir).expanduser()
    path = directory / f"{key}.npz"
    n = len(prompts)
    if path.is_file():
        try:
            samples = _read(path)
            samples.check(n, n_samples, max_new_tokens, str(path))
            log.info("reference samples: loaded %d x %d from cache %s (no sampling)", n, n_samples, path)
            return ReferenceSamples(prompts, samples, pad_id, buckets, path, computed=False)
        except (OSError, ValueError, KeyError) as err:
            log.warning("reference sample cache %s is unusable (%s): sampling again", path, err)
    samples = compute()
    samples.check(n, n_samples, max_new_tokens, "reference sampling")
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, tokens=samples.tokens, lengths=samples.lengths, ended=samples.ended, logps=samples.logps,
                 meta=json.dumps(meta or {}))
        tmp.replace(path)
    result = ReferenceSamples(prompts, samples, pad_id, buckets, path, computed=True)
    log.info("reference samples: sampled %d x %d (mean length %.1f, EOS rate %.2f), cached at %s", n, n_samples,
             result.summary()["mean_length"], result.summary()["eos_rate"], path)
    return result


def reference_samples_for(
    model,
    pairs,
    *,
    n_samples: int,
    sampling: SamplingConfig,
    seed: int,
    batch_size: int,
    cache_dir: str | os.PathLike,
    buckets: Sequence[int],
    params=None,
    progress: bool = False,
    meta: dict | None = None,
) -> ReferenceSamples:
    """Reference samples of every prompt of ``pairs`` (``TokenizedPairs``), from the cache or sampled.

    Args:
      model: the frozen reference model.
      pairs: the tokenised training pairs (their ``prompt``, ``row`` and ``pad_id`` are used).
      n_samples, sampling, seed, batch_size: as :func:`sample_responses`.
      cache_dir: cache directory.
      buckets: padded lengths of the step's sample sequences (usually ``data.buckets``).
      params: the model's parameters for the fingerprint (default: ``nnx.state(model, nnx.Param)``).
      progress: show a progress bar.
      meta: extra JSON stored in the cache file (e.g. the reference model's source).
    """
    from flax import nnx

    from jaxpref.training.logging import progress_bar

    params = nnx.state(model, nnx.Param) if params is None else params
    key = sample_cache_key(params_fingerprint(params), prompts_fingerprint(pairs.prompt, pairs.row, pairs.pad_id),
                           sampling, n_samples, seed)

    def compute() -> SampledResponses:
        bar = progress_bar(math.ceil(len(pairs) * n_samples / batch_size), enabled=progress,
                           desc="reference samples")
        try:
            return sample_responses(model, pairs.prompt, pairs.row, n_samples=n_samples, sampling=sampling,
                                    seed=seed, batch_size=batch_size, progress=lambda _: bar.update(1))
        finally:
            bar.close()

    return load_or_sample(cache_dir, key, pairs.prompt, n_samples=n_samples, max_new_tokens=sampling.max_new_tokens,
                          pad_id=pairs.pad_id, buckets=buckets, compute=compute,
                          meta={"n_samples": n_samples, "seed": seed, **dataclasses.asdict(sampling), **(meta or {})})
