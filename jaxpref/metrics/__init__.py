"""Metrics: jittable functions of per-example arrays (difficulty and flip analysis of Chen et al. 2024)."""

from jaxpref.metrics.difficulty import (
    FLIP_CATEGORIES,
    Difficulty,
    FlipCategories,
    example_difficulty,
    flip_categories,
    flip_categories_from_logps,
    flip_threshold,
    ranking_correct,
    reference_log_ratio,
    reward_accuracy,
)

__all__ = [
    "FLIP_CATEGORIES",
    "Difficulty",
    "FlipCategories",
    "example_difficulty",
    "flip_categories",
    "flip_categories_from_logps",
    "flip_threshold",
    "ranking_correct",
    "reference_log_ratio",
    "reward_accuracy",
]
