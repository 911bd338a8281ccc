"""Value and gradient parity of jaxpref's losses with TRL 1.16 ``DPOTrainer._compute_loss`` (float32, 1e-5).

TRL's loss is called standalone (env-notes §3): the private method runs unbound on a fake ``self`` whose
fake model returns the given per-sequence log-probs as per-token log-probs, with
``precompute_ref_logps=True`` so the reference log-probs come from the batch. The completion mask gives
each response its token count, which ``ipo`` / ``sigmoid_norm`` (unshifted mask) and ``sft`` (shifted
mask) read. Gradients are taken with respect to the policy chosen / rejected log-probs on both sides.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402

from jaxpref import losses  # noqa: E402
from jaxpref.testing.tolerances import U64, relative_tol  # noqa: E402

pytestmark = pytest.mark.torch

# Both libraries compute in float64 on float32-representable inputs (the comparison is about algebra): at most
# 32 rounding ops per value, on terms up to S = 4·max|log-prob| (≈ 300) times the largest scale a loss applies
# (1/β <= 10 for IPO): 2γ_32(u64)·S·10 ≈ 2e-11 (jaxpref.testing.tolerances).
TOL = dict(rtol=relative_tol(32, U64) * 3000, atol=relative_tol(32, U64) * 3000)


def alpha32_tols(arrays, beta, alpha):
    """TRL evaluates its alpha-divergence branch in float32 whatever the input dtype (``t.float()``; its clamp
    table has no float64 key), so those cases run in float32. Per pair, the scores ``(e^t − 1)/(α − 1)`` with
    ``t = (α − 1)·(π − π_ref)`` carry a relative error ``ρ = 2γ_4(u32)·(1 + |t|)`` of their ``e^t`` (the
    differences π − π_ref and the product round t, exp adds a few ulps); the chosen − rejected difference
    cancels, so its error is ``ρ·(e^{t_c} + e^{t_r})/|α − 1|``; the losses have slope <= β in it (a mean over
    pairs); the gradients ``∝ e^t`` carry ``ρ`` relative plus the slope's change (<= β²·δ/4 per pair)."""
    a = lambda k: np.asarray(arrays[k], np.float64)
    t_c = (alpha - 1.0) * (a("policy_chosen_logps") - a("reference_chosen_logps"))
    t_r = (alpha - 1.0) * (a("policy_rejected_logps") - a("reference_rejected_logps"))
    rho = relative_tol(4) * (1.0 + np.maximum(np.abs(t_c), np.abs(t_r)))
    delta = rho * (np.exp(np.minimum(t_c, 80)) + np.exp(np.minimum(t_r, 80))) / abs(alpha - 1.0)
    loss_tol = beta * float(delta.mean()) + relative_tol(len(delta) + 4)
    return dict(rtol=float(rho.max()), atol=loss_tol + beta * beta * float(delta.max()))
SEEDS = (0, 1, 2)
BATCH = 8  # one batch shape for (almost) every case: JAX's per-op eager caches are then reused

# (f_divergence, f_alpha) pairs exercised with every loss TRL applies the f-divergence to.
FDIVS = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.5),
    ("alpha_divergence", 1.0),  # TRL's reverse-KL fallback
]
FDIV_LOSSES = {  # TRL loss type -> (jaxpref name, extra jaxpref/TRL hparams variants)
    "sigmoid": [{}],
    "hinge": [{}],
    "ipo": [{}],
    "exo_pair": [{"label_smoothing": 1e-3}, {"label_smoothing": 0.2}],
    "robust": [{"label_smoothing": 0.0}, {"label_smoothing": 0.1}],
    "discopop": [{"tau": 0.05}, {"tau": 0.5}],
    "sigmoid_norm": [{}],
}
PLAIN_LOSSES = {
    "nca_pair": [{}],
    "bco_pair": [{}],
    "sppo_hard": [{}],
    "apo_zero": [{}],
    "apo_down": [{}],
    "aot": [{"label_smoothing": 0.0}, {"label_smoothing": 0.1}],
    "aot_unpaired": [{"label_smoothing": 0.0}, {"label_smoothing": 0.1}],
}


