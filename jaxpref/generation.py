"""Batched sampling from a jaxpref causal LM with a KV cache, in one jitted function.

::

    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], pad_id=tok.pad_token_id)
    out = generate(model, ids, mask, key=jax.random.key(0),
                   config=SamplingConfig(max_new_tokens=64, temperature=0.7, top_p=0.9,
                                         eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id))
    out.completion, out.completion_mask, out.logprobs, out.lengths

How it runs: one ``jax.jit`` holds the prefill (the whole ``[B, P]`` prompt written into a
cache of ``P + N - 1`` slots) and a ``lax.while_loop`` of one-token decode steps that stops as
soon as every row has emitted an EOS (or after ``N`` tokens). Shapes are static, so it
compiles once per (model structure, batch size, prompt length, :class:`SamplingConfig`).

Prompts of different lengths share a batch by padding: ``prompt_mask`` 0 marks padding, which
becomes segment id 0 (never attended to); positions are ``cumsum(mask) - 1``, so every row sees
exactly what it would see alone. Left padding keeps ``tokens`` contiguous; other padding works
too, because the first token is sampled from each row's last real prompt token.

Log-probabilities: ``logprobs`` is ``log p(token)`` under the model's own (untempered,
unfiltered) distribution -- what DPO-style losses score; ``sampling_logprobs`` is under the
distribution actually sampled from (after temperature, top-k, top-p; 0 for greedy) -- what
importance weights need.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample (hashable: it is a static argument of the jitted sampler).

    Attributes:
      max_new_tokens: N, completion tokens per row (EOS included).
      temperature: divides the logits; 0 means greedy (argmax).
      top_k: keep the k most likely tokens (ties at the k-th value kept); 0 = off.
      top_p: keep the smallest most-likely set with mass >= top_p (nucleus); 1 = off.
      eos_token_ids: a row stops after emitting any of these (the EOS token itself is part of
        the completion, mask 1).
      pad_token_id: what finished rows emit (mask 0).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class GenerationOutput:
    """What :func:`generate` returns (P = prompt length, N = ``max_new_tokens``).

    Attributes:
      tokens: [B, P+N] int32 prompt (as given, padding included) then completion.
      mask: [B, P+N] int32 1 on real prompt and completion tokens, 0 on padding.
      completion: [B, N] int32 sampled tokens; ``pad_token_id`` after a row's EOS.
      completion_mask: [B, N] int32 1 up to and including EOS, 0 after.
      logprobs: [B, N] float32 log-prob of each token under the model (untempered); 0 where
        ``completion_mask`` is 0.
      sampling_logprobs: [B, N] float32 log-prob under the sampling distribution (after
        temperature / top-k / top-p); 0 for greedy and where ``completion_mask`` is 0.
      lengths: [B] int32 completion lengths (``completion_mask.sum(1)``).
    """

    tokens: Array
    mask: Array
    completion: Array
    completion_mask: Array
    logprobs: Array
    sampling_logprobs: Array
    lengths: Array


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> left-padded ``(ids [B, P], mask [B, P])`` int32 numpy arrays.

    Args:
      sequences: B token-id lists (each non-empty).
      pad_id: fill value for padding.
      length: P (default: the longest sequence). Pad prompts to a few fixed lengths
        (buckets) to bound the number of compilations.
    """
    length = max(len(s) for s in sequences) if length is None else length
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if not 0 < len(seq) <= length:
            raise ValueError(f"sequence {row} has length {len(seq)}; need 1..{length}")
        ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return ids, mask


