"""Sampling with a KV cache (``jaxpref.generation``) on tiny random jaxpref models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref import generation
from jaxpref.generation import SamplingConfig, generate, left_pad
from jaxpref.models import presets
from jaxpref.models.registry import build_model
from jaxpref.testing.tolerances import log_softmax_tol, token_logp_tol

# initializer_range 0.5 spreads the random logits, so greedy choices are far from ties and the
# cached and uncached forwards (different summation orders) pick the same tokens.
INIT = 0.5
PROMPTS = [[5, 17, 33, 9, 41], [7, 3], [11, 12, 13]]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)
SAMPLE = SamplingConfig(max_new_tokens=6, temperature=1.0)


def _close(got, want, tol):
    """|got − want| <= tol elementwise (tol: a derived bound from jaxpref.testing.tolerances)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert np.all(err <= tol), f"max |diff| {err.max():.3g}, max excess {(err - tol).max():.3g}"


@pytest.fixture(scope="module")
def model():
    return build_model(presets.tiny_llama(initializer_range=INIT), 0)


@pytest.fixture(scope="module")
def batch():
    # every row padded (by 2..5 tokens) with an id outside the vocabulary: pads must stay invisible
    return left_pad(PROMPTS, pad_id=-1, length=7)


REF_LENGTH = 20  # the uncached reference runs at one length (right padding is invisible to a causal LM)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logps(graphdef, state, ids):
    logits = nnx.merge(graphdef, state)(ids, return_logits=True).logits[0]
    return jax.nn.log_softmax(logits, axis=-1)


def _uncached_logps(model, tokens: list[int]) -> np.ndarray:
    """[T, V] next-token log-probs of one unpadded row, by a full forward without cache."""
    ids = jnp.asarray([tokens + [0] * (REF_LENGTH - len(tokens))], jnp.int32)
    return np.asarray(_forward_logps(*nnx.split(model), ids))[: len(tokens)]