def _case_id(loss_type, beta, extra, fdiv=("reverse_kl", 0.5)):
    parts = [loss_type, f"b{beta}", *(f"{k}{v}" for k, v in extra.items())]
    if fdiv != ("reverse_kl", 0.5):
        parts.append(f"{fdiv[0]}{fdiv[1] if fdiv[0] == 'alpha_divergence' else ''}")
    return "-".join(parts)


CASES = []
for _lt, _variants in FDIV_LOSSES.items():
    for _k, _extra in enumerate(_variants):
        # Every f-divergence with the first hparam variant; the other variants with reverse KL.
        for _fdiv in FDIVS if _k == 0 else FDIVS[:1]:
            CASES.append(pytest.param(_lt, 0.1, _extra, _fdiv, id=_case_id(_lt, 0.1, _extra, _fdiv)))
        CASES.append(pytest.param(_lt, 0.5, _extra, FDIVS[0], id=_case_id(_lt, 0.5, _extra)))
for _lt, _variants in PLAIN_LOSSES.items():
    for _extra in _variants:
        for _beta in (0.1, 0.5):
            CASES.append(pytest.param(_lt, _beta, _extra, FDIVS[0], id=_case_id(_lt, _beta, _extra)))


# ----------------------------------------------------------------------------- harness


def trl_loss(
    arrays,
    loss_types,
    loss_weights,
    *,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence="reverse_kl",
    f_alpha=0.5,
    discopop_tau=0.05,
):
    """TRL 1.16 batch loss and its gradient w.r.t. the policy chosen / rejected log-probs (float32)."""
    pc = torch.tensor(arrays["policy_chosen_logps"], requires_grad=True)
    pr = torch.tensor(arrays["policy_rejected_logps"], requires_grad=True)
    lens = np.concatenate([arrays["chosen_tokens"], arrays["rejected_tokens"]]).astype(int)
    batch = pc.shape[0]
    seq = int(lens.max()) + 1
    per_tok = torch.zeros(2 * batch, seq - 1, dtype=pc.dtype)
    per_tok[:, 0] = torch.cat([pc, pr])  # the whole sequence log-prob on the first response token
    completion_mask = torch.zeros(2 * batch, seq, dtype=torch.long)
    for i, n in enumerate(lens):
        completion_mask[i, 1 : 1 + n] = 1
    out = SimpleNamespace(
        log_probs=per_tok,
        entropy=torch.zeros_like(per_tok),
        mean_logits=torch.zeros_like(per_tok),
        is_top1=torch.zeros_like(per_tok, dtype=torch.bool),
    )
    model = lambda **kw: out  # noqa: E731
    model.training = True
    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(
        model=model,
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type=f_divergence,
        f_alpha_divergence_coef=f_alpha,
        beta=beta,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights),
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * batch, seq, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(arrays["reference_chosen_logps"]),
        "ref_rejected_logps": torch.tensor(arrays["reference_rejected_logps"]),
    }
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    loss.backward()
    assert loss.dtype == pc.dtype
    return float(loss.detach()), pc.grad.numpy(), pr.grad.numpy()


def jax_loss(arrays, spec):
    """jaxpref batch loss of a composition spec and its gradient w.r.t. the policy log-probs (eager)."""
    comp = losses.compose(spec)

    def total(pc, pr, rest):
        # outputs -> sums -> total is exactly what comp(...)[0] computes, minus the metrics (faster eagerly).
        outputs = comp.outputs(losses.LossInputs(policy_chosen_logps=pc, policy_rejected_logps=pr, **rest))
        return comp.total_from_sums(comp.sums(outputs))

    fn = jax.value_and_grad(total, argnums=(0, 1))
    with jax.enable_x64(True):
        rest = {k: jnp.asarray(v) for k, v in arrays.items() if not k.startswith("policy_")}
        value, (g_c, g_r) = fn(
            jnp.asarray(arrays["policy_chosen_logps"]), jnp.asarray(arrays["policy_rejected_logps"]), rest
        )
        assert value.dtype == arrays["policy_chosen_logps"].dtype
        return np.asarray(value), np.asarray(g_c), np.asarray(g_r)


