"""Rank and linear correlation, the one implementation every evaluation and experiment uses.

Host-side NumPy / SciPy (not jitted): these summarise a few hundred per-example or per-run values after
the jitted metrics ran. Ranks are **average ranks** (``scipy.stats.rankdata(method="average")``): tied
values share the mean of the ranks they span, so the result does not depend on the input order. That
matters for Razin et al.'s normalised edit distance, whose values tie often.

Both correlations return NaN when fewer than 3 finite pairs are given (a correlation of 2 points is ±1
whatever the data) or when either side is constant (undefined).
"""

from __future__ import annotations

import numpy as np

MIN_POINTS = 3


def average_ranks(x) -> np.ndarray:
    """``[N]`` float64 ranks 1..N of ``x``, ties sharing their average rank (``scipy.stats.rankdata``)."""
    import scipy.stats  # here, not at import: jaxpref.metrics is imported by every training process

    return scipy.stats.rankdata(np.asarray(x, np.float64).reshape(-1), method="average")


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray] | None:
    x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"correlation of arrays of different lengths: {x.size} vs {y.size}")
    if x.size < MIN_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return x, y


def spearman(x, y) -> float:
    """Spearman ρ of two ``[N]`` sequences: Pearson correlation of their average ranks (``scipy.stats.spearmanr``).

    NaN for fewer than 3 values or a constant side.
    """
    xy = _pairs(x, y)
    import scipy.stats

    return float("nan") if xy is None else float(scipy.stats.spearmanr(*xy).statistic)


def pearson(x, y) -> float:
    """Pearson r of two ``[N]`` sequences (``scipy.stats.pearsonr``); NaN for fewer than 3 values or a constant side."""
    xy = _pairs(x, y)
    import scipy.stats

    return float("nan") if xy is None else float(scipy.stats.pearsonr(*xy).statistic)
