"""Toy pairwise judges for tests and smoke runs of ``eval.win_rate`` (``--judge jaxpref.testing.judges:NAME``).

Every judge takes ``(prompts, responses_a, responses_b)`` and returns ``[N]`` P(a ≻ b).
"""

from __future__ import annotations

import numpy as np


def length_judge(prompts, responses_a, responses_b) -> np.ndarray:
    """Prefers the longer response: ``σ((len(a) − len(b)) / 10)`` in characters (0.5 on equal lengths)."""
    diff = np.array([len(a) - len(b) for a, b in zip(responses_a, responses_b, strict=True)], np.float64)
    return 1.0 / (1.0 + np.exp(-diff / 10.0))


def first_judge(prompts, responses_a, responses_b) -> np.ndarray:
    """Always prefers the response shown first (P = 1): a pure position bias, for swap tests."""
    return np.ones(len(responses_a))


def tie_judge(prompts, responses_a, responses_b) -> np.ndarray:
    """Every comparison is a tie (P = 0.5)."""
    return np.full(len(responses_a), 0.5)