def make_arrays(seed, batch, dtype=np.float64):
    """Random float32 log-prob sums with unequal integer token counts (1..24)."""
    rng = np.random.default_rng(seed)
    n_c = rng.integers(1, 25, batch)
    n_r = rng.integers(1, 25, batch)
    pc = -n_c * rng.uniform(0.2, 2.5, batch)
    pr = -n_r * rng.uniform(0.2, 2.5, batch)
    arrays = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "reference_chosen_logps": pc + rng.normal(0.0, 3.0, batch),
        "reference_rejected_logps": pr + rng.normal(0.0, 3.0, batch),
        "chosen_tokens": n_c,
        "rejected_tokens": n_r,
    }
    # float32 values (what a model produces), held in float64 by default: both libraries then compute in
    # float64, so the comparison is about the algebra, not float32 round-off (see TOL)
    return {k: np.asarray(np.asarray(v, np.float32), dtype) for k, v in arrays.items()}


def assert_parity(trl_result, jax_result, tol=TOL):
    np.testing.assert_allclose(jax_result[0], trl_result[0], **tol)
    np.testing.assert_allclose(jax_result[1], trl_result[1], **tol)
    np.testing.assert_allclose(jax_result[2], trl_result[2], **tol)


# ----------------------------------------------------------------------------- tests


def _hparams(loss_type, beta, extra, fdiv):
    """(jaxpref spec entry, TRL keyword arguments) of one case."""
    f_divergence, f_alpha = fdiv
    hp = {"name": loss_type, "beta": beta, **extra}
    trl_kw = {
        "beta": beta,
        "label_smoothing": extra.get("label_smoothing", 0.0),
        "discopop_tau": extra.get("tau", 0.05),
    }
    if loss_type in FDIV_LOSSES:
        hp.update(f_divergence=f_divergence)
        if f_divergence == "alpha_divergence":
            hp.update(f_alpha=f_alpha)
        trl_kw.update(f_divergence=f_divergence, f_alpha=f_alpha)
    return hp, trl_kw


@pytest.mark.parametrize("loss_type,beta,extra,fdiv", CASES)
def test_loss_type_matches_trl(loss_type, beta, extra, fdiv):
    hp, trl_kw = _hparams(loss_type, beta, extra, fdiv)
    alpha32 = loss_type in FDIV_LOSSES and fdiv[0] == "alpha_divergence" and abs(fdiv[1] - 1.0) > 1e-6
    for seed in SEEDS:
        arrays = make_arrays(seed, BATCH, np.float32 if alpha32 else np.float64)
        expected = trl_loss(arrays, [loss_type], [1.0], **trl_kw)
        assert np.isfinite(expected[0])
        tol = alpha32_tols(arrays, beta, fdiv[1]) if alpha32 else TOL
        if loss_type == "exo_pair":  # TRL makes ε a float32 tensor: log ε and log(1 − ε) carry float32 rounding
            eps = extra["label_smoothing"]  # (ε's own and the log's: 2γ_2(u32) of |log ε| + |log(1 − ε)| + 1)
            const = relative_tol(2) * (abs(math.log(eps)) + abs(math.log1p(-eps)) + 1.0)
            tol = dict(rtol=TOL["rtol"], atol=TOL["atol"] + const)  # the loss is linear in both logs, weights <= 1
        assert_parity(expected, jax_loss(arrays, [hp]), tol)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "ipo", "sigmoid_norm"])
def test_single_pair_batch_matches_trl(loss_type):
    """B = 1: AOT's sort is trivial and the length normalisers see a single pair."""
    hp, trl_kw = _hparams(loss_type, 0.2, {}, FDIVS[0])
    for seed in SEEDS:
        arrays = make_arrays(seed, 1)
        assert_parity(trl_loss(arrays, [loss_type], [1.0], **trl_kw), jax_loss(arrays, [hp]))


