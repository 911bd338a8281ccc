"""Razin et al. (2025, arXiv 2410.08847) likelihood displacement, reproduced on the real ``stories260K`` model.

Two parts, both trained with DPO (``losses.get("sigmoid")``, β = 0.1, reference = the initial model) and
RMSProp without momentum (decay 0.99, ε = 1e-8), as in the paper's §3 / App. H.1:

* **Single-token experiment (§3, Thm 1-2).** Prompts whose next token the model predicts confidently
  (the analogue of the paper's SFT'd "Yes"); ``y⁺`` = that top token, ``y⁻`` = one token per stratum of
  unembedding cosine similarity to ``y⁺`` (most similar stratum = "similar" pairs, least similar = the
  controls). Each (x, y⁺, y⁻) trains its own copy of the model for ``steps`` steps (one ``vmap``-ed,
  jitted program for all pairs). Recorded: ``log π(y⁺|x)``, ``log π(y⁻|x)``, the loss, the full next-token
  distribution every step; the paper's metric ``max_{t<t'} π_t(y⁺) − π_{t'}(y⁺)`` and the tokens whose
  probability rose most at the ``riser_steps``. As in the paper, only runs whose loss fell at every step
  are analysed. Predictors of the displacement ``−Δ log π(y⁺)`` (Spearman ρ per seed):

  - ``thm1`` (primary): ``−⟨W⁺ − E_π[W], W⁺ − W⁻⟩``, the first-order change of ``−ln π(y⁺)`` when the
    prompt's hidden state follows the DPO gradient (the unconstrained-features setting of Thm 1; written
    out it is ``⟨W⁺,W⁻⟩ − ‖W⁺‖² + Σ_z π(z|x)⟨W_z, W⁺ − W⁻⟩``). For one-token responses both responses are
    predicted from the same state, so Def. 2's CHES of the predicting states is identically 0; Thm 1's
    unembedding form is the paper's own single-token version.
  - ``ches`` / ``ln_ches``: Def. 2 / 3 in the paper's per-example-script convention (the states at the last
    prompt position and after ``y``, i.e. ``prompt + y + EOS`` with ``y`` and EOS as targets;
    :mod:`jaxpref.metrics.ches`).
  - ``token_ches``: ``⟨W⁺, W⁻⟩ − ‖W⁺‖²`` (Thm 1 without the π-weighted sum).
  - ``gradient_ches``: ``⟨g⁺, g⁻⟩ − ‖g⁺‖²`` with ``g = ∇_θ log π(y|x)`` over all parameters (CHES's kernel on
    the whole network; one ``jvp`` per prompt); ``cosine`` of the unembeddings (the stratification key).

  The Thm 2 riser predictor ``⟨W_z, W⁺ − W⁻⟩`` (:func:`jaxpref.metrics.displacement.riser_predictor`) is
  checked against the actual change of ``log π(z|x)`` (Spearman over tokens ``z ∉ {y⁺, y⁻}``).

* **CHES-ranked subsets (§5, Fig. 2).** A pool of preferences ``(x, y⁺, y⁻)``: ``x`` = a word prefix of a
  sentence from short stories, ``y⁺`` / ``y⁻`` = two distinct continuations of ``response_tokens`` tokens
  sampled from the model (temperature 1), which one is preferred decided by a coin. CHES (Def. 2, the
  states predicting the response tokens) is computed for every pair; for each quantile ``q`` the window of
  ``subset_size`` pairs centred there (:func:`jaxpref.metrics.ches.quantile_window`) trains one model
  (full-batch DPO, ``subset_steps`` steps) and the mean change of the summed ``log π(y⁺|x)`` over the
  subset is measured (Razin's ``preferred_logprobs_change_mean``). The paper reports that the CHES order of
  the subsets matches their displacement order perfectly.

Deviations (stated in ``results.json``): a 260K-parameter model instead of 1-8B ones, so the learning rate
is larger (1e-7 moves nothing here; the value keeps the loss falling at every step); no SFT phase (the
model already prefers ``y⁺``); story prompts instead of the Persona questions; model samples with random
labels instead of UltraFeedback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpref import losses
from jaxpref.config import OptimConfig
from jaxpref.evaluation import pyplot
from jaxpref.experiments.runner import params_from_dict, write_results
from jaxpref.generation import SamplingConfig, generate, left_pad
from jaxpref.logprobs import masked_hidden_sums, sequence_logprobs
from jaxpref.metrics.ches import ches_scores, quantile_window
from jaxpref.metrics.correlation import average_ranks, spearman
from jaxpref.metrics.displacement import max_drop, riser_predictor, token_risers
from jaxpref.models.llama2c import EOS_ID, Llama2cTokenizer, load_llama2c
from jaxpref.training.optim import make_optimizer

CLAIM = ("DPO can lower the likelihood of the preferred response (likelihood displacement) even for a single "
         "preferred token, and preferences whose responses are more similar (higher CHES) displace more, so "
         "CHES-ranked subsets order the displacement.")
FIRST_MERGED_ID = 3 + 256  # llama2.c vocab: <unk>, BOS, EOS, 256 byte-fallback pieces, then merged pieces
SCORES = ("thm1", "ches", "ln_ches", "token_ches", "gradient_ches", "cosine")
PRIMARY_SCORE = "thm1"
SE_MARGIN = 2.0  # a mean counts as positive when mean - SE_MARGIN * sd / sqrt(n_seeds) > 0

DEFAULT_PROMPTS = (
    "Once upon a time,", "Once upon a time, there", "Tom had", "Tom had a little dog", "Max liked",
    "Lily and her mom went to", "They saw", "Lily wanted", "One day, Lily went to the", "One", "Mom said,",
    "They played together all",
)
DEFAULT_STORIES = (
    "Lily and her mom went to the park. They saw a big red ball. Lily wanted to play with it. She ran to the "
    "ball and kicked it. The ball went up in the sky. Lily laughed and clapped her hands.",
    "Tom had a little dog named Max. Max liked to run and jump. One day, Tom and Max went to the store to buy "
    "some food. Tom was very happy. He gave Max a big bone.",
    "Once upon a time, there was a little bird. The bird lived in a tall tree. Every morning it sang a song. "
    "One day, a girl named Sue heard the song. She smiled and sang with the bird.",
    "Ben wanted to build a big tower. He found many blocks in his room. He put one block on top of another. "
    "The tower was very tall. Then his cat jumped on it and the tower fell down.",
)


@dataclasses.dataclass(frozen=True)
class RazinParams:
    """Settings of :func:`run` (YAML ``params``); see the module docstring for what each part does.

    Attributes:
      model_dir: folder with ``stories260K.bin`` and ``tok512.bin``; empty = ``$JAXPREF_SHARED_DATA`` (or
        ``../shared/data`` next to the repository) ``/models/llama2c_stories260K``.
      prompts: single-token prompts; ``y⁺`` is each one's most likely next (merged-piece) token.
      prompts_per_seed: prompts drawn per seed; negatives_per_prompt: ``y⁻`` strata per prompt.
      max_prompt_tokens: padded prompt length (BOS included) of both parts.
      steps, lr: single-token DPO steps and RMSProp learning rate.
      beta: DPO β; rmsprop_decay, rmsprop_eps: RMSProp α and ε (torch's defaults used by the paper).
      riser_steps: steps at which the top ``top_risers`` probability risers are reported (paper: 5, 25, 100).
      score_groups: groups of single-token runs by primary-score quantile (ordering check).
      stories: texts whose sentence word-prefixes are the §5 prompts.
      pool_size, response_tokens: §5 pairs per seed and sampled continuation length.
      quantiles, subset_size: §5 CHES windows; subset_steps, subset_lr: their DPO runs.
    """

    model_dir: str = ""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    prompts_per_seed: int = 4
    negatives_per_prompt: int = 12
    max_prompt_tokens: int = 10
    steps: int = 100
    lr: float = 3e-6
    beta: float = 0.1
    rmsprop_decay: float = 0.99
    rmsprop_eps: float = 1e-8
    riser_steps: tuple[int, ...] = (5, 25, 100)
    top_risers: int = 3
    score_groups: int = 4
    stories: tuple[str, ...] = DEFAULT_STORIES
    pool_size: int = 96
    response_tokens: int = 4
    quantiles: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    subset_size: int = 16
    subset_steps: int = 50
    subset_lr: float = 3e-6

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> RazinParams:
        """Builds the record from YAML ``params``; unknown keys and bad values raise ``ValueError``."""
        p = params_from_dict(cls, params, "razin_single_token")
        if p.prompts_per_seed > len(p.prompts):
            raise ValueError(f"params.prompts_per_seed={p.prompts_per_seed} exceeds the {len(p.prompts)} prompts")
        if any(s > p.steps or s < 1 for s in p.riser_steps):
            raise ValueError(f"params.riser_steps {p.riser_steps} must lie in [1, steps={p.steps}]")
        if p.subset_size > p.pool_size:
            raise ValueError(f"params.subset_size={p.subset_size} exceeds params.pool_size={p.pool_size}")
        return p

    def optim(self, lr: float) -> OptimConfig:
        return OptimConfig(name="rmsprop", lr=lr, b2=self.rmsprop_decay, eps=self.rmsprop_eps, clip_norm=None)


# ----------------------------------------------------------------------------- model, prompts, pairs


def resolve_model_dir(model_dir: str = "") -> pathlib.Path:
    """The stories260K folder (see :class:`RazinParams`); raises ``FileNotFoundError`` naming what is missing."""
    if model_dir:
        path = pathlib.Path(model_dir).expanduser()
    else:
        repo = pathlib.Path(__file__).resolve().parents[2]
        shared = pathlib.Path(os.environ.get("JAXPREF_SHARED_DATA", repo.parent / "shared" / "data"))
        path = shared / "models" / "llama2c_stories260K"
    missing = [n for n in ("stories260K.bin", "tok512.bin") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"params.model_dir: {path} lacks {missing} (the llama2.c stories260K files)")
    return path


def candidate_tokens(vocab_size: int) -> np.ndarray:
    """``[C]`` ids of the merged pieces (after ``<unk>``, BOS, EOS and the 256 byte-fallback pieces, whose
    unembeddings stories260K never trained: they are near-identical vectors)."""
    return np.arange(FIRST_MERGED_ID, vocab_size)


def encode_padded(tok: Llama2cTokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``ids [N, length]`` (BOS first, pad 0) and ``lengths [N]``; a too-long text raises."""
    ids, lengths = np.zeros((len(texts), length), np.int32), np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        row = tok.encode(text)
        if len(row) > length:
            raise ValueError(f"prompt {text!r} has {len(row)} tokens > params.max_prompt_tokens={length}")
        ids[i, :len(row)], lengths[i] = row, len(row)
    return ids, lengths


def stratified_draw(similarity: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random index from each of ``n`` equal strata of ``similarity [C]`` sorted ascending.

    Returns ``(indices [n], strata [n])``; stratum ``n − 1`` holds the most similar items, 0 the least.
    """
    if not 1 <= n <= len(similarity):
        raise ValueError(f"cannot draw {n} strata from {len(similarity)} candidates")
    order = np.argsort(similarity, kind="stable")
    picks = [int(rng.choice(block)) for block in np.array_split(order, n)]
    return np.asarray(picks), np.arange(n)


def _next_token_logps(graphdef, params, ids: jax.Array, lengths: jax.Array) -> jax.Array:
    """``[N, V]`` log π(·|prompt) at each row's last prompt position (``ids [N, T]`` right-padded)."""
    model = nnx.merge(graphdef, params)
    hidden = model(ids).hidden
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return jax.nn.log_softmax(model.logits(last)[:, 0], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(graphdef, params, prompt: jax.Array, length: jax.Array) -> dict[str, jax.Array]:
    """For one right-padded ``prompt [T]`` of ``length`` tokens: ``y_pos`` (the most likely merged-piece
    token), ``logp [V]`` the next-token log-probs and the ``[V]`` score of every token as ``y⁻`` (:data:`SCORES`)."""
    model = nnx.merge(graphdef, params)
    f = lambda p: _next_token_logps(graphdef, p, prompt[None], length[None])[0]
    logp = f(params)
    y_pos = jnp.argmax(jnp.where(jnp.arange(logp.shape[0]) >= FIRST_MERGED_ID, logp, -jnp.inf))
    w, layout = model.unembedding()
    w_vd = (w.T if layout == "dv" else w).astype(jnp.float32)
    w_pos, w_bar = w_vd[y_pos], jnp.exp(logp) @ w_vd  # W⁺, E_π[W]
    out = {"y_pos": y_pos, "logp": logp, "token_ches": w_vd @ w_pos - w_pos @ w_pos,
           "thm1": -((w_pos - w_bar)[None] * (w_pos[None] - w_vd)).sum(-1),
           "cosine": (w_vd @ w_pos) / (jnp.linalg.norm(w_vd, axis=-1) * jnp.linalg.norm(w_pos) + 1e-12)}
    # CHES (Def. 2/3) on prompt + z + EOS with z and EOS as targets (the paper's per-example convention).
    vocab, t = w_vd.shape[0], prompt.shape[0] + 2
    pos = jnp.arange(t)[None]
    seq = jnp.broadcast_to(jnp.pad(prompt, (0, 2)), (vocab, t))
    seq = jnp.where(pos == length, jnp.arange(vocab)[:, None], jnp.where(pos == length + 1, EOS_ID, seq))
    mask = ((pos >= length) & (pos <= length + 1)).astype(jnp.int32)
    sums, counts = masked_hidden_sums(model(seq).hidden, jnp.broadcast_to(mask, seq.shape))
    ches = ches_scores(jnp.broadcast_to(sums[y_pos], sums.shape), sums, jnp.broadcast_to(counts[y_pos], counts.shape),
                       counts)
    out["ches"], out["ln_ches"] = ches.ches, ches.ln_ches
    # ⟨g⁺, g_z⟩ for every z at once: the jvp of log π(·|x) along g⁺ = ∇ log π(y⁺|x).
    kernel = jax.jvp(f, (params,), (jax.grad(lambda p: f(p)[y_pos])(params),))[1]
    out["gradient_ches"] = kernel - kernel[y_pos]
    return out


def single_token_scores(model, prompt_ids: np.ndarray, length: int) -> tuple[int, dict[str, np.ndarray]]:
    """``(y⁺, {name: [V]})``: the prompt's most likely merged-piece token and, for every token as ``y⁻``, each
    :data:`SCORES` predictor (plus ``logp``, the next-token log-probs)."""
    graphdef, params = nnx.split(model, nnx.Param)
    out = jax.device_get(_token_scores(graphdef, params, jnp.asarray(prompt_ids), jnp.asarray(length)))
    return int(out.pop("y_pos")), out


# ----------------------------------------------------------------------------- DPO trajectories


def make_dpo_program(graphdef, steps: int, beta: float, optim: OptimConfig):
    """A jitted ``fn(params, chosen, chosen_mask, rejected, rejected_mask, probe) -> dict`` training G models.

    Inputs are ``[G, K, T]`` token ids / target masks (right padding) and ``probe [G, K]`` positions; group g
    trains its own copy of ``params`` on its K pairs with full-batch DPO for ``steps`` RMSProp steps
    (reference = ``params``). Returns, with ``S = steps + 1`` records (before every step and at the end):
    ``loss [G, S]``, ``chosen`` / ``rejected [G, S, K]`` summed response log-probs and ``probe [G, S, K, V]``
    the next-token log-probs at the probe position of the chosen sequence.
    """
    tx, _ = make_optimizer(optim, steps)
    dpo = losses.get("sigmoid")
    hp = losses.make_hparams("sigmoid", beta=beta)

    def evaluate(params, ids, mask, probe):
        model = nnx.merge(graphdef, params)
        hidden = model(ids).hidden
        w, layout = model.unembedding()
        lp = sequence_logprobs(hidden, w, ids, mask, layout=layout).sums
        h_probe = jnp.take_along_axis(hidden, probe[:, None, None], axis=1)
        return lp, jax.nn.log_softmax(model.logits(h_probe)[:, 0], axis=-1)

    def one_group(params0, chosen, chosen_mask, rejected, rejected_mask, probe):
        k = chosen.shape[0]
        ids, mask = jnp.concatenate([chosen, rejected]), jnp.concatenate([chosen_mask, rejected_mask])
        probes = jnp.concatenate([probe, probe])

        def loss_fn(params, ref):
            lp, probe_lp = evaluate(params, ids, mask, probes)
            inputs = losses.LossInputs(lp[:k], lp[k:], ref[0], ref[1])
            return losses.reduce_term(dpo(inputs, hp)), (lp[:k], lp[k:], probe_lp[:k])

        lp0, _ = evaluate(params0, ids, mask, probes)
        ref = (lp0[:k], lp0[k:])

        def step(carry, _):
            params, opt = carry
            (value, rec), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ref)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), (value, *rec)

        (params, _), (loss, c, r, p) = jax.lax.scan(step, (params0, tx.init(params0)), length=steps)
        last_loss, (c1, r1, p1) = loss_fn(params, ref)
        cat = lambda xs, x: jnp.concatenate([xs, x[None]])
        return {"loss": cat(loss, last_loss), "chosen": cat(c, c1), "rejected": cat(r, r1), "probe": cat(p, p1)}

    return jax.jit(jax.vmap(one_group, in_axes=(None, 0, 0, 0, 0, 0)))


def _monotone(loss: np.ndarray) -> np.ndarray:
    """``[G]`` the loss fell (or stayed) at every step (``loss [G, S]``; float32 slack 1e-7)."""
    return np.all(np.diff(loss, axis=-1) <= 1e-7, axis=-1)


# ----------------------------------------------------------------------------- part 1: single tokens


def single_token_seed(model, tok: Llama2cTokenizer, p: RazinParams, seed: int, program) -> dict[str, Any]:
    """One seed of the single-token experiment: prompt / pair draws, DPO runs, per-run and seed numbers."""
    rng = np.random.default_rng(seed)
    prompts = [p.prompts[i] for i in rng.choice(len(p.prompts), p.prompts_per_seed, replace=False)]
    ids, lengths = encode_padded(tok, prompts, p.max_prompt_tokens)
    cands = candidate_tokens(model.config.vocab_size)
    runs, seqs = [], []
    for i, prompt in enumerate(prompts):
        y_pos, sc = single_token_scores(model, ids[i], int(lengths[i]))
        sc = {k: v[cands] for k, v in sc.items()}
        others = np.flatnonzero(cands != y_pos)
        picks, strata = stratified_draw(sc["cosine"][others], p.negatives_per_prompt, rng)
        for c, stratum in zip(others[picks], strata, strict=True):
            runs.append({"prompt": prompt, "y_pos": y_pos, "y_neg": int(cands[c]), "stratum": int(stratum),
                         "y_pos_text": tok.pieces[y_pos].decode(errors="replace"),
                         "y_neg_text": tok.pieces[int(cands[c])].decode(errors="replace"),
                         **{k: float(sc[k][c]) for k in SCORES}})
            seqs.append((ids[i], int(lengths[i]), y_pos, int(cands[c])))
    g, t = len(seqs), p.max_prompt_tokens + 1
    chosen, rejected, mask = (np.zeros((g, 1, t), np.int32) for _ in range(3))
    probe = np.zeros((g, 1), np.int32)
    for j, (row, n, yp, yn) in enumerate(seqs):
        chosen[j, 0, :n], rejected[j, 0, :n] = row[:n], row[:n]
        chosen[j, 0, n], rejected[j, 0, n], mask[j, 0, n], probe[j, 0] = yp, yn, 1, n - 1
    out = jax.device_get(program(nnx.state(model, nnx.Param), chosen, mask, rejected, mask, probe))
    lp_pos, lp_neg = out["chosen"][:, :, 0], out["rejected"][:, :, 0]  # [G, S]
    probs = np.exp(out["probe"][:, :, 0])  # [G, S, V]
    drops = jax.device_get(max_drop(np.exp(lp_pos)))
    mono = _monotone(out["loss"])
    w, layout = model.unembedding()
    for j, run in enumerate(runs):
        run.update(monotone=bool(mono[j]), p_pos_init=float(np.exp(lp_pos[j, 0])),
                   p_neg_init=float(np.exp(lp_neg[j, 0])), d_logp_pos=float(lp_pos[j, -1] - lp_pos[j, 0]),
                   d_logp_neg=float(lp_neg[j, -1] - lp_neg[j, 0]), loss_final=float(out["loss"][j, -1]),
                   max_drop=float(drops.drop[j]), drop_from=float(np.exp(lp_pos[j, drops.start[j]])),
                   drop_to=float(np.exp(lp_pos[j, drops.end[j]])), p_pos_trajectory=np.exp(lp_pos[j]).tolist())
        risers = {}
        for s in p.riser_steps:
            idx, inc = jax.device_get(token_risers(probs[j, 0], probs[j, s], k=p.top_risers))
            risers[str(s)] = [[tok.pieces[int(i)].decode(errors="replace"), float(v)] for i, v in zip(idx, inc)]
        run["risers"] = risers
        pred = np.asarray(riser_predictor(w, run["y_pos"], run["y_neg"], layout=layout))
        change = out["probe"][j, -1, 0] - out["probe"][j, 0, 0]
        z = cands[(cands != run["y_pos"]) & (cands != run["y_neg"])]
        run["riser_rho"] = spearman(pred[z], change[z])
    return {"seed": seed, "prompts": prompts, "runs": runs, **_single_token_stats(runs, p.score_groups)}


def _single_token_stats(runs: list[dict], n_groups: int) -> dict[str, Any]:
    """Seed-level numbers over the loss-monotone runs."""
    kept = [r for r in runs if r["monotone"]]
    disp = np.asarray([-r["d_logp_pos"] for r in kept])
    prompts = sorted({r["prompt"] for r in kept})
    stats: dict[str, Any] = {"n_runs": len(runs), "n_monotone": len(kept)}
    if not kept:
        return stats
    top = max(r["stratum"] for r in runs)
    by_stratum = lambda s: [-r["d_logp_pos"] for r in kept if r["stratum"] == s]
    primary = np.asarray([r[PRIMARY_SCORE] for r in kept])
    groups = np.array_split(np.argsort(primary, kind="stable"), min(n_groups, len(kept)))
    group_disp = [float(disp[gi].mean()) for gi in groups]
    stats.update(
        frac_displaced=float(np.mean(disp > 0)), mean_d_logp_pos=float(-disp.mean()),
        mean_max_drop=float(np.mean([r["max_drop"] for r in kept])),
        largest_drop=float(max(r["max_drop"] for r in kept)),
        similar_minus_dissimilar=float(np.mean(by_stratum(top)) - np.mean(by_stratum(0)))
        if by_stratum(top) and by_stratum(0) else float("nan"),
        rho={k: spearman([r[k] for r in kept], disp) for k in SCORES},
        rho_within_prompt={k: float(np.nanmean([_within(kept, prompt, k) for prompt in prompts])) for k in SCORES},
        group_displacement=group_disp, group_rho=spearman(np.arange(len(groups)), group_disp),
        riser_rho=float(np.nanmean([r["riser_rho"] for r in kept])))
    return stats


def _within(runs: list[dict], prompt: str, key: str) -> float:
    """Spearman ρ of ``key`` vs displacement over the runs of one prompt."""
    mine = [r for r in runs if r["prompt"] == prompt]
    return spearman([r[key] for r in mine], [-r["d_logp_pos"] for r in mine])


# ----------------------------------------------------------------------------- part 2: CHES subsets


def story_prompts(stories: tuple[str, ...]) -> list[str]:
    """Every word prefix (≥ 2 words) of every sentence of ``stories``."""
    prompts = []
    for story in stories:
        for sentence in re.split(r"(?<=[.!?])\s+", story.strip()):
            words = sentence.split()
            prompts += [" ".join(words[:n]) for n in range(2, len(words))]
    return prompts


def subsets_seed(model, tok: Llama2cTokenizer, p: RazinParams, seed: int, program) -> dict[str, Any]:
    """One seed of §5: sample the pool, score CHES, train one model per CHES quantile window."""
    rng = np.random.default_rng(10_000 + seed)
    pool = [q for q in story_prompts(p.stories) if len(tok.encode(q)) <= p.max_prompt_tokens]
    picks = rng.choice(len(pool), 2 * p.pool_size, replace=len(pool) < 2 * p.pool_size)
    prompts = [tok.encode(pool[i]) for i in picks]
    ids, mask = left_pad(prompts + prompts, length=p.max_prompt_tokens)
    gen = generate(model, ids, mask, key=jax.random.key(seed),
                   config=SamplingConfig(max_new_tokens=p.response_tokens, temperature=1.0))
    completions = np.asarray(gen.completion)
    a, b = completions[:len(prompts)], completions[len(prompts):]
    keep = [i for i in range(len(prompts)) if not np.array_equal(a[i], b[i])][:p.pool_size]
    if len(keep) < p.pool_size:
        raise RuntimeError(f"only {len(keep)} of {p.pool_size} sampled pairs have distinct responses")
    flip = rng.random(len(keep)) < 0.5
    t, r = p.max_prompt_tokens + p.response_tokens, p.response_tokens
    seqs, masks = np.zeros((2, len(keep), t), np.int32), np.zeros((2, len(keep), t), np.int32)
    for j, i in enumerate(keep):
        n = len(prompts[i])
        for side, resp in enumerate((b[i], a[i]) if flip[j] else (a[i], b[i])):
            seqs[side, j, :n], seqs[side, j, n:n + r], masks[side, j, n:n + r] = prompts[i], resp, 1
    h = model(jnp.asarray(seqs.reshape(-1, t))).hidden
    sums, counts = masked_hidden_sums(h, jnp.asarray(masks.reshape(-1, t)))
    m = len(keep)
    ches = np.asarray(ches_scores(sums[:m], sums[m:], counts[:m], counts[m:]).ches)
    windows = np.stack([np.asarray(quantile_window(jnp.asarray(ches), q, p.subset_size)) for q in p.quantiles])
    probe = np.asarray([[len(prompts[keep[i]]) - 1 for i in w] for w in windows], np.int32)
    out = jax.device_get(program(nnx.state(model, nnx.Param), seqs[0][windows], masks[0][windows],
                                 seqs[1][windows], masks[1][windows], probe))
    change = out["chosen"][:, -1] - out["chosen"][:, 0]  # [Q, K]
    disp = -change.mean(-1)
    return {"seed": seed, "pool_ches_quantiles": np.quantile(ches, p.quantiles).tolist(),
            "subset_mean_ches": [float(ches[w].mean()) for w in windows],
            "subset_d_logp_pos": (-disp).tolist(),
            "subset_d_logp_neg": (out["rejected"][:, -1] - out["rejected"][:, 0]).mean(-1).tolist(),
            "subset_monotone": _monotone(out["loss"]).tolist(), "subset_loss_final": out["loss"][:, -1].tolist(),
            "subset_rho": spearman(np.arange(len(windows)), disp),
            "top_minus_bottom": float(disp[-1] - disp[0]),
            "example_pairs": [{"ches": float(ches[i]), "prompt": tok.decode(prompts[keep[i]]),
                               "chosen": tok.decode(seqs[0, i][masks[0, i] == 1]),
                               "rejected": tok.decode(seqs[1, i][masks[1, i] == 1])}
                              for i in (windows[0][0], windows[-1][-1])]}


# ----------------------------------------------------------------------------- run


def _positive(values: list[float]) -> tuple[float, float, bool]:
    """``(mean, sd, mean − SE_MARGIN·sd/√n > 0)`` over seeds (NaNs dropped)."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), False
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return float(v.mean()), sd, bool(v.mean() - SE_MARGIN * sd / np.sqrt(len(v)) > 0)


def run(params: dict, seeds: list[int], out_dir: pathlib.Path, progress: bool = True) -> dict:
    """Runs both parts for every seed; writes ``results.json`` and three PNGs; returns the summary."""
    p = RazinParams.from_dict(params)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(p.model_dir)
    model = load_llama2c(model_dir / "stories260K.bin")
    tok = Llama2cTokenizer.from_file(model_dir / "tok512.bin")
    graphdef = nnx.graphdef(model)
    single_prog = make_dpo_program(graphdef, p.steps, p.beta, p.optim(p.lr))
    subset_prog = make_dpo_program(graphdef, p.subset_steps, p.beta, p.optim(p.subset_lr))
    single, subsets = [], []
    for seed in seeds:
        t0 = time.perf_counter()
        single.append(single_token_seed(model, tok, p, seed, single_prog))
        subsets.append(subsets_seed(model, tok, p, seed, subset_prog))
        if progress:
            s, b = single[-1], subsets[-1]
            print(f"[razin] seed {seed}: {s['n_monotone']}/{s['n_runs']} monotone runs, displaced "
                  f"{s.get('frac_displaced', float('nan')):.2f}, rho({PRIMARY_SCORE}) "
                  f"{s.get('rho', {}).get(PRIMARY_SCORE, float('nan')):.2f}; subset rho {b['subset_rho']:.2f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

    seeds_displaced = [s.get("frac_displaced", 0.0) > 0 for s in single]
    rho_mean, rho_sd, rho_ok = _positive([s.get("rho", {}).get(PRIMARY_SCORE, np.nan) for s in single])
    sub_mean, sub_sd, sub_ok = _positive([b["subset_rho"] for b in subsets])
    tb_mean, tb_sd, tb_ok = _positive([b["top_minus_bottom"] for b in subsets])
    agg = lambda key: float(np.nanmean([s.get(key, np.nan) for s in single]))
    numbers = {
        "single_frac_displaced": agg("frac_displaced"), "single_mean_max_drop": agg("mean_max_drop"),
        "single_largest_drop": float(np.nanmax([s.get("largest_drop", np.nan) for s in single])),
        "single_monotone_runs": int(sum(s["n_monotone"] for s in single)),
        "single_runs": int(sum(s["n_runs"] for s in single)),
        "single_similar_minus_dissimilar": agg("similar_minus_dissimilar"),
        **{f"single_rho_{k}": float(np.nanmean([s.get("rho", {}).get(k, np.nan) for s in single])) for k in SCORES},
        **{f"single_rho_within_prompt_{k}": float(np.nanmean([s.get("rho_within_prompt", {}).get(k, np.nan)
                                                              for s in single])) for k in SCORES},
        "single_rho_primary_sd": rho_sd, "single_group_rho": agg("group_rho"), "single_riser_rho": agg("riser_rho"),
        "subset_rho_mean": sub_mean, "subset_rho_sd": sub_sd,
        "subset_d_logp_pos_by_quantile": np.mean([b["subset_d_logp_pos"] for b in subsets], axis=0).tolist(),
        "subset_d_logp_neg_by_quantile": np.mean([b["subset_d_logp_neg"] for b in subsets], axis=0).tolist(),
        "subset_frac_displaced": float(np.mean([np.asarray(b["subset_d_logp_pos"]) < 0 for b in subsets])),
        "subset_perfect_order_frac": float(np.mean([b["subset_rho"] >= 1 - 1e-9 for b in subsets])),
        "subset_top_minus_bottom_mean": tb_mean, "subset_top_minus_bottom_sd": tb_sd,
    }
    checks = {"displacement_every_seed": bool(all(seeds_displaced)), "single_rho_positive": rho_ok,
              "subset_rho_positive": sub_ok, "subset_top_above_bottom": tb_ok}
    numbers.update({f"check_{k}": v for k, v in checks.items()})
    criterion = (f"all of: (1) every seed has a loss-monotone single-token run whose log pi(y+) fell; (2) the "
                 f"per-seed Spearman rho between the Thm-1 score ({PRIMARY_SCORE}) and -dlog pi(y+) is positive "
                 f"(mean - {SE_MARGIN} SE > 0 over seeds); (3) the same for the per-seed rho between CHES "
                 f"quantile and the subsets' mean displacement -dlog pi(y+); (4) and for (displacement of the top-CHES "
                 f"subset - that of the bottom one). Relative order only: whether subsets lose log pi(y+) in "
                 f"absolute terms is reported as subset_frac_displaced")
    results = {"claim": CLAIM, "criterion": criterion, "checks": checks, "numbers": numbers, "seeds": list(seeds),
               "params": dataclasses.asdict(p), "model_dir": str(model_dir), "single_token": single,
               "subsets": subsets, "deviations": DEVIATIONS}
    write_results(out_dir / "results.json", results)
    _plot(single, subsets, p, out_dir)
    return {"claim": CLAIM, "reproduced": bool(all(checks.values())), "criterion": criterion, "numbers": numbers}


DEVIATIONS = [
    "stories260K (260K parameters) instead of OLMo-1B / Gemma-2B / Llama-3-8B; no SFT phase (y+ is already the "
    "model's confident next token)",
    "learning rates 1e-7 (paper) -> params.lr / params.subset_lr: 1e-7 barely moves a 260K model",
    "story prompts and model-sampled responses with coin-flip labels instead of Persona and UltraFeedback",
    "optax RMSProp adds eps inside the square root (torch adds it outside); eps = 1e-8 either way",
]



def _plot(single: list[dict], subsets: list[dict], p: RazinParams, out_dir: pathlib.Path) -> None:
    plt = pyplot()
    cmap = plt.get_cmap("coolwarm")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    kept = [r for s in single for r in s["runs"] if r["monotone"]]
    rank = average_ranks([r[PRIMARY_SCORE] for r in kept]) - 1
    for r, k in zip(kept, rank, strict=True):
        axes[0].plot(np.asarray(r["p_pos_trajectory"]) / r["p_pos_init"], color=cmap(k / max(len(kept) - 1, 1)),
                     alpha=0.5, lw=0.8)
    axes[0].set(xlabel="DPO step", ylabel="pi(y+) / pi_init(y+)",
                title=f"single-token runs (red = high {PRIMARY_SCORE} score)")
    for s in single:
        kept = [r for r in s["runs"] if r["monotone"]]
        axes[1].scatter([r[PRIMARY_SCORE] for r in kept], [r["d_logp_pos"] for r in kept], s=10,
                        label=f"seed {s['seed']}: rho {s.get('rho', {}).get(PRIMARY_SCORE, np.nan):.2f}")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel=f"{PRIMARY_SCORE} score (Thm 1)", ylabel="change of log pi(y+)", title="displacement vs score")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "single_token.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(SCORES), figsize=(3 * len(SCORES), 3), sharey=True)
    for ax, key in zip(axes, SCORES, strict=True):
        for s in single:
            kept = [r for r in s["runs"] if r["monotone"]]
            ax.scatter([r[key] for r in kept], [-r["d_logp_pos"] for r in kept], s=6)
        rho = np.nanmean([s.get("rho", {}).get(key, np.nan) for s in single])
        ax.set(xlabel=key, title=f"mean rho {rho:.2f}")
    axes[0].set_ylabel("-change of log pi(y+)")
    fig.tight_layout()
    fig.savefig(out_dir / "single_token_scores.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for b in subsets:
        ax.plot(p.quantiles, b["subset_d_logp_pos"], marker="o", alpha=0.6,
                label=f"seed {b['seed']}: rho {b['subset_rho']:.2f}")
    ax.plot(p.quantiles, np.mean([b["subset_d_logp_pos"] for b in subsets], axis=0), color="k", lw=2, label="mean")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="CHES quantile of the subset", ylabel="mean change of log pi(y+)",
           title="Razin Fig. 2 analogue (stories260K)")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "ches_subsets.png", dpi=120)
    plt.close(fig)