def generate(model, prompt_ids, prompt_mask=None, *, key: Array, config: SamplingConfig) -> GenerationOutput:
    """Samples ``config.max_new_tokens`` tokens per row after each prompt.

    Args:
      model: a jaxpref causal LM (:class:`jaxpref.models.base.CausalLM` contract).
      prompt_ids: [B, P] int prompt tokens, padded (left padding recommended).
      prompt_mask: [B, P] int/bool, 1 on real tokens (default all ones). Every row needs >= 1.
      key: a ``jax.random`` key, or [B] keys, one per row. Row ``b`` samples step ``t`` with
        ``fold_in(keys[b], t)`` (a single key is first split into B row keys), so the same
        key gives the same samples, and with per-row keys a row's samples do not depend on
        the rest of the batch. Unused by greedy decoding.
      config: the :class:`SamplingConfig` (static).

    Returns:
      A :class:`GenerationOutput`.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.ones_like(prompt_ids) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # legacy uint32 keys
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        key = jax.random.split(key, prompt_ids.shape[0])
    if key.shape != prompt_ids.shape[:1]:
        raise ValueError(f"need one key or {prompt_ids.shape[0]} row keys, got key shape {key.shape}")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_ids, prompt_mask, key, config)


# ----------------------------------------------------------------------------- internals


def _logits_bv(model, hidden_bd: Array) -> Array:
    """[B, D] final hidden -> [B, V] float32 logits through ``model.unembedding()`` (soft-capped like
    :meth:`CausalLM.logits` when the config has a ``final_logit_softcap``)."""
    matrix, layout = model.unembedding()
    eq = "bd,dv->bv" if layout == "dv" else "bd,vd->bv"
    logits = jnp.einsum(eq, hidden_bd, matrix.astype(hidden_bd.dtype), preferred_element_type=jnp.float32)
    cap = getattr(model.config, "final_logit_softcap", None)
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def _filter(logits_bv: Array, config: SamplingConfig) -> Array:
    """Temperature, then top-k, then top-p (transformers' order); removed tokens at -inf."""
    scores = logits_bv / config.temperature
    if config.top_k:
        kth = jax.lax.top_k(scores, min(config.top_k, scores.shape[-1]))[0][:, -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if config.top_p < 1.0:
        sorted_desc = -jnp.sort(-scores, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the smallest kept score: the most likely token is always kept (mass_before = 0)
        keep = mass_before < config.top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        scores = jnp.where(scores < threshold, -jnp.inf, scores)
    return scores


def _sample(logits_bv: Array, keys_b: Array, config: SamplingConfig) -> tuple[Array, Array, Array]:
    """[B, V] logits, [B] keys -> (tokens [B], model log-probs [B], sampling log-probs [B])."""
    if config.greedy:
        tokens = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        sampling_lp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        scores = _filter(logits_bv, config)
        tokens = jax.vmap(jax.random.categorical)(keys_b, scores).astype(jnp.int32)
        sampling_lp = _take(jax.nn.log_softmax(scores, axis=-1), tokens)
    return tokens, _take(jax.nn.log_softmax(logits_bv, axis=-1), tokens), sampling_lp


def _take(values_bv: Array, tokens_b: Array) -> Array:
    return jnp.take_along_axis(values_bv, tokens_b[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def _generate(graphdef, state, prompt_ids, prompt_mask, keys, config: SamplingConfig) -> GenerationOutput:
    model = nnx.merge(graphdef, state)
    b, p = prompt_ids.shape
    n = config.max_new_tokens
    eos = jnp.asarray(config.eos_token_ids or (-1,), jnp.int32)
    pad = jnp.int32(config.pad_token_id)

    # Prefill: the prompt fills slots [0, P); decode step j writes slot P + j - 1.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    prompt_len = prompt_mask.sum(axis=1)
    cache = model.init_cache(b, p + n - 1)
    # Padding ids may lie outside the vocabulary; masked keys must still be finite (0 * NaN).
    safe_ids = jnp.where(prompt_mask > 0, prompt_ids, 0)
    out = model(safe_ids, positions=positions, segment_ids=prompt_mask, cache=cache)
    last = p - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=1)  # each row's last real prompt token
    logits = _logits_bv(model, out.hidden[jnp.arange(b), last])

    def emit(j, logits, done, buffers):
        """Samples completion token j from ``logits`` and records it (pad for finished rows).

        Returns the sampled tokens unmasked: finished rows keep decoding (static shapes) on
        in-vocabulary input, and their outputs are discarded.
        """
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, j)
        token, lp, slp = _sample(logits, step_keys, config)
        live = ~done
        completion, cmask, lps, slps = buffers
        buffers = (completion.at[:, j].set(jnp.where(live, token, pad)), cmask.at[:, j].set(live.astype(jnp.int32)),
                   lps.at[:, j].set(jnp.where(live, lp, 0.0)), slps.at[:, j].set(jnp.where(live, slp, 0.0)))
        return token, done | jnp.isin(token, eos), buffers

    zeros_f = jnp.zeros((b, n), jnp.float32)
    buffers = (jnp.full((b, n), pad, jnp.int32), jnp.zeros((b, n), jnp.int32), zeros_f, zeros_f)
    token, done, buffers = emit(0, logits, jnp.zeros((b,), bool), buffers)

    def cond(carry):
        j, _, _, done, _ = carry
        return (j < n) & ~jnp.all(done)

    def body(carry):
        j, token, cache, done, buffers = carry
        step_pos = (prompt_len + j - 1)[:, None]
        out = model(token[:, None], positions=step_pos, segment_ids=jnp.ones_like(step_pos), cache=cache)
        token, done, buffers = emit(j, _logits_bv(model, out.hidden[:, 0]), done, buffers)
        return j + 1, token, out.cache, done, buffers

    carry = (jnp.int32(1), token, out.cache, done, buffers)
    _, _, _, _, (completion, cmask, lps, slps) = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(
        tokens=jnp.concatenate([prompt_ids, completion], axis=1),
        mask=jnp.concatenate([prompt_mask, cmask], axis=1),
        completion=completion,
        completion_mask=cmask,
        logprobs=lps,
        sampling_logprobs=slps,
        lengths=cmask.sum(axis=1),
    )