@pytest.mark.parametrize("batch", (1, BATCH))
def test_sft_matches_trl_batch_token_mean(batch):
    for seed in SEEDS:
        arrays = make_arrays(seed, batch)
        assert_parity(trl_loss(arrays, ["sft"], [1.0]), jax_loss(arrays, ["sft"]))


@pytest.mark.parametrize(
    "loss_types,weights",
    [
        (["sigmoid", "sft"], [1.0, 0.3]),
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
        (["ipo", "hinge"], [0.5, 2.0]),
    ],
)
def test_weighted_combination_matches_trl(loss_types, weights):
    for seed in SEEDS:
        arrays = make_arrays(seed, BATCH)
        spec = [{"name": n, "weight": w, **({} if n == "sft" else {"beta": 0.2})} for n, w in zip(loss_types, weights)]
        assert_parity(trl_loss(arrays, loss_types, weights, beta=0.2), jax_loss(arrays, spec))


def test_rpo_batch_token_mean_is_trl_sigmoid_plus_sft():
    arrays = make_arrays(3, BATCH)
    expected = trl_loss(arrays, ["sigmoid", "sft"], [1.0, 0.2], beta=0.5)
    assert_parity(expected, jax_loss(arrays, losses.rpo(beta=0.5, eta=0.2, nll="batch_token_mean")))


def test_bco_pair_running_mean_zero_delta_matches_trl():
    """TRL 1.16 has no running moments (δ = 0): running_mean=True with bco_delta = 0 reproduces it."""
    arrays = make_arrays(4, BATCH)
    expected = trl_loss(arrays, ["bco_pair"], [1.0], beta=0.1)
    got = jax_loss({**arrays, "bco_delta": np.float32(0.0)}, [{"name": "bco_pair", "running_mean": True}])
    assert_parity(expected, got)


def test_ipo_is_trl_length_averaged_and_ipo_sum_is_not():
    """Pins which IPO is which: ``ipo`` = TRL (length-averaged), ``ipo_sum`` = papers (summed)."""
    arrays = make_arrays(5, BATCH)
    assert not np.array_equal(arrays["chosen_tokens"], np.ones(BATCH))
    expected = trl_loss(arrays, ["ipo"], [1.0], beta=0.1)
    assert_parity(expected, jax_loss(arrays, [{"name": "ipo", "beta": 0.1}]))
    summed = jax_loss(arrays, [{"name": "ipo_sum", "beta": 0.1}])
    assert abs(summed[0] - expected[0]) > 1e-2
    # With one token per response the two forms coincide.
    ones = {**arrays, "chosen_tokens": np.ones(BATCH, np.float32), "rejected_tokens": np.ones(BATCH, np.float32)}
    np.testing.assert_allclose(
        jax_loss(ones, [{"name": "ipo_sum", "beta": 0.1}])[0], trl_loss(ones, ["ipo"], [1.0], beta=0.1)[0], **TOL
    )


def test_harness_against_hand_formulas():
    """The harness itself: TRL sigmoid and sppo_hard equal hand-written float64 formulas."""
    arrays = make_arrays(6, BATCH)
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    u_w = a["policy_chosen_logps"] - a["reference_chosen_logps"]
    u_l = a["policy_rejected_logps"] - a["reference_rejected_logps"]
    beta = 0.1
    sigmoid = np.mean(np.log1p(np.exp(-beta * (u_w - u_l))))
    sppo = np.mean((u_w - 0.5 / beta) ** 2 + (u_l + 0.5 / beta) ** 2)
    np.testing.assert_allclose(trl_loss(arrays, ["sigmoid"], [1.0], beta=beta)[0], sigmoid, **TOL)
    np.testing.assert_allclose(trl_loss(arrays, ["sppo_hard"], [1.0], beta=beta)[0], sppo, **TOL)
    np.testing.assert_allclose(jax_loss(arrays, [{"name": "sigmoid", "beta": beta}])[0], sigmoid, **TOL)
    np.testing.assert_allclose(jax_loss(arrays, [{"name": "sppo_hard", "beta": beta}])[0], sppo, **TOL)
