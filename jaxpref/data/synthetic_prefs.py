"""Sampled preference datasets of the exact-oracle testbed, their exact metrics, and the text export.

Part of :mod:`jaxpref.data.synthetic` (which re-exports every public name here; import from there).
A dataset is a :class:`TestbedPairs`: for each pair a prompt index, two response indices in the order
they were drawn, and the annotators' votes. Majority, ties, vote shares α and the true preference of
the chosen response are derived properties.

The text export makes the testbed an ordinary dataset for the real pipeline: tokens are written as
letters separated by spaces (``"a c b"``), and :func:`save_tokenizer` saves a word-level tokenizer
whose vocabulary is exactly those letters (id i = the i-th letter), loadable with
``jaxpref.loading.load_tokenizer("hf:DIR")``. Tokenised with
``TokenizeConfig(add_eos=False, chat_template=False, add_special_tokens=False)`` each pair becomes
``prompt ids + response ids`` with the testbed's own ids, so ``jaxpref.evaluation.score_pairs`` of a
model with ``vocab_size = A`` gives :func:`pair_logps` of :func:`jaxpref.data.synthetic.response_logps`.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import losses
from jaxpref.metrics import ranking

if TYPE_CHECKING:
    from jaxpref.data.synthetic import Testbed

Array = jax.Array
TEXT_STYLES = ("votes", "explicit")


def _xp(x):
    """``jnp`` for JAX arrays (also tracers), ``np`` otherwise: properties work on host data and under jit."""
    return jnp if isinstance(x, jax.Array) else np


@flax.struct.dataclass
class TestbedPairs:
    """M sampled preference pairs with annotator votes (host NumPy arrays, a pytree).

    Attributes:
      prompt: [M] int32 prompt index k.
      first: [M] int32 first drawn response index.
      second: [M] int32 second drawn response index.
      votes_first: [M] int32 annotators preferring ``first``.
      n_votes: [M] int32 annotators per pair.
      p_first: [M] float32 true ``p(first ≻ second | prompt)``.
      coin: [M] bool the seeded tie-break: on a tie (``2 · votes_first == n_votes``) ``first`` is chosen iff True.
      response_length: L (static), the token count of every response.
    """

    __test__ = False

    prompt: np.ndarray
    first: np.ndarray
    second: np.ndarray
    votes_first: np.ndarray
    n_votes: np.ndarray
    p_first: np.ndarray
    coin: np.ndarray
    response_length: int = flax.struct.field(pytree_node=False)

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def tied(self):
        """[M] bool: exactly half of the annotators preferred each response."""
        return 2 * self.votes_first == self.n_votes

    @property
    def first_chosen(self):
        """[M] bool: ``first`` is the majority response (ties: the coin)."""
        return (2 * self.votes_first > self.n_votes) | (self.tied & self.coin)

    @property
    def chosen(self):
        """[M] int32 majority response index."""
        return _xp(self.first).where(self.first_chosen, self.first, self.second)

    @property
    def rejected(self):
        """[M] int32 minority response index."""
        return _xp(self.first).where(self.first_chosen, self.second, self.first)

    @property
    def alpha(self):
        """[M] float32 share of annotators preferring the chosen response, in [0.5, 1]."""
        xp = _xp(self.first)
        votes = xp.where(self.first_chosen, self.votes_first, self.n_votes - self.votes_first)
        return (votes / self.n_votes).astype(xp.float32)

    @property
    def true_p(self):
        """[M] float32 ``pref[prompt, chosen, rejected]``."""
        return _xp(self.first).where(self.first_chosen, self.p_first, 1.0 - self.p_first)

    def subset(self, index) -> TestbedPairs:
        """The pairs at ``index`` (an int array, slice or bool mask)."""
        return jax.tree.map(lambda x: x[index], self)


def _sampler_probs(sampler_logps, k: int, n: int) -> np.ndarray:
    if sampler_logps is None:
        return np.full((k, n), 1.0 / n)
    logp = np.asarray(sampler_logps, np.float64)
    if logp.shape != (k, n):
        raise ValueError(f"sampler_logps must be [K, N] = {(k, n)}, got {logp.shape}")
    probs = np.exp(logp)
    total = probs.sum(-1)
    if not np.all(np.abs(total - 1.0) < 1e-3):
        bad = int(np.argmax(np.abs(total - 1.0)))
        raise ValueError(f"sampler_logps must be normalised log-probs; prompt {bad} sums to {total[bad]:.6f}")
    return probs / total[:, None]


def _draw(cdf: np.ndarray, prompt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One response per row from ``cdf[prompt]``: a single searchsorted over rows offset by k."""
    k, n = cdf.shape
    flat = (cdf + np.arange(k)[:, None]).reshape(-1)
    pos = np.searchsorted(flat, prompt + rng.random(prompt.shape[0]), side="right")
    return np.clip(pos - prompt * n, 0, n - 1).astype(np.int32)


