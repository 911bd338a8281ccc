"""Float tolerances derived from the computation, for tests that compare two float evaluations.

A test that compares two evaluations of the same mathematics (micro-batched vs full batch, packed vs
padded, sharded vs single device, chunked vs dense) may only fail when the *mathematics* differs, never
because a CPU summed in another order. Every tolerance here is a worst-case rounding bound, so a test
that uses one passes on any IEEE machine whenever the two programs compute the same function.

The model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed. 2002):

* one rounding: ``fl(x op y) = (x op y)(1 + δ)``, ``|δ| <= u``; ``u = eps / 2`` (float32: ``u = 2⁻²⁴``,
  bfloat16: ``u = 2⁻⁸``).
* a sum of ``n`` terms in any order and blocking (eq. 4.4 and §4.2): ``|fl(Σ t) - Σ t| <= γ_{n-1} Σ|t|``
  with ``γ_k = k·u / (1 - k·u)``. Two evaluations in different orders are each within that of the exact
  value, so they differ by at most ``2·γ_{n-1}·Σ|t|`` (≈ ``(n-1)·eps·Σ|t|``; :func:`reduction_tol`).
* a chain of reductions (a sum of terms that are themselves computed sums, dot products, ...): to first
  order the relative errors add, so the chain behaves like one reduction whose length is the sum of the
  stage lengths (``γ_a + γ_b <= γ_{a+b}``, Higham Lemma 3.3). :func:`transformer_chain_length` counts the
  stages of one token's log-probability through a decoder forward pass.

What cancels is what matters: the bound is relative to ``Σ|t|``, not to ``|Σ t|``. Pass the terms
*before* they cancel (e.g. the ``A_i·ℓ_i`` of a score-function surrogate, not the surrogate).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2⁻²³: float32 spacing at 1; unit roundoff u = EPS32 / 2
EPS_BF16 = 2.0 ** -7  # bfloat16 spacing at 1 (7 stored mantissa bits); unit roundoff u = 2⁻⁸
U32 = EPS32 / 2
U_BF16 = EPS_BF16 / 2
U64 = float(np.finfo(np.float64).eps) / 2  # float64 unit roundoff 2⁻⁵³


def gamma(n: int, u: float = U32) -> float:
    """Higham's ``γ_n = n·u / (1 - n·u)``: relative error bound of ``n`` chained roundings."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n * u >= 0.5:
        raise ValueError(f"n·u = {n * u:.3g} >= 1/2: the first-order bound no longer holds (n={n}, u={u:.3g})")
    return n * u / (1.0 - n * u)


def reduction_tol(terms, n: int | None = None, u: float = U32) -> float:
    """Bound on ``|a - b|`` for two float evaluations of ``Σ terms`` (any order, blocking or split).

    ``2·γ_{n-1}·Σ|t|`` (module docstring). ``n`` is the length of the rounding chain behind the sum:
    ``len(terms)`` for plain addends; larger when each term carries its own upstream roundings (add the
    chain length of one term, e.g. :func:`transformer_chain_length`).
    """
    t = np.abs(np.asarray(terms, np.float64)).ravel()
    n = t.size if n is None else n
    return 2.0 * gamma(max(n - 1, 0), u) * float(t.sum())


def mean_tol(terms, n: int | None = None, u: float = U32) -> float:
    """:func:`reduction_tol` of ``mean(terms)``: the bound of the sum, divided by the count."""
    t = np.asarray(terms, np.float64).ravel()
    return reduction_tol(t, (t.size if n is None else n) + 1, u) / max(t.size, 1)  # +1: the division


def relative_tol(n: int, u: float = U32) -> float:
    """``2·γ_n``: relative bound between two evaluations of an ``n``-rounding chain whose terms all have one
    sign (so ``Σ|t| = |Σ t|``), e.g. a sum of log-probabilities, or an elementwise closed form of ``n`` ops."""
    return 2.0 * gamma(n, u)


