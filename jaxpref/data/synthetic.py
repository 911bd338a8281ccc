"""The exact-oracle testbed (design.md §4): every response enumerable, every quantity exact.

A :class:`Testbed` has K prompts (distinct token sequences of length P) and, as responses, *all*
``N = A**L`` sequences of length L over an alphabet of A tokens (ids ``0..A-1``, lexicographic order:
response ``n`` spells ``n`` in base A, most significant token first). A causal LM whose softmax at the
response positions is restricted to the alphabet defines an exact distribution over the N responses:

    log π(y|x) = Σ_t log softmax_alphabet(logits(x, y_<t))[y_t]          (:func:`response_logps`)

With :meth:`Testbed.model_config` the model's vocabulary *is* the alphabet (``vocab_size = A``), so
the restricted softmax equals the full one the training pipeline uses, and :mod:`jaxpref.data.synthetic_prefs`
can write the testbed as a text dataset + tokenizer that the real pipeline scores to the same numbers.

Policies are ``[K, N]`` arrays of log-probabilities (``logsumexp`` over N is 0 per prompt): from a
real LM (:func:`response_logps`, :func:`make_response_logps_fn`) or tabular (:class:`TabularPolicy`).
A true preference ``pref [K, N, N]`` holds ``p(y_i ≻ y_j | x_k)`` (``pref + pref^T = 1``, diagonal 0.5):
Bradley–Terry from a reward (:func:`bt_preference`), with an intransitive rock-paper-scissors part
(:func:`intransitive_preference`), or flipped by a noisy annotator (:func:`noisy_preference`).

Exact quantities (pure ``jnp``, jitted): h-win rate (papers-addendum.md "Win-rate optimisation"),
KL, entropy, DPO's closed-form optimum ``π_ref · exp(r/β) / Z`` (Rafailov et al. 2023, eq. 4), the
BT-optimal policy ``∝ exp(r)`` (papers-addendum.md, TYPO), and the population (infinite-data)
value of any registered pair loss (:func:`population_loss`). Sampled datasets, the pair distribution
and population losses, ranking accuracies and the text export live in :mod:`jaxpref.data.synthetic_prefs`
and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpref.data.synthetic_prefs import (  # re-exported: the whole testbed API is importable from here
    TestbedPairs,
    exact_idealized_ranking_accuracy,
    exact_ranking_accuracy,
    pair_logps,
    population_loss,
    population_pair_weights,
    sample_pairs,
    save_tokenizer,
    write_text_dataset,
)
from jaxpref.metrics.win_rate import H_FUNCTIONS, h_transform
from jaxpref.models.config import Family, ModelConfig

Array = jax.Array

MAX_ALPHABET = len(string.ascii_lowercase)  # tokens are written as the letters a..z
MAX_RESPONSES = 1 << 16  # pref is [K, N, N]: N = 65536 already means 16 GiB per prompt

__all__ = [
    "MAX_ALPHABET", "MAX_RESPONSES", "TestbedConfig", "Testbed", "TabularPolicy",
    "response_logps", "make_response_logps_fn", "uniform_logps",
    "random_reward", "bt_preference", "intransitive_preference", "noisy_preference", "find_cycle",
    "win_rate", "win_rate_per_prompt", "kl", "mean_kl", "entropy", "expected_reward", "dpo_optimum", "bt_optimal",
    "population_pair_weights", "population_loss",
    "TestbedPairs", "sample_pairs", "pair_logps", "exact_ranking_accuracy", "exact_idealized_ranking_accuracy",
    "write_text_dataset", "save_tokenizer",
]


# ------------------------------------------------------------------------------------ testbed


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Sizes of an exact-oracle testbed.

    Attributes:
      num_prompts: K distinct prompts (``K <= A**P``).
      prompt_length: P >= 1 tokens per prompt (the last prompt position predicts the first response token).
      alphabet_size: A in [2, 26] tokens, ids ``0..A-1``, written as the letters ``a..``.
      response_length: L >= 1; the responses are all ``N = A**L`` sequences (N <= 65536).
      seed: picks the K prompts (uniformly without replacement among the candidate sequences).
      allow_constant_prompts: also draw prompts like ``(t, t, ..., t)``. Off by default, because a
        causal LM with relative positions only (RoPE, no BOS) maps the constant prefixes ``t``, ``t t``,
        ``t t t``, ... to the *same* final hidden state (every attention layer averages identical
        values), so after a constant prompt ``p(y_2 | x, y_1 = t) = p(y_1 | x)`` is forced and the LM cannot
        represent most policies (e.g. DPO's optimum). With a non-constant prompt every prefix is non-constant.
    """

    __test__ = False  # not a pytest test class despite the name

    num_prompts: int = 8
    prompt_length: int = 3
    alphabet_size: int = 4
    response_length: int = 4
    seed: int = 0
    allow_constant_prompts: bool = False

    def __post_init__(self):
        if not isinstance(self.allow_constant_prompts, bool):
            raise TypeError(f"TestbedConfig.allow_constant_prompts must be a bool, got {self.allow_constant_prompts!r}")
        for name in ("num_prompts", "prompt_length", "alphabet_size", "response_length", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"TestbedConfig.{name} must be an int, got {value!r}")
        if self.num_prompts < 1 or self.prompt_length < 1 or self.response_length < 1:
            raise ValueError(f"TestbedConfig: num_prompts, prompt_length and response_length must be >= 1, got "
                             f"K={self.num_prompts}, P={self.prompt_length}, L={self.response_length}")
        if not 2 <= self.alphabet_size <= MAX_ALPHABET:
            raise ValueError(f"TestbedConfig.alphabet_size must be in [2, {MAX_ALPHABET}] (tokens are the letters "
                             f"a..z), got {self.alphabet_size}")
        if self.seed < 0:
            raise ValueError(f"TestbedConfig.seed must be >= 0, got {self.seed}")
        if not self.allow_constant_prompts and self.prompt_length < 2:
            raise ValueError("TestbedConfig: prompt_length=1 makes every prompt constant; use prompt_length >= 2 or "
                             "set allow_constant_prompts=True (see the class docstring for what an LM then cannot do)")
        if self.num_prompts > self.num_candidate_prompts:
            what = "sequences" if self.allow_constant_prompts else "non-constant sequences"
            raise ValueError(f"TestbedConfig: num_prompts={self.num_prompts} distinct prompts, but there are only "
                             f"{self.num_candidate_prompts} {what} of length {self.prompt_length} over "
                             f"{self.alphabet_size} tokens")
        if self.num_responses > MAX_RESPONSES:
            raise ValueError(f"TestbedConfig: alphabet_size**response_length = {self.num_responses} responses; "
                             f"exact enumeration allows at most {MAX_RESPONSES} (pref is [K, N, N])")
        if self.alphabet_size ** self.prompt_length >= 2 ** 62:
            raise ValueError(f"TestbedConfig: alphabet_size**prompt_length must be < 2**62 (prompt codes are int64), "
                             f"got {self.alphabet_size}**{self.prompt_length}")

    @property
    def num_responses(self) -> int:
        """N = A**L."""
        return self.alphabet_size ** self.response_length

    @property
    def num_candidate_prompts(self) -> int:
        """Sequences the prompts are drawn from: ``A**P``, minus the A constant ones unless allowed."""
        return self.alphabet_size ** self.prompt_length - (0 if self.allow_constant_prompts else self.alphabet_size)


