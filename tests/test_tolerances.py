"""jaxpref.testing.tolerances: the rounding bounds hold for real float32 reassociations, and refuse n·u >= 1/2."""

from __future__ import annotations

import numpy as np
import pytest

from jaxpref.models import presets
from jaxpref.testing import tolerances as T


def _sums(terms: np.ndarray) -> list[float]:
    """float32 sums of the same terms in five orders / blockings."""
    t = terms.astype(np.float32)
    left = np.float32(0)
    for x in t:
        left = np.float32(left + x)
    right = np.float32(0)
    for x in t[::-1]:
        right = np.float32(right + x)
    blocked = np.float32(sum(np.float32(b.sum(dtype=np.float32)) for b in np.array_split(t, 7)))
    order = np.random.default_rng(0).permutation(len(t))
    return [float(left), float(right), float(t.sum(dtype=np.float32)), float(blocked),
            float(np.cumsum(t[order], dtype=np.float32)[-1])]


@pytest.mark.parametrize("seed", range(5))
def test_reduction_tol_covers_float32_reorderings_with_cancellation(seed):
    rng = np.random.default_rng(seed)
    terms = rng.standard_normal(2000) * 10.0 ** rng.uniform(-3, 3, 2000)  # mixed signs and scales: cancellation
    exact = float(np.sum(np.asarray(terms, np.float32).astype(np.float64)))
    bound = T.reduction_tol(np.asarray(terms, np.float32))
    sums = _sums(terms)
    assert max(abs(s - exact) for s in sums) <= bound / 2  # each evaluation within γ_{n−1}Σ|t| of exact
    assert max(sums) - min(sums) <= bound
    assert max(sums) - min(sums) > 0  # the orders really differ, so the check is not vacuous


def test_gamma_refuses_where_the_first_order_bound_fails():
    assert T.gamma(10) == pytest.approx(10 * T.U32 / (1 - 10 * T.U32))
    assert T.relative_tol(8) == pytest.approx(2 * T.gamma(8))
    with pytest.raises(ValueError, match="n·u"):
        T.gamma(2**23)  # n·u = 1/2 in float32
    with pytest.raises(ValueError, match=">= 0"):
        T.gamma(-1)


def test_chain_lengths_and_ln2_bound_grow_with_the_model_and_the_log_probs():
    small, large = presets.tiny_llama(), presets.tiny_llama(num_layers=4)
    assert T.transformer_chain_length(large, 12) > T.transformer_chain_length(small, 12)
    assert T.transformer_chain_length(small, 24) > T.transformer_chain_length(small, 12)
    assert T.transformer_chain_length(small, 12, backward=True, tokens=96) == 2 * T.transformer_chain_length(
        small, 12) + 96
    a = T.dpo_ln2_tol(small, 12, -30.0, -30.0, beta=0.1, n_pairs=8)
    b = T.dpo_ln2_tol(small, 12, -60.0, -60.0, beta=0.1, n_pairs=8)
    assert 0 < a < b < 1e-2