def transformer_chain_length(config, seq_len: int, *, backward: bool = False, tokens: int = 0) -> int:
    """Number of roundings, summed over the reductions, behind one token's log-probability.

    Per layer: the two norms (mean of squares over D), the Q/K/V projections (D), the attention scores
    (hd), the softmax normaliser and the weighted sum of values (T each), the output projection (H·hd),
    the MLP input (D) and output (I) projections, and the residual adds (2). Then the final norm (D), the
    unembedding (D), the log-sum-exp over the vocabulary (V) and the difference ``z_y - lse`` (1).
    ``backward=True`` adds the transposed chain (same lengths) plus the weight-gradient reduction over the
    ``tokens`` rows of a batch (``dW = Σ_rows hᵀ·δ``), the sum that micro-batching splits.
    """
    d, hd, h = config.hidden_size, config.head_dim, config.num_heads
    per_layer = 2 * d + d + hd + 2 * seq_len + h * hd + d + config.intermediate_size + 2
    forward = config.num_layers * per_layer + d + d + config.vocab_size + 1
    return 2 * forward + tokens if backward else forward


def low_precision_stages(config) -> int:
    """Number of roundings to the compute dtype along one token's path to the final hidden state.

    With ``dtype=bfloat16`` each op rounds its output (and each float32 weight is rounded when cast):
    the embedding (1); per layer, attention: norm output and scale (2), Q/K/V weights and outputs (6), RoPE
    on Q and K (2), scores, softmax, weighted values (3), output weight and projection (2), residual add (1);
    MLP: norm (2), gate/up weights and outputs (4; 2 without a gate), activation and product (2), down weight
    and output (2), residual add (1); then the final norm (2). To first order with unit-gain propagation
    (the RMS norms keep the residual stream's scale), the final hidden state's relative norm-wise error is
    at most this count times ``u``.
    """
    mlp = 2 + (4 if config.traits.gated_mlp else 2) + 2 + 2 + 1
    attention = 2 + 6 + 2 + 3 + 2 + 1
    return 1 + config.num_layers * (attention + mlp) + 2


def dpo_step_bounds(config, seq_len: int, metrics, *, row_grad_norms, reference_abs, beta: float,
                    sft_weight: float = 0.0, sft_tokens: float = 1.0) -> dict[str, float]:
    """Worst-case bounds on ``|a − b|`` for two programs computing the same DPO-sigmoid (+ weighted SFT) step
    in different layouts (micro-batches, packing, meshes, a precomputed reference).

    Each row's log-prob sum ℓ (all its terms negative) is within ``ρ·|ℓ|`` between the programs, with
    ``ρ = 2γ_{chain + B}`` (:func:`transformer_chain_length` of the longest row, then the batch mean). The
    margin ``h = (ℓ_c − r_c) − (ℓ_r − r_r)`` is then within ``ρ·(|ℓ_c| + |r_c| + |ℓ_r| + |r_r|)``, the loss
    ``mean softplus(−βh)`` within ``β·mean δh`` (``σ <= 1``), the SFT term (a ratio of same-sign sums) within
    ``ρ`` relative. The gradient ``Σ_rows (∂L/∂ℓ_row)·∇ℓ_row`` is within
    ``2γ_{backward chain}·Σ_rows |∂L/∂ℓ_row|·‖∇ℓ_row‖`` plus its coefficients' error ``β²/4·δh/B·‖∇ℓ_row‖``,
    with ``|∂L/∂ℓ| <= β/B`` (sigmoid) ``+ w_sft/Σn_chosen`` (chosen rows).

    Args:
      metrics: the step's metrics (``logps/chosen``, ``logps/rejected``, ``loss/sigmoid``, ``grad_norm``,
        ``loss/sft`` when ``sft_weight``): magnitudes only.
      row_grad_norms: ``[B, 2]`` ‖∇θ ℓ‖ of each chosen / rejected row (valid pairs only).
      reference_abs: mean |r_c| + mean |r_r| (the reference log-probs' magnitude).
      sft_tokens: Σ chosen tokens of the batch (the SFT denominator).

    Returns:
      bounds for the metrics named above plus ``loss``, ``rewards/margins``, ``gradient`` (a norm-wise bound
      on the gradient difference) and ``grad_norm``.
    """
    b = row_grad_norms.shape[0]
    rho = relative_tol(transformer_chain_length(config, seq_len) + b)
    lc, lr = abs(float(metrics["logps/chosen"])), abs(float(metrics["logps/rejected"]))
    d_h = rho * (lc + lr + reference_abs)  # the batch mean of δh
    out = {"logps/chosen": rho * lc, "logps/rejected": rho * lr, "rewards/margins": beta * d_h,
           "loss/sigmoid": beta * d_h + relative_tol(b + 3) * abs(float(metrics["loss/sigmoid"]))}
    out["loss"] = out["loss/sigmoid"]
    coef = np.full((b, 2), beta / b + beta * beta / 4 * d_h / b)
    if sft_weight:
        out["loss/sft"] = rho * abs(float(metrics["loss/sft"]))
        out["loss"] += sft_weight * out["loss/sft"]
        coef[:, 0] += sft_weight / sft_tokens
    g_chain = transformer_chain_length(config, seq_len, backward=True, tokens=2 * b * seq_len)
    out["gradient"] = relative_tol(g_chain) * float((coef * row_grad_norms).sum())
    out["grad_norm"] = out["gradient"] + relative_tol(config.num_params()) * abs(float(metrics["grad_norm"]))
    return out