def _greedy_reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Argmax loop over full forwards of the unpadded row (no cache)."""
    tokens, logps = list(prompt), []
    for _ in range(n):
        lp = _uncached_logps(model, tokens)[-1]
        tokens.append(int(lp.argmax()))
        logps.append(float(lp.max()))
    return tokens[len(prompt):], logps


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_mistral", "tiny_gpt2"])
def test_greedy_matches_uncached_argmax_loop(preset, batch):
    # mistral: 4-token sliding window, shorter than prompt + completion; gpt2: learned positions
    model = build_model(presets.get_preset(preset, initializer_range=INIT), 0)
    ids, mask = batch
    out = generate(model, ids, mask, key=jax.random.key(0), config=GREEDY)
    n = GREEDY.max_new_tokens
    assert out.tokens.shape == (3, ids.shape[1] + n) and out.completion.shape == (3, n)
    for row, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logps = _greedy_reference(model, prompt, n)
        assert out.completion[row].tolist() == ref_tokens, (preset, row)
        # KV-cache decode vs uncached forwards: the token's rounding chain (tolerances.token_logp_tol)
        _close(out.logprobs[row], ref_logps, token_logp_tol(model.config, ids.shape[1] + n, ref_logps))
    np.testing.assert_array_equal(out.completion_mask, 1)
    np.testing.assert_array_equal(out.lengths, n)
    np.testing.assert_array_equal(out.sampling_logprobs, 0.0)
    np.testing.assert_array_equal(out.tokens[:, : ids.shape[1]], ids)
    np.testing.assert_array_equal(out.mask, np.concatenate([mask, np.ones((3, n), np.int32)], axis=1))


def test_left_padded_batch_matches_rows_alone(model, batch):
    # (greedy rows against unpadded rows: test_greedy_matches_uncached_argmax_loop)
    ids, mask = batch
    config = SAMPLE.replace(top_k=20, top_p=0.9)
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))  # per-row keys: batch-independent samples
    batched = generate(model, ids, mask, key=keys, config=config)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], key=keys[row : row + 1], config=config)
        assert batched.completion[row].tolist() == alone.completion[0].tolist(), row
        tol = token_logp_tol(model.config, ids.shape[1] + config.max_new_tokens, alone.logprobs[0])
        _close(batched.logprobs[row], alone.logprobs[0], tol)  # a batch vs one row: two programs
        _close(batched.sampling_logprobs[row], alone.sampling_logprobs[0], tol)  # the filtered softmax: same chain
        # and the model log-probs are those of an uncached forward over prompt + completion
        completion = batched.completion[row].tolist()
        logps = _uncached_logps(model, prompt + completion)
        ref = [logps[len(prompt) - 1 + j, t] for j, t in enumerate(completion)]
        _close(batched.logprobs[row], ref, tol)
        # sampled tokens only ever come from the top-k set
        for j, t in enumerate(completion):
            assert t in np.argsort(-logps[len(prompt) - 1 + j])[: config.top_k]


def test_right_padding_also_works(model, batch):
    ids, mask = batch
    ids, mask = ids.copy(), mask.copy()
    ids[2], mask[2] = [11, 12, 13, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]  # row 2 right-padded instead
    out = generate(model, ids, mask, key=jax.random.key(0), config=GREEDY)
    assert out.completion[2].tolist() == _greedy_reference(model, PROMPTS[2], GREEDY.max_new_tokens)[0]


def test_sampling_is_reproducible_and_key_dependent(model, batch):
    ids, mask = batch
    config = SAMPLE
    a = generate(model, ids, mask, key=jax.random.key(1), config=config)
    b = generate(model, ids, mask, key=jax.random.key(1), config=config)
    c = generate(model, ids, mask, key=jax.random.key(2), config=config)
    np.testing.assert_array_equal(a.completion, b.completion)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.completion, c.completion)
    # legacy uint32 keys are accepted and equivalent to the typed key they wrap
    d = generate(model, ids, mask, key=jax.random.PRNGKey(1), config=config)
    np.testing.assert_array_equal(a.completion, d.completion)
    # temperature 1, no filtering: the sampling distribution is the model's
    _close(a.sampling_logprobs, a.logprobs, log_softmax_tol(model.config.vocab_size, a.logprobs))  # same logits
    assert np.all(a.logprobs < 0)


def test_top_k_1_equals_greedy(model, batch):
    ids, mask = batch
    greedy = generate(model, ids, mask, key=jax.random.key(0), config=GREEDY)
    top1 = generate(model, ids, mask, key=jax.random.key(5), config=SAMPLE.replace(temperature=1.7, top_k=1))
    np.testing.assert_array_equal(top1.completion, greedy.completion)
    _close(top1.logprobs, greedy.logprobs, log_softmax_tol(model.config.vocab_size, greedy.logprobs))  # same logits
    _close(top1.sampling_logprobs, 0.0, log_softmax_tol(1, 0.0))  # a point mass: one term, log(1) = 0


def test_filter_sets():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda **kw: np.isfinite(generation._filter(logits, SAMPLE.replace(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, True, False]
    assert kept(top_p=1.0) == [True] * 4

def test_eos_stops_rows(model, batch):
    ids, mask = batch
    free = generate(model, ids, mask, key=jax.random.key(0), config=GREEDY)
    # make row 1's third greedy token the EOS: row 1 stops there, others run on (or stop on it too)
    eos = int(free.completion[1, 2])
    config = GREEDY.replace(eos_token_ids=(eos,), pad_token_id=-7)
    out = generate(model, ids, mask, key=jax.random.key(0), config=config)
    n = config.max_new_tokens
    for row in range(3):
        full = free.completion[row].tolist()
        stop = full.index(eos) + 1 if eos in full else n
        assert out.completion[row].tolist() == full[:stop] + [-7] * (n - stop)
        assert out.completion_mask[row].tolist() == [1] * stop + [0] * (n - stop)
        assert int(out.lengths[row]) == stop
        _close(out.logprobs[row, :stop], free.logprobs[row, :stop],
               token_logp_tol(model.config, ids.shape[1] + n, free.logprobs[row, :stop]))  # two programs
        np.testing.assert_array_equal(out.logprobs[row, stop:], 0.0)
    # every row hitting EOS at step 0 ends the loop early: all later columns are padding
    first = tuple(int(t) for t in free.completion[:, 0])
    early = generate(model, ids, mask, key=jax.random.key(0), config=GREEDY.replace(eos_token_ids=first))
    np.testing.assert_array_equal(early.lengths, 1)
    np.testing.assert_array_equal(early.completion[:, 1:], 0)


def test_compiles_once_per_shape(model, batch):
    ids, mask = batch
    generate(model, ids, mask, key=jax.random.key(0), config=SAMPLE)  # compiled here or by an earlier test
    size = generation._generate._cache_size()
    for seed in range(1, 3):
        generate(model, ids, mask, key=jax.random.key(seed), config=SAMPLE)
    other = left_pad([[1, 2, 3], [4, 5, 6], [9]], pad_id=0, length=7)  # same shapes, other data
    generate(model, *other, key=jax.random.key(0), config=SAMPLE)
    # a fresh model object with the same structure shares the compiled function too
    other_model = build_model(presets.tiny_llama(initializer_range=INIT), 1)
    generate(other_model, ids, mask, key=jax.random.key(0), config=SAMPLE)
    assert generation._generate._cache_size() == size
    generate(model, ids[:, 1:], mask[:, 1:], key=jax.random.key(0), config=SAMPLE)  # new prompt length
    assert generation._generate._cache_size() == size + 1


def test_sampling_config_validation():
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    assert SamplingConfig(eos_token_ids=[2, 3]).eos_token_ids == (2, 3)
    assert SamplingConfig(eos_token_ids=2).eos_token_ids == (2,)
    hash(SamplingConfig())


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        left_pad([[1, 2, 3]], length=2)
