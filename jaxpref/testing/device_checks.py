"""Numerical checks that need an accelerator: shared by ``tests/test_gpu.py`` and ``bench/accelerator_suite.py``.

Each check computes something on JAX's default device and compares it with an independent CPU float32
computation (``jax.devices("cpu")``, always present), with a bound derived from the computation
(:mod:`jaxpref.testing.tolerances`). It returns a JSON-able dict with ``passed`` and the numbers behind it,
so the suite can record every check (a failed one does not stop the others) and the tests can assert.
On a CPU-only machine the "device" is the CPU itself: the checks still run (the suite's ``--dry-run``),
and they compare two CPU programs.

* :func:`logprob_check`: summed response log-probs of padded pairs, float32 or bfloat16 compute.
* :func:`dpo_step_check`: one DPO (sigmoid, live reference) SGD step: loss, log-probs, gradient norm and the
  updated parameters.
* :func:`attention_checks`: every attention backend this platform has, against the dense ``xla`` math in
  float32, values and gradients, for padded, windowed and packed masks.

float32 device programs run under ``jax.default_matmul_precision("highest")``: GPUs otherwise use TF32
(10 mantissa bits) for float32 matmuls, which is a different computation, not a rounding difference.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import losses
from jaxpref.config import OptimConfig
from jaxpref.data import TokenizedPairs, TokenizeStats, pair_batch
from jaxpref.models import presets
from jaxpref.models.attention import MaskSpec, select, xla
from jaxpref.models.transformer import segment_positions
from jaxpref.testing.models import random_model
from jaxpref.testing.tolerances import (
    U32,
    U_BF16,
    assert_same_sgd_step,
    dpo_step_bounds,
    low_precision_stages,
    token_logp_tol,
)
from jaxpref.training import optim
from jaxpref.training import step as S

U_TF32 = 2.0 ** -11  # TF32 keeps 10 stored mantissa bits: unit roundoff 2^-11
CHUNKS = {"seq_chunk": 32, "vocab_chunk": 256}
BETA = 0.5


def check_config(dtype: str = "float32"):
    """The model of the numerical checks: Llama, GQA 4/2, 2 layers, V = 512 (random init)."""
    return presets.tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                              head_dim=16, max_position_embeddings=256, dtype=dtype)


def synthetic_pairs(n: int, *, vocab: int, max_prompt: int, max_response: int, seed: int = 0) -> TokenizedPairs:
    """Random token pairs (ids >= 3) with prompt / response lengths drawn in ``[1, max]``."""
    rng = np.random.default_rng(seed)

    def ids(hi):
        return rng.integers(3, vocab, int(rng.integers(1, hi + 1))).astype(np.int32)

    prompt, chosen, rejected = ([ids(m) for _ in range(n)] for m in (max_prompt, max_response, max_response))
    return TokenizedPairs(prompt=prompt, chosen=chosen, rejected=rejected, row=np.arange(n, dtype=np.int64),
                          ids=[f"p{i}" for i in range(n)], votes=np.ones(n, np.float32), tie=np.zeros(n, bool),
                          pad_id=0, stats=TokenizeStats(n_input=n, n_kept=n))


def cpu() -> jax.Device:
    return jax.devices("cpu")[0]


def _precision(dtype: str):
    return jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()


def _on_cpu(tree):
    return jax.device_put(tree, cpu())


def _batch(n_pairs: int = 4, seq_len: int = 64):
    pairs = synthetic_pairs(n_pairs, vocab=512, max_prompt=24, max_response=seq_len - 24, seed=1)
    return pair_batch(pairs, list(range(n_pairs)), seq_len=seq_len)


@functools.cache
def _split_cached(dtype: str, seed: int):
    """``(graphdef, params, rest)`` of the check model (built once per dtype and seed)."""
    return S.split_model(random_model(check_config(dtype), seed=seed))


@functools.cache
def _programs(dtype: str):
    """Jitted ``(logps, logps_and_hidden, dpo_step)`` of the check model in ``dtype`` (compiled once per run)."""
    graphdef, _, rest = _split_cached(dtype, 0)
    logps = jax.jit(lambda p, b: S.pair_logps(graphdef, p, rest, b, **CHUNKS)[0])
    with_hidden = jax.jit(lambda p, b: _logps_and_hidden(graphdef, p, rest, b))
    dpo = jax.jit(lambda p, q, b: _dpo_step(graphdef, rest, p, q, b))
    return logps, with_hidden, dpo


def _logps_and_hidden(graphdef, params, rest, batch):
    sums = S.pair_logps(graphdef, params, rest, batch, **CHUNKS)[0]
    from flax import nnx

    model = nnx.merge(graphdef, params, rest)
    b, two, t = batch.input_ids.shape
    flat = lambda x: x.reshape(b * two, t)  # noqa: E731
    hidden = model(flat(batch.input_ids), positions=flat(batch.positions), segment_ids=flat(batch.segment_ids),
                   right_padded=True).hidden
    return sums, hidden.astype(jnp.float32), model.unembedding()[0]


def _cpu_reference(seed: int, batch):
    """CPU float32 ``(sums [B, 2], final hidden [2B, T, D], unembedding)`` of the check model."""
    p32 = _split_cached("float32", seed)[1]
    with jax.default_device(cpu()):
        out = _programs("float32")[1](_on_cpu(p32), _on_cpu(batch))
    return tuple(np.asarray(x, np.float64) for x in out)


def sum_bounds(dtype: str, batch, want, hidden, unembedding) -> np.ndarray:
    """``[B, 2]`` bounds on ``|device - CPU float32|`` of each summed response log-prob (see :func:`logprob_check`)."""
    t = batch.input_ids.shape[-1]
    mask = np.asarray(batch.loss_mask, np.float64)[..., 1:].reshape(-1, t - 1)
    if dtype == "float32":
        tok = token_logp_tol(check_config(), t, np.abs(want).max())
        return float(tok) * mask.sum(-1).reshape(want.shape)
    h = hidden[:, :-1]
    w_dv = unembedding if unembedding.shape[0] == h.shape[-1] else unembedding.T
    s = low_precision_stages(check_config())
    dz = (s * U_BF16 * np.linalg.norm(h, axis=-1, keepdims=True) * np.linalg.norm(w_dv, axis=0)
          + 2 * U_BF16 * (np.abs(h) @ np.abs(w_dv)))  # [N, T-1, V]
    return (2 * dz.max(-1) * mask).sum(-1).reshape(want.shape)


def logprob_check(dtype: str = "float32") -> dict:
    """Summed response log-probs ``[B, 2]`` on the device (``dtype`` compute) vs CPU float32.

    Bounds per sequence (sums over its response tokens):

    * float32: two float32 programs, :func:`~jaxpref.testing.tolerances.token_logp_tol` per token;
    * bfloat16: the final hidden state is within ``s·u·‖h‖`` of float32 (``s`` =
      :func:`~jaxpref.testing.tolerances.low_precision_stages`, ``u = 2⁻⁸``), so each logit moves by at most
      ``s·u·‖h‖·‖W_v‖`` plus the bf16 rounding of the matmul's inputs ``2u·(|h|·|W|)_v``, and a log-softmax
      entry by at most twice the largest logit change.
    """
    batch = _batch()
    params = _split_cached(dtype, 0)[1]
    with _precision(dtype):
        got = _programs(dtype)[0](params, batch)
    want, hidden, w = _cpu_reference(0, batch)
    bound = sum_bounds(dtype, batch, want, hidden, w)
    err = np.abs(np.asarray(got, np.float64) - want)
    return {"check": f"logprobs_{dtype}", "passed": bool(np.all(err <= bound)), "max_abs_err": float(err.max()),
            "min_bound": float(bound.min()), "max_err_over_bound": float((err / bound).max()),
            "mean_abs_logp": float(np.abs(want).mean())}


def _dpo_step(graphdef, rest, params, ref_params, batch):
    opt = optim.make_optimizer(OptimConfig(name="sgd", lr=1.0, clip_norm=None), 10)[0]
    step = S.make_preference_step(graphdef, rest, opt, losses.compose([{"name": "sigmoid", "beta": BETA}]),
                                  **CHUNKS)
    new, metrics = step(S.init_state(params, opt, 0), ref_params, batch, None)
    return new.params, metrics


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def dpo_step_check(dtype: str = "float32") -> dict:
    """One sigmoid-DPO SGD step (lr 1, live reference that differs from the policy) on the device vs CPU float32.

    float32: the metrics and the updated parameters within
    :func:`~jaxpref.testing.tolerances.dpo_step_bounds` (the worst-case rounding bound of two float32
    programs of the same step). bfloat16: each pair's margin ``β(Δπ - Δref)`` moves by at most ``β`` times the
    four log-prob bounds of :func:`sum_bounds` (policy and reference), ``softplus`` is 1-Lipschitz, so the
    batch-mean loss moves by at most the mean of those; the update's cosine with the float32 one is reported.
    """
    batch = _batch()
    params, ref_params = _split_cached(dtype, 0)[1], _split_cached(dtype, 1)[1]
    p32, ref32 = _split_cached("float32", 0)[1], _split_cached("float32", 1)[1]
    with _precision(dtype):
        got_params, got = _programs(dtype)[2](params, ref_params, batch)
    got_params, got = jax.device_get((got_params, got))
    with jax.default_device(cpu()):
        want_params, want = jax.device_get(_programs("float32")[2](_on_cpu(p32), _on_cpu(ref32), _on_cpu(batch)))
        out = {"check": f"dpo_step_{dtype}", "loss": float(got["loss"]), "loss_cpu_f32": float(want["loss"]),
               "grad_norm": float(got["grad_norm"]), "grad_norm_cpu_f32": float(want["grad_norm"])}
        if dtype == "float32":
            logps = _programs("float32")[0]
            jac = jax.tree.leaves(jax.jit(jax.jacrev(logps))(_on_cpu(p32), _on_cpu(batch)))
            rows = np.linalg.norm(np.concatenate([np.asarray(x).reshape(*batch.example_mask.shape, 2, -1)
                                                  for x in jac], -1), axis=-1)
            ref_abs = float(np.abs(np.asarray(logps(_on_cpu(ref32), _on_cpu(batch)))).mean(0).sum())
        if dtype == "float32":
            bounds = dpo_step_bounds(check_config(), batch.input_ids.shape[-1], want, row_grad_norms=rows,
                                     reference_abs=ref_abs, beta=BETA)
            try:
                assert_same_sgd_step(got_params, got, want_params, want, bounds, lr=1.0)
                out["passed"] = True
            except AssertionError as e:
                out.update(passed=False, error=str(e))
            out["loss_bound"] = bounds["loss"]
            return out
    policy = sum_bounds(dtype, batch, *_cpu_reference(0, batch))
    reference = sum_bounds(dtype, batch, *_cpu_reference(1, batch))
    loss_bound = float((BETA * (policy + reference).sum(-1)).mean())
    d_got = _flat(got_params) - _flat(params)
    d_want = _flat(want_params) - _flat(p32)
    cosine = float(d_got @ d_want / (np.linalg.norm(d_got) * np.linalg.norm(d_want)))
    out.update(passed=bool(abs(out["loss"] - out["loss_cpu_f32"]) <= loss_bound and np.isfinite(d_got).all()),
               loss_bound=loss_bound, update_cosine_vs_f32=cosine)
    return out


# ------------------------------------------------------------------------------------ attention


def attention_cases(seq_len: int) -> dict[str, MaskSpec]:
    """Masks of two ``seq_len`` rows: right-padded causal (the padded training layout), the same with a
    window of ``seq_len / 4``, and packed segments with padding (the packed layout)."""
    t = seq_len
    padded = np.ones((2, t), np.int32)
    padded[1, (5 * t) // 8:] = 0
    packed = np.zeros((2, t), np.int32)
    packed[0] = np.repeat([1, 2, 3, 0], [t // 4, t // 3, t - t // 4 - t // 3 - 7, 7])
    packed[1, : t // 2], packed[1, t // 2: t - 3] = 4, 5

    def spec(seg, **flags):
        seg = jnp.asarray(seg)
        return MaskSpec.self_attention(seg, segment_positions(seg), **flags)

    return {"padded": spec(padded, right_padded=True),
            "padded_window": spec(padded, right_padded=True, sliding_window=max(t // 4, 1)),
            "packed": spec(packed)}


def _attention_vjp(fn, q, k, v, w, spec):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, spec, scale=q.shape[-1] ** -0.5), q, k, v)
    return (out, *vjp(w))


def attention_checks(seq_len: int = 1024, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                     backends: tuple[str, ...] | None = None, cases: tuple[str, ...] | None = None,
                     dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict]:
    """Every attention backend of this platform vs the dense ``xla`` math in float32 ("highest" precision),
    values and gradients w.r.t. q, k, v, on the :func:`attention_cases` masks, in float32 and bfloat16.

    Bounds (as ``tests/test_attention.py``): float32, a reordered length-S reduction per output,
    ``2·S·u·max|ref|`` with ``u = 2⁻²⁴``, or TF32's ``u = 2⁻¹¹`` for the kernels (Triton / cuDNN may round
    float32 matmul inputs to TF32); bfloat16 (inputs rounded to bf16 first, reference in float32 on those
    inputs): outputs within ``u·(max|v| + max|out|)`` (probabilities and output rounded once), gradients
    norm-wise within ``4u`` (two more roundings: dS and the accumulators' cast). A backend that cannot serve a
    case says why (``unsupported``) and is skipped for it.
    """
    on = select.platform()
    names = backends or ("xla", "blocked", *(k for k, m in select.KERNELS.items() if on in m.PLATFORMS))
    rng = np.random.default_rng(0)
    shape_q, shape_kv = (2, seq_len, heads, head_dim), (2, seq_len, kv_heads, head_dim)
    q, k, v, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_q, shape_kv, shape_kv, shape_q))
    results = []
    for case, spec in attention_cases(seq_len).items():
        if cases is not None and case not in cases:
            continue
        for dtype in dtypes:
            inputs = [x.astype(dtype) for x in (q, k, v, w)]
            with jax.default_matmul_precision("highest"):
                ref = jax.jit(lambda *a: _attention_vjp(xla.attend, *a))(
                    *(x.astype(jnp.float32) for x in inputs), spec)
            ref = [np.asarray(x, np.float64) for x in ref]
            for name in names:
                row = {"check": f"attention_{name}_{case}_{dtype}", "backend": name, "case": case, "dtype": dtype,
                       "seq_len": seq_len}
                module = select.KERNELS.get(name)
                reason = module.unsupported(spec, jnp.dtype(dtype), head_dim) if module else None
                if reason is not None:
                    results.append({**row, "passed": None, "unsupported": reason})
                    continue
                fn = select.IMPLEMENTATIONS[name]
                try:
                    with _precision(dtype):
                        got = jax.jit(lambda *a, fn=fn: _attention_vjp(fn, *a))(*inputs, spec)
                    got = [np.asarray(x.astype(jnp.float32), np.float64) for x in got]
                except Exception as e:  # a kernel that fails to compile or run is a failed check, not a crash
                    results.append({**row, "passed": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    continue
                results.append({**row, **_compare(got, ref, dtype, seq_len, kernel=module is not None,
                                                  vmax=float(jnp.abs(inputs[2].astype(jnp.float32)).max()))})
    return results


def _compare(got, ref, dtype: str, n: int, *, kernel: bool, vmax: float) -> dict:
    errs = {}
    ok = True
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        if not np.isfinite(g).all():
            return {"passed": False, "error": f"{name} not finite"}
        if dtype == "float32":
            bound = 2 * n * (U_TF32 if kernel else U32) * np.abs(r).max()
            err = float(np.abs(g - r).max())
        elif name == "out":
            bound, err = U_BF16 * (vmax + np.abs(r).max()), float(np.abs(g - r).max())
        else:
            bound, err = 4 * U_BF16, float(np.linalg.norm(g - r) / np.linalg.norm(r))
        errs[name] = {"err": err, "bound": float(bound)}
        ok &= err <= bound
    return {"passed": bool(ok), "errors": errs}