def assert_same_sgd_step(params_a, metrics_a, params_b, metrics_b, bounds: dict[str, float], lr: float) -> None:
    """Every metric in ``bounds`` within its bound, and the parameters after ``p − lr·g`` within
    ``lr·bounds['gradient']`` plus one rounding of each parameter (norm-wise)."""
    for key, bound in bounds.items():
        if key != "gradient":
            a, b = float(metrics_a[key]), float(metrics_b[key])
            assert abs(a - b) <= bound, f"{key}: {a} vs {b}, |diff| {abs(a - b):.3g} > bound {bound:.3g}"
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in _leaves(tree)])
    pa, pb = flat(params_a), flat(params_b)
    diff, bound = np.linalg.norm(pa - pb), lr * bounds["gradient"] + relative_tol(1) * np.linalg.norm(pa)
    assert diff <= bound, f"parameters: ‖diff‖ {diff:.3g} > bound {bound:.3g}"


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def dpo_ln2_tol(config, seq_len: int, logps_chosen: float, logps_rejected: float, *, beta: float,
                n_pairs: int) -> float:
    """Bound on ``|loss − ln 2|`` for a DPO-sigmoid step whose policy equals its reference (step 0).

    The policy's and the reference's forward passes are two programs (or two parts of one) over the same
    weights: each row's ℓ is within ``ρ·|ℓ|`` (:func:`dpo_step_bounds`), so the margin ``β·h`` is within
    ``β·ρ·2(|ℓ_c| + |ℓ_r|)`` of 0, and ``softplus(−βh)`` moves by at most half of that (slope 1/2 at 0), plus
    the rounding of ``softplus(0) = ln 2`` and of the batch mean (``2γ_{B+3}·ln 2``). ``logps_*``: the batch
    means of the chosen / rejected log-prob sums.
    """
    rho = relative_tol(transformer_chain_length(config, seq_len) + n_pairs)
    return 0.5 * beta * rho * 2 * (abs(logps_chosen) + abs(logps_rejected)) + relative_tol(n_pairs + 3) * np.log(2)