def sample_pairs(testbed: Testbed, pref, sampler_logps=None, *, n_pairs: int, n_votes: int = 1, seed: int = 0,
                 distinct: bool = True) -> TestbedPairs:
    """Draws M = ``n_pairs`` annotated pairs (NumPy, seeded).

    Each pair: prompt k uniform over the K prompts; two responses drawn independently from the
    sampler ``π_s(·|x_k)`` (redrawn together while equal when ``distinct``: pair probability
    ``π_s(y)π_s(y') / (1 − Σπ_s²)``, as :func:`population_pair_weights`); each of
    ``n_votes`` annotators independently prefers the first with probability ``pref[k, first, second]``.

    Args:
      testbed: the :class:`~jaxpref.data.synthetic.Testbed`.
      pref: [K, N, N] true preference.
      sampler_logps: [K, N] log π_s (None: uniform over responses).
      n_pairs: M >= 1.
      n_votes: annotators per pair (odd numbers avoid ties).
      seed: NumPy seed (same seed, same pairs).
      distinct: never pair a response with itself.
    """
    k, n = testbed.num_prompts, testbed.num_responses
    pref = np.asarray(pref, np.float64)
    if pref.shape != (k, n, n):
        raise ValueError(f"pref must be [K, N, N] = {(k, n, n)}, got {pref.shape}")
    if not np.all((pref >= 0) & (pref <= 1)):
        raise ValueError("pref must hold probabilities in [0, 1]")
    for name, value in (("n_pairs", n_pairs), ("n_votes", n_votes)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    probs = _sampler_probs(sampler_logps, k, n)
    if distinct and np.any(1.0 - (probs ** 2).sum(-1) < 1e-6):
        bad = int(np.argmax((probs ** 2).sum(-1)))
        raise ValueError(f"distinct pairs need a sampler with mass on two responses; prompt {bad} has "
                         f"max π_s = {probs[bad].max():.6f}")
    cdf = np.cumsum(probs, axis=-1)
    cdf[:, -1] = 1.0
    rng = np.random.default_rng([seed, 0x9A125])
    prompt = rng.integers(0, k, size=n_pairs).astype(np.int32)
    first, second = _draw(cdf, prompt, rng), _draw(cdf, prompt, rng)
    for _ in range(100_000):
        same = np.flatnonzero(first == second) if distinct else np.empty(0, np.int64)
        if same.size == 0:
            break
        first[same], second[same] = _draw(cdf, prompt[same], rng), _draw(cdf, prompt[same], rng)
    else:
        raise RuntimeError("sample_pairs: could not draw distinct pairs (sampler too concentrated)")
    p_first = pref[prompt, first, second]
    votes = rng.binomial(n_votes, p_first).astype(np.int32)
    coin = rng.random(n_pairs) < 0.5
    return TestbedPairs(prompt=prompt, first=first, second=second, votes_first=votes,
                        n_votes=np.full(n_pairs, n_votes, np.int32), p_first=p_first.astype(np.float32),
                        coin=coin, response_length=testbed.config.response_length)


# ------------------------------------------------------------------------------------ population losses


def population_pair_weights(sampler_logps, *, prompt_weights=None, distinct: bool = True) -> Array:
    """[K, N, N] probability of drawing the ordered pair (x_k, y_i, y_j), summing to 1.

    The distribution :func:`sample_pairs` draws from: prompt ~ ``prompt_weights`` (uniform), then
    ``y, y' ~ sampler(·|x)`` independently, redrawn while equal when ``distinct`` (so
    ``π(y)π(y') / (1 − Σ π²)`` off the diagonal).
    """
    p = jnp.exp(jnp.asarray(sampler_logps, jnp.float32))
    w = p[:, :, None] * p[:, None, :]
    if distinct:
        w = w * (1.0 - jnp.eye(p.shape[1], dtype=w.dtype))
    w = w / jnp.sum(w, axis=(1, 2), keepdims=True)
    mu = (jnp.full((p.shape[0],), 1.0 / p.shape[0]) if prompt_weights is None
          else jnp.asarray(prompt_weights, jnp.float32) / jnp.sum(jnp.asarray(prompt_weights, jnp.float32)))
    return w * mu[:, None, None]


def population_loss(logp_policy, logp_ref, pref, pair_weights, *, loss: str = "sigmoid",
                    response_length: int | None = None, **hparams) -> Array:
    """[] the infinite-data value of a registered pair loss: every pair weighted, both label orders.

    A pair (x, y, y') drawn with probability ``w`` is labelled ``y ≻ y'`` with probability
    ``p(y ≻ y'|x)``, else ``y' ≻ y``; the expected per-pair loss is
    ``Σ_{k,i,j} w_kij [p_kij ℓ(i ≻ j) + p_kji ℓ(j ≻ i)]`` with ``ℓ`` from :func:`jaxpref.losses.get`
    (``loss``, ``hparams`` e.g. ``beta=0.1``) on the summed log-probs (``votes = 1``, a hard label;
    token counts L when ``response_length`` is given). Token-normalised terms return
    ``E[loss] / E[denom]``. For ``sigmoid`` (DPO) with a BT ``pref`` and pairs covering every (y, y'),
    the minimiser is :func:`jaxpref.data.synthetic.dpo_optimum` (each pair's term is minimal at
    ``β (Δ_θ − Δ_ref) = r_i − r_j``; any full-coverage weights give the same minimiser). Memory is
    O(K·N²) (all ordered pairs at once).

    Args:
      logp_policy: [K, N] log π_θ.
      logp_ref: [K, N] log π_ref (None for reference-free losses).
      pref: [K, N, N] true preference.
      pair_weights: [K, N, N] pair distribution (:func:`population_pair_weights`).
    """
    term = losses.get(loss)
    hp = term.make_hparams(**hparams)
    k, n = logp_policy.shape
    chosen = jnp.broadcast_to(logp_policy[:, :, None], (k, n, n)).reshape(-1)
    rejected = jnp.broadcast_to(logp_policy[:, None, :], (k, n, n)).reshape(-1)
    ref_c = ref_r = tokens = None
    if logp_ref is not None:
        ref_c = jnp.broadcast_to(logp_ref[:, :, None], (k, n, n)).reshape(-1)
        ref_r = jnp.broadcast_to(logp_ref[:, None, :], (k, n, n)).reshape(-1)
    if response_length is not None:
        tokens = jnp.full((k * n * n,), float(response_length), jnp.float32)
    inputs = losses.LossInputs(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                               reference_chosen_logps=ref_c, reference_rejected_logps=ref_r,
                               chosen_tokens=tokens, rejected_tokens=tokens, votes=jnp.ones_like(chosen))
    out = term(inputs, hp)
    w = jnp.asarray(pair_weights, jnp.float32)
    both = (w + jnp.swapaxes(w, 1, 2)) * jnp.asarray(pref, jnp.float32)  # weight of "i ≻ j" as a labelled pair
    both = both.reshape(-1)
    return jnp.sum(both * out.loss) / jnp.sum(both * out.denom)


# ------------------------------------------------------------------------------------ exact pair metrics


def pair_logps(logps, pairs: TestbedPairs) -> Array:
    """[K, N] log π -> [M, 2] float32 ``(log π(chosen|x), log π(rejected|x))`` on a pair axis of size 2."""
    logps = jnp.asarray(logps, jnp.float32)
    prompt = jnp.asarray(pairs.prompt)
    return jnp.stack([logps[prompt, jnp.asarray(pairs.chosen)], logps[prompt, jnp.asarray(pairs.rejected)]], axis=1)


def exact_ranking_accuracy(logps, pairs: TestbedPairs, *, normalize: bool = False,
                           ties_correct: bool = True) -> Array:
    """[] ranking accuracy R (Chen et al. 2024, Def. 2.3) of a policy on the pairs, from exact log-probs.

    ``normalize`` gives R̃ (eq. 15, per-token means); every response has L tokens, so R̃ = R (the flag
    is kept for symmetry with real datasets). Via :func:`jaxpref.metrics.ranking.ranking_accuracy`.
    """
    lp = pair_logps(logps, pairs)
    counts = jnp.full(lp.shape[:1], float(pairs.response_length), jnp.float32)
    tallies = ranking.ranking_accuracy(lp[:, 0], lp[:, 1], counts, counts, ties_correct=ties_correct)
    return (tallies.normalized if normalize else tallies.ranking).mean


def exact_idealized_ranking_accuracy(logp_ref, pairs: TestbedPairs, beta, *, include_ties: bool = False,
                                     normalize: bool = False) -> Array:
    """Idealized ranking accuracy R* (Chen et al. 2024, Cor. 3.3) of the DPO optimum from ``logp_ref``.

    α is the pairs' vote share of the chosen response (:attr:`TestbedPairs.alpha`, clipped to
    [1e-3, 1 − 1e-3]); ties are excluded unless ``include_ties``. Via
    :func:`jaxpref.metrics.ranking.idealized_ranking_accuracy`.

    Returns:
      [] for a scalar ``beta``, [nβ] for a sequence of βs.
    """
    lp = pair_logps(logp_ref, pairs)
    if normalize:
        lp = lp / pairs.response_length
    betas = jnp.atleast_1d(jnp.asarray(beta, jnp.float32))
    tally = ranking.idealized_ranking_accuracy(lp[:, 0], lp[:, 1], jnp.asarray(pairs.alpha), betas,
                                               include_ties=include_ties, normalized=normalize)
    return tally.mean[0] if np.ndim(beta) == 0 else tally.mean


# ------------------------------------------------------------------------------------ text export


def _open_text(path: pathlib.Path):
    return gzip.open(path, "wt", encoding="utf-8") if path.name.endswith(".gz") else path.open("w", encoding="utf-8")


def write_text_dataset(testbed: Testbed, pairs: TestbedPairs, path: str | os.PathLike, *,
                       style: str = "votes") -> pathlib.Path:
    """Writes the pairs as a JSON Lines preference file the data pipeline reads (``.gz`` compresses).

    Texts are letters separated by spaces (:meth:`Testbed.to_text`). ``style``:

    * ``"votes"`` (default): ``{"id", "prompt", "response_a": chosen, "response_b": rejected,
      "p_a_preferred": α}``, the vote-share fields :mod:`jaxpref.data.formats` auto-detects (format
      ``votes``): it keeps ``response_a`` as chosen (α >= 0.5), ties (α = 0.5) with ``tie=True``, and
      ``TokenizedPairs.votes = α``.
    * ``"explicit"``: ``{"id", "prompt", "chosen", "rejected", "alpha"}``; the explicit format reads α
      only when told the field: ``load_preferences(path, format_config(fields={"alpha": "alpha"}))``.

    Every row also carries ``prompt_index``, ``chosen_index``, ``rejected_index``, ``n_votes`` and
    ``true_p`` (ignored by the loader). Pairs of a response with itself are refused (the loader
    rejects them as ``identical``): sample with ``distinct=True``.
    """
    if style not in TEXT_STYLES:
        raise ValueError(f"style must be one of {TEXT_STYLES}, got {style!r}")
    if pairs.response_length != testbed.config.response_length:
        raise ValueError(f"pairs have response_length {pairs.response_length}, the testbed "
                         f"{testbed.config.response_length}")
    chosen, rejected = np.asarray(pairs.chosen), np.asarray(pairs.rejected)
    same = np.flatnonzero(chosen == rejected)
    if same.size:
        raise ValueError(f"pair {int(same[0])} compares response {int(chosen[same[0]])} with itself "
                         f"({same.size} such pairs); sample with distinct=True")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    alpha, true_p = np.asarray(pairs.alpha, np.float64), np.asarray(pairs.true_p, np.float64)
    names = ("response_a", "response_b", "p_a_preferred") if style == "votes" else ("chosen", "rejected", "alpha")
    with _open_text(path) as fh:
        for m in range(len(pairs)):
            k = int(pairs.prompt[m])
            row = {"id": f"pair-{m}", "prompt": testbed.to_text(testbed.prompts[k]),
                   names[0]: testbed.to_text(testbed.responses[chosen[m]]),
                   names[1]: testbed.to_text(testbed.responses[rejected[m]]), names[2]: float(alpha[m]),
                   "prompt_index": k, "chosen_index": int(chosen[m]), "rejected_index": int(rejected[m]),
                   "n_votes": int(pairs.n_votes[m]), "true_p": float(true_p[m])}
            fh.write(json.dumps(row) + "\n")
    return path


def save_tokenizer(testbed: Testbed, directory: str | os.PathLike) -> pathlib.Path:
    """Saves the testbed's tokenizer (``load_tokenizer("hf:DIR")`` reads it back); returns the directory.

    An HF ``tokenizers`` WordLevel model over exactly the A letters (id i = the i-th letter) with a
    Whitespace pre-tokenizer, wrapped in ``transformers.PreTrainedTokenizerFast`` and saved with
    ``save_pretrained``. It has no special tokens at all: no BOS (nothing is added to prompts), no EOS
    (responses have a fixed length L; the pipeline runs with ``add_eos=False``), no pad (the pipeline
    pads with id 0, masked out) and no unknown token (a word outside the alphabet is an error,
    not silently mapped), so ``len(tokenizer) == A == vocab_size`` passes ``check_vocab``.
    transformers (5.x) needs none of them to load, encode or decode.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(testbed.token_names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))  # "[UNK]" is not in the vocab: unknown words fail
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(directory))
    return directory