def _digits(codes: np.ndarray, base: int, length: int) -> np.ndarray:
    """[...] int64 codes -> [..., length] int32 base-``base`` digits, most significant first."""
    powers = base ** np.arange(length - 1, -1, -1, dtype=np.int64)
    return ((codes[..., None] // powers) % base).astype(np.int32)


def _codes(tokens: np.ndarray, base: int, what: str) -> np.ndarray:
    """[..., length] tokens -> [...] int64 codes; ValueError for tokens outside ``0..base-1``."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{what} must be integer token ids, got dtype {tokens.dtype}")
    bad = (tokens < 0) | (tokens >= base)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: token {int(tokens[where])} at index {where} is outside the alphabet 0..{base - 1}")
    powers = base ** np.arange(tokens.shape[-1] - 1, -1, -1, dtype=np.int64)
    return tokens.astype(np.int64) @ powers


class Testbed:
    """K prompts x all N = A**L responses (module docstring).

    Attributes:
      config: the :class:`TestbedConfig`.
      prompts: [K, P] int32 prompt token ids (distinct, sorted lexicographically).
      responses: [N, L] int32 all responses; ``responses[n]`` is ``n`` written in base A.
    """

    __test__ = False

    def __init__(self, config: TestbedConfig | None = None, **overrides):
        """``Testbed(TestbedConfig(...))`` or ``Testbed(num_prompts=3, ...)`` (fields of the config)."""
        config = config or TestbedConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        c = self.config
        rng = np.random.default_rng([c.seed, 0x7E57])
        total = c.alphabet_size ** c.prompt_length
        # constant sequences t t ... t have codes t * (1 + A + ... + A**(P-1))
        constant = np.arange(c.alphabet_size, dtype=np.int64) * ((total - 1) // (c.alphabet_size - 1))
        if total <= 1 << 20:
            candidates = np.arange(total, dtype=np.int64)
            if not c.allow_constant_prompts:
                candidates = np.setdiff1d(candidates, constant)
            codes = rng.choice(candidates, size=c.num_prompts, replace=False)
        else:  # avoid materialising a huge candidate list; redraw until K distinct valid codes
            codes = np.empty(0, np.int64)
            while codes.size < c.num_prompts:
                draw = rng.integers(0, total, size=2 * c.num_prompts, dtype=np.int64)
                if not c.allow_constant_prompts:
                    draw = np.setdiff1d(draw, constant)
                codes = np.unique(np.concatenate([codes, draw]))
            codes = rng.permutation(codes)[:c.num_prompts]
        self._prompt_codes = np.sort(codes.astype(np.int64))
        self.prompts = _digits(self._prompt_codes, c.alphabet_size, c.prompt_length)
        self.responses = _digits(np.arange(c.num_responses, dtype=np.int64), c.alphabet_size, c.response_length)
        self.prompts.setflags(write=False)
        self.responses.setflags(write=False)

    def __repr__(self) -> str:
        c = self.config
        return (f"Testbed(K={c.num_prompts}, P={c.prompt_length}, A={c.alphabet_size}, L={c.response_length}, "
                f"N={c.num_responses}, seed={c.seed})")

    @property
    def num_prompts(self) -> int:
        return self.config.num_prompts

    @property
    def num_responses(self) -> int:
        return self.config.num_responses

    @property
    def token_names(self) -> tuple[str, ...]:
        """The A token strings: ``("a", "b", ...)``; token id i is the i-th letter."""
        return tuple(string.ascii_lowercase[: self.config.alphabet_size])

    def sequences(self) -> np.ndarray:
        """[K, N, P+L] int32 prompt + response token ids for every (prompt, response)."""
        c = self.config
        prompts = np.broadcast_to(self.prompts[:, None, :], (c.num_prompts, c.num_responses, c.prompt_length))
        responses = np.broadcast_to(self.responses[None], (c.num_prompts, c.num_responses, c.response_length))
        return np.concatenate([prompts, responses], axis=-1)

    def response_index(self, tokens) -> np.ndarray:
        """[..., L] response tokens -> [...] int64 index into the N responses (ValueError outside the alphabet)."""
        tokens = np.asarray(tokens)
        if tokens.ndim < 1 or tokens.shape[-1] != self.config.response_length:
            raise ValueError(f"response tokens must have a last axis of length L={self.config.response_length}, "
                             f"got shape {tokens.shape}")
        return _codes(tokens, self.config.alphabet_size, "response tokens")

    def prompt_index(self, prompt_tokens) -> np.ndarray:
        """[..., P] prompt tokens -> [...] int64 index into the K prompts (ValueError for other sequences)."""
        tokens = np.asarray(prompt_tokens)
        if tokens.ndim < 1 or tokens.shape[-1] != self.config.prompt_length:
            raise ValueError(f"prompt tokens must have a last axis of length P={self.config.prompt_length}, "
                             f"got shape {tokens.shape}")
        codes = _codes(tokens, self.config.alphabet_size, "prompt tokens")
        idx = np.searchsorted(self._prompt_codes, codes)
        found = (idx < len(self._prompt_codes)) & (self._prompt_codes[np.minimum(idx, len(self._prompt_codes) - 1)]
                                                    == codes)
        if not np.all(found):
            bad = tokens.reshape(-1, tokens.shape[-1])[np.argmin(found.reshape(-1))]
            raise ValueError(f"prompt {bad.tolist()} is not one of the testbed's {self.num_prompts} prompts")
        return idx.astype(np.int64)

    def to_text(self, tokens) -> str:
        """[T] token ids -> ``"a b c"`` (the letters separated by single spaces)."""
        names = self.token_names
        return " ".join(names[int(t)] for t in np.asarray(tokens).reshape(-1))

    def model_config(self, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int = 64, **kw) -> ModelConfig:
        """A tiny Llama config with ``vocab_size = A`` (so the full softmax IS the alphabet-restricted one).

        Args:
          hidden_size, num_layers, num_heads, intermediate_size: sizes; ``head_dim = hidden_size // num_heads``.
          **kw: any other :class:`ModelConfig` field (``num_kv_heads`` defaults to ``num_heads``;
            ``family``, ``vocab_size``, ``tie_word_embeddings``, ... may be overridden).
        """
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
        length = self.config.prompt_length + self.config.response_length
        fields = dict(family=Family.LLAMA, vocab_size=self.config.alphabet_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_heads, head_dim=hidden_size // num_heads, norm_eps=1e-5,
                      max_position_embeddings=max(64, length))
        fields.update(kw)
        return ModelConfig(**fields)

    def init_model(self, seed: int = 0, *, init_std: float = 0.2, **model_kw):
        """A real jaxpref causal LM (nnx) of :meth:`model_config` with NumPy-drawn weights.

        Uses :func:`jaxpref.testing.models.random_model` (no compilation); ``init_std`` 0.2 gives a clearly
        non-uniform π over responses. ``model_kw`` goes to :meth:`model_config`.
        """
        from jaxpref.testing.models import random_model

        return random_model(self.model_config(**model_kw), seed=seed, std=init_std)


def uniform_logps(testbed: Testbed) -> Array:
    """[K, N] float32 ``log(1/N)``: the uniform policy."""
    k, n = testbed.num_prompts, testbed.num_responses
    return jnp.full((k, n), -np.log(n), jnp.float32)


# ------------------------------------------------------------------------------------ LM log-probs


def _alphabet_ids(testbed: Testbed, alphabet: Sequence[int] | None, vocab_size: int) -> tuple[int, ...]:
    a = testbed.config.alphabet_size
    ids = tuple(range(a)) if alphabet is None else tuple(int(i) for i in alphabet)
    if len(ids) != a or len(set(ids)) != a:
        raise ValueError(f"alphabet must hold A={a} distinct model token ids, got {list(ids)}")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"alphabet ids {list(ids)} must lie in the model's vocabulary 0..{vocab_size - 1}")
    return ids


def _logps_from_model(model, sequences: Array, prompt_length: int, alphabet: tuple[int, ...]) -> Array:
    """[K, N, T] testbed tokens -> [K, N] float32 log π(y|x) with the softmax restricted to ``alphabet``."""
    k, n, t = sequences.shape
    ids = jnp.asarray(alphabet, jnp.int32)
    flat = sequences.reshape(k * n, t)
    hidden = model(ids[flat]).hidden  # [KN, T, D]; testbed token i is model token alphabet[i]
    predictors = hidden[:, prompt_length - 1: t - 1]  # [KN, L, D]: position t-1 predicts token t
    matrix, layout = model.unembedding()
    w = jnp.take(matrix, ids, axis=1 if layout == "dv" else 0)  # only the alphabet's columns
    eq = "nld,da->nla" if layout == "dv" else "nld,ad->nla"
    logits = jnp.einsum(eq, predictors, w.astype(predictors.dtype), preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [KN, L, A]
    targets = flat[:, prompt_length:]  # testbed ids index the restricted softmax directly
    token_logps = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return token_logps.sum(-1).reshape(k, n)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_length", "alphabet"))
def _response_logps_jit(graphdef, state, sequences, *, prompt_length, alphabet):
    return _logps_from_model(nnx.merge(graphdef, state), sequences, prompt_length, alphabet)


def response_logps(model, testbed: Testbed, *, alphabet: Sequence[int] | None = None) -> Array:
    """[K, N] float32 exact ``log π(y_n | x_k)`` of a jaxpref causal LM.

    At each response position the softmax is taken over the ``alphabet`` columns of the logits only
    (default ``range(A)``; testbed token i is fed to the model as ``alphabet[i]``), and the L token
    log-probs are summed, so ``logsumexp`` over N is 0 for every prompt. One forward over all K·N
    sequences, jitted once per (model structure, testbed shape).

    Args:
      model: a jaxpref ``CausalLM`` with ``vocab_size > max(alphabet)``.
      testbed: the :class:`Testbed`.
      alphabet: A distinct model token ids standing for the testbed tokens ``0..A-1``.
    """
    ids = _alphabet_ids(testbed, alphabet, model.config.vocab_size)
    graphdef, state = nnx.split(model)
    return _response_logps_jit(graphdef, state, jnp.asarray(testbed.sequences()),
                               prompt_length=testbed.config.prompt_length, alphabet=ids)


def make_response_logps_fn(graphdef, rest, testbed: Testbed, *, alphabet: Sequence[int] | None = None):
    """``f(params) -> [K, N]`` log π of the model ``nnx.merge(graphdef, params, rest)`` (jittable, differentiable).

    For training loops: ``graphdef, params, rest = jaxpref.training.step.split_model(model)`` (that is
    ``nnx.split(model, nnx.Param, ...)``); ``jax.grad`` of any function of ``f(params)`` gives
    parameter gradients of exact population objectives. Same conventions as :func:`response_logps`.
    """
    _alphabet_ids(testbed, alphabet, vocab_size=1 << 62)  # fail early; the vocabulary is checked per call
    sequences = jnp.asarray(testbed.sequences())
    prompt_length = testbed.config.prompt_length

    def logps_fn(params) -> Array:
        model = nnx.merge(graphdef, params, rest)
        ids = _alphabet_ids(testbed, alphabet, model.config.vocab_size)  # Python, runs at trace time only
        return _logps_from_model(model, sequences, prompt_length, ids)

    return logps_fn


@dataclasses.dataclass(frozen=True)
class TabularPolicy:
    """A policy with one free logit per (prompt, response): ``π(·|x_k) = softmax(params[k])``.

    Every distribution over the N responses is reachable, so exact experiments (optima, win rates)
    run in milliseconds and have no capacity limits. ``params`` is a ``[K, N]`` float32 array.

    Attributes:
      num_prompts: K.
      num_responses: N.
    """

    num_prompts: int
    num_responses: int

    @classmethod
    def for_testbed(cls, testbed: Testbed) -> TabularPolicy:
        return cls(testbed.num_prompts, testbed.num_responses)

    def init(self, logps_init=None) -> Array:
        """[K, N] params whose policy is ``logps_init`` (default uniform); log-probs are valid logits."""
        if logps_init is None:
            return jnp.zeros((self.num_prompts, self.num_responses), jnp.float32)
        logps_init = jnp.asarray(logps_init, jnp.float32)
        if logps_init.shape != (self.num_prompts, self.num_responses):
            raise ValueError(f"logps_init must be [K, N] = {(self.num_prompts, self.num_responses)}, "
                             f"got {logps_init.shape}")
        return jax.nn.log_softmax(logps_init, axis=-1)

    @staticmethod
    def logps(params: Array) -> Array:
        """[K, N] params -> [K, N] log π (``log_softmax`` over responses)."""
        return jax.nn.log_softmax(params, axis=-1)


# ------------------------------------------------------------------------------------ preferences


def random_reward(testbed: Testbed, *, scale: float = 1.0, seed: int = 0, kind: str = "iid") -> np.ndarray:
    """[K, N] float32 true reward r*(x, y).

    Args:
      scale: standard deviation of r* for each (x, y).
      seed: NumPy seed.
      kind: ``"iid"``: independent ``N(0, scale²)`` per (prompt, response) (no structure an LM can
        exploit); ``"positional"``: ``r = Σ_t w[k, t, y_t]`` with ``w ~ N(0, scale²/L)`` (additive in the
        tokens, so the BT-optimal policy factorises over positions).
    """
    c = testbed.config
    rng = np.random.default_rng([seed, 0x2E3A])
    if kind == "iid":
        return (scale * rng.standard_normal((c.num_prompts, c.num_responses))).astype(np.float32)
    if kind == "positional":
        w = scale / np.sqrt(c.response_length) * rng.standard_normal(
            (c.num_prompts, c.response_length, c.alphabet_size))
        per_token = w[:, np.arange(c.response_length)[None, :], testbed.responses]  # [K, N, L]
        return per_token.sum(-1).astype(np.float32)
    raise ValueError(f"random_reward kind must be 'iid' or 'positional', got {kind!r}")


@jax.jit
def bt_preference(reward) -> Array:
    """[K, N] reward -> [K, N, N] Bradley–Terry preference ``σ(r_i − r_j)`` (Bradley & Terry 1952)."""
    reward = jnp.asarray(reward, jnp.float32)
    return jax.nn.sigmoid(reward[:, :, None] - reward[:, None, :])


def _rps_classes(testbed: Testbed, seed: int) -> np.ndarray:
    """[K, N] classes in {0, 1, 2}: a seeded shuffle of ``n mod 3`` per prompt (every class non-empty for N >= 3)."""
    rng = np.random.default_rng([seed, 0x5C1550])
    base = np.arange(testbed.num_responses) % 3
    return np.stack([rng.permutation(base) for _ in range(testbed.num_prompts)])


def intransitive_preference(testbed: Testbed, *, strength: float = 1.0, seed: int = 0, reward=None,
                            reward_scale: float = 1.0) -> Array:
    """[K, N, N] BT preference plus an antisymmetric rock-paper-scissors term: an intransitive oracle.

    ``p(y_i ≻ y_j | x) = σ(r_i − r_j + strength · c_ij)`` where every response has a class
    ``z ∈ {0, 1, 2}`` (seeded, balanced) and ``c_ij = +1`` if ``z_i ≡ z_j + 1 (mod 3)`` (i's class beats
    j's), ``−1`` in the reverse case and 0 within a class. ``c`` is antisymmetric, so ``pref + pref^T = 1``.
    For responses a, b, c of classes 0, 1, 2, ``b ≻ a``, ``c ≻ b`` and ``a ≻ c`` all hold (a 3-cycle:
    no reward explains it) as soon as ``strength`` exceeds the reward differences of the triple, which
    always happens for ``strength > max r − min r``; :func:`find_cycle` checks a given matrix.

    Args:
      strength: weight of the cyclic term (0 gives back :func:`bt_preference`).
      seed: seeds the classes and, when ``reward`` is None, :func:`random_reward`.
      reward: [K, N] reward of the transitive part (default ``random_reward(scale=reward_scale, seed=seed)``).
      reward_scale: scale of the default reward.
    """
    if reward is None:
        reward = random_reward(testbed, scale=reward_scale, seed=seed)
    reward = jnp.asarray(reward, jnp.float32)
    if reward.shape != (testbed.num_prompts, testbed.num_responses):
        raise ValueError(f"reward must be [K, N] = {(testbed.num_prompts, testbed.num_responses)}, "
                         f"got {reward.shape}")
    z = _rps_classes(testbed, seed)
    diff = (z[:, :, None] - z[:, None, :]) % 3  # 1: i beats j, 2: j beats i
    cyclic = jnp.asarray((diff == 1).astype(np.float32) - (diff == 2).astype(np.float32))
    return jax.nn.sigmoid(reward[:, :, None] - reward[:, None, :] + strength * cyclic)


def noisy_preference(pref, flip: float) -> Array:
    """``(1 − flip) · pref + flip · (1 − pref)``: an annotator who flips each label with probability ``flip``."""
    if not 0.0 <= float(flip) <= 1.0:
        raise ValueError(f"flip must be in [0, 1], got {flip}")
    pref = jnp.asarray(pref, jnp.float32)
    return (1.0 - flip) * pref + flip * (1.0 - pref)


def find_cycle(pref) -> tuple[int, int, int, int] | None:
    """``(k, a, b, c)`` with ``p(a ≻ b), p(b ≻ c), p(c ≻ a) > 0.5`` for prompt k, or None (no strict 3-cycle).

    A strict 3-cycle means no reward (no BT model) can reproduce the majority preferences of prompt k.
    """
    beats = np.asarray(pref) > 0.5  # [K, N, N]
    for k, m in enumerate(beats):
        two_steps = (m.astype(np.int32) @ m.astype(np.int32)) > 0  # a -> b -> c
        closing = two_steps & m.T  # and c -> a
        if closing.any():
            a, c = (int(i) for i in np.argwhere(closing)[0])
            b = int(np.argmax(m[a] & m[:, c]))
            return k, a, b, c
    return None


# ------------------------------------------------------------------------------------ exact quantities


def _prompt_mean(values: Array, prompt_weights) -> Array:
    """[K] -> [] weighted mean (weights normalised; None = uniform)."""
    if prompt_weights is None:
        return jnp.mean(values)
    w = jnp.asarray(prompt_weights, jnp.float32)
    return jnp.sum(w * values) / jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("h",))
def win_rate_per_prompt(logp_policy, logp_competitor, pref, *, h: str = "identity") -> Array:
    """[K] ``Σ_{y, y'} π(y|x) π_c(y'|x) h(p(y ≻ y'|x))`` (h via :func:`jaxpref.metrics.win_rate.h_transform`)."""
    if h not in H_FUNCTIONS:
        raise ValueError(f"h must be one of {H_FUNCTIONS}, got {h!r}")
    p, q = jnp.exp(logp_policy), jnp.exp(logp_competitor)
    return jnp.einsum("ki,kj,kij->k", p, q, h_transform(pref, h))


@functools.partial(jax.jit, static_argnames=("h",))
def win_rate(logp_policy, logp_competitor, pref, *, h: str = "identity", prompt_weights=None) -> Array:
    """[] exact h-win rate ``E_x Σ_{y,y'} π(y|x) π_c(y'|x) h(p(y ≻ y'|x))`` (papers-addendum.md WRO).

    Args:
      logp_policy: [K, N] log π.
      logp_competitor: [K, N] log π_c.
      pref: [K, N, N] ``p(y_i ≻ y_j | x_k)``.
      h: ``identity`` (the win rate; 0.5 against itself), ``logit`` (clipped, RLHF under BT) or ``log``.
      prompt_weights: [K] prompt distribution (normalised here; None = uniform).
    """
    return _prompt_mean(win_rate_per_prompt(logp_policy, logp_competitor, pref, h=h), prompt_weights)


@jax.jit
def kl(logp_p, logp_q) -> Array:
    """[K] ``KL(p || q) = Σ_y p(y) (log p(y) − log q(y))`` per prompt (terms with p(y) = 0 count 0)."""
    p = jnp.exp(logp_p)
    diff = jnp.where(p > 0, logp_p - logp_q, 0.0)
    return jnp.sum(p * diff, axis=-1)


@jax.jit
def mean_kl(logp_p, logp_q, prompt_weights=None) -> Array:
    """[] prompt-average of :func:`kl`."""
    return _prompt_mean(kl(logp_p, logp_q), prompt_weights)


@jax.jit
def entropy(logp) -> Array:
    """[K] ``−Σ_y π(y) log π(y)``."""
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


@jax.jit
def expected_reward(logp, reward) -> Array:
    """[K] ``E_{y~π(·|x)} r(x, y)``."""
    return jnp.sum(jnp.exp(logp) * jnp.asarray(reward, jnp.float32), axis=-1)


@jax.jit
def dpo_optimum(logp_ref, reward, beta) -> Array:
    """[K, N] ``log softmax(log π_ref + r/β)``: the KL-regularised RLHF / DPO optimum (Rafailov et al. 2023, eq. 4)."""
    return jax.nn.log_softmax(logp_ref + jnp.asarray(reward, jnp.float32) / beta, axis=-1)


@jax.jit
def bt_optimal(reward, scale=1.0) -> Array:
    """[K, N] ``log softmax(scale · r)``: the policy ∝ exp(r*) that TYPO's supervised term targets (addendum)."""
    return jax.nn.log_softmax(scale * jnp.asarray(reward, jnp.float32), axis=-1)