def log_softmax_tols(hidden, w_dv, input_ids, loss_mask) -> tuple[np.ndarray, np.ndarray]:
    """Bounds for two float32 evaluations of ``log softmax(h·W)[next token]`` (any chunking or layout).

    Per target token: the logits ``z_v = Σ_d h_d W_dv`` are within ``2γ_D·A_v`` (``A = |h|·|W|``); ``z_y − lse``
    moves by at most ``δz_y + max_v δz_v`` (lse is 1-Lipschitz in the max-norm); the max shift, exp, the
    V-term sum of positive terms, log and the subtraction add ``2γ_{V+4}·(|z_y| + |lse| + 1)``.

    Returns:
      ``([N, T] per-token bounds (0 where not a target, position 0 included), [N] bounds of the masked sums)``
      (the sum of T one-signed terms adds ``2γ_T·Σ|lp|``).
    """
    h = np.asarray(hidden, np.float64)
    w = np.asarray(w_dv, np.float64)
    ids = np.asarray(input_ids)
    mask = np.asarray(loss_mask, np.float64)[:, 1:]
    d, v = w.shape
    z = h[:, :-1] @ w  # [N, T-1, V]
    a = np.abs(h[:, :-1]) @ np.abs(w)
    top = z.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[..., 0]
    tgt = ids[:, 1:, None]
    z_y, a_y = np.take_along_axis(z, tgt, -1)[..., 0], np.take_along_axis(a, tgt, -1)[..., 0]
    tok = (2 * gamma(d) * (a_y + a.max(-1)) + 2 * gamma(v + 4) * (np.abs(z_y) + np.abs(lse) + 1.0)) * mask
    sums = tok.sum(-1) + 2 * gamma(ids.shape[1]) * (np.abs(z_y - lse) * mask).sum(-1)
    return np.concatenate([np.zeros_like(tok[:, :1]), tok], 1), sums


def hidden_state_tol(config, seq_len: int) -> float:
    """Relative norm-wise bound ``‖h_a − h_b‖ <= this·‖h‖`` for one token's final hidden state computed by two
    float32 programs (batching, packing, a KV cache): 2γ of :func:`transformer_chain_length` without the
    unembedding and log-softmax stages (first order; the RMS / layer norms keep the residual scale)."""
    return relative_tol(transformer_chain_length(config, seq_len) - config.vocab_size - config.hidden_size - 1)


def logits_tol(config, seq_len: int, hidden, w_dv) -> np.ndarray:
    """``[..., V]`` bounds on two float32 programs' logits ``h·W`` of the same tokens: the hidden state's
    (:func:`hidden_state_tol`, by Cauchy-Schwarz ``‖δh‖·‖W_v‖``) plus the dot product's ``2γ_D·(|h|·|W|)_v``."""
    h = np.asarray(hidden, np.float64)
    w = np.asarray(w_dv, np.float64)
    norm_h = np.linalg.norm(h, axis=-1, keepdims=True)
    return (hidden_state_tol(config, seq_len) * norm_h * np.linalg.norm(w, axis=0)
            + 2 * gamma(w.shape[0]) * (np.abs(h) @ np.abs(w)))


def token_logp_tol(config, seq_len: int, logps) -> np.ndarray:
    """Bounds for one token's log-prob through the model, computed by two float32 programs (a KV cache vs a
    full forward, a batch vs one row): ``2γ_chain·(|lp| + ln V + 1)``, where ``|lp| + ln V + 1`` bounds the
    cancelling terms ``|z_y| + |lse|`` of a log-softmax when the logits are small next to ``ln V`` (random
    test models near initialisation; pass a larger magnitude for trained or confident models)."""
    lp = np.abs(np.asarray(logps, np.float64))
    return relative_tol(transformer_chain_length(config, seq_len)) * (lp + np.log(config.vocab_size) + 1.0)


def log_softmax_tol(vocab_size: int, logps) -> np.ndarray:
    """Bounds for two float32 log-softmaxes of the *same* logits: the V-term sum of ``exp(z − max)`` is within
    ``2γ_{V+3}`` relative (shift, exp, sum), which ``log`` turns into an absolute error; the final
    subtraction adds ``2u·(|z_y| + |lse|)``, bounded by ``2u·(|lp| + 2 ln V)`` for small logits."""
    lp = np.abs(np.asarray(logps, np.float64))
    return 2 * gamma(vocab_size + 3) + 2 * U32 * (lp + 2 * np.log(vocab_size))
