"""Metrics: jittable functions of per-example arrays.

* :mod:`~jaxpref.metrics.difficulty` -- flip threshold, reward accuracy, flip categories (Chen et al. 2024, §4);
* :mod:`~jaxpref.metrics.ranking` -- ranking accuracy R / R̃, ties rule, n > 2 exact match, idealized
  R* / R̃*, alignment gap (Chen et al. 2024, §2-3);
* :mod:`~jaxpref.metrics.ches` -- CHES / LN-CHES and baselines, subset selection (Razin et al. 2025);
* :mod:`~jaxpref.metrics.displacement` -- likelihood displacement, max drop, token risers (Razin et al. 2025);
* :mod:`~jaxpref.metrics.win_rate` -- (h-)win rate with a declared tie rule, position swaps, bootstrap CI;
* :mod:`~jaxpref.metrics.correlation` -- Spearman (average ranks) and Pearson, host-side, used everywhere.

Dataset-level values are returned as :class:`Tally` (sum and count) so batches add up on the host.
"""

from jaxpref.metrics.ches import (
    ChesScores,
    ches_scores,
    edit_distance,
    last_hidden_inner_product,
    lowest_fraction,
    lowest_k,
    normalized_edit_distance,
    normalized_edit_distances,
    quantile_window,
)
from jaxpref.metrics.correlation import average_ranks, pearson, spearman
from jaxpref.metrics.difficulty import (
    FLIP_CATEGORIES,
    Difficulty,
    FlipCategories,
    example_difficulty,
    flip_categories,
    flip_categories_from_logps,
    flip_threshold,
    reference_log_ratio,
    reward_accuracy,
)
from jaxpref.metrics.displacement import (
    Displacement,
    MaxDrop,
    displacement_stats,
    is_displaced,
    max_drop,
    riser_predictor,
    token_risers,
)
from jaxpref.metrics.ranking import (
    ALPHA_EPS,
    DEFAULT_BETAS,
    TIE_EPS,
    TIE_SCALES,
    RankingTallies,
    Tally,
    alignment_gap,
    alpha_logit,
    beta_summary,
    clip_alpha,
    competition_ranks,
    exact_match_ranking,
    idealized_correct,
    idealized_ranking_accuracy,
    length_normalized,
    ranking_accuracy,
    ranking_accuracy_with_ties,
    ranking_correct,
    tally,
    tie_correct,
    tie_rule_scores,
    tie_scale_scores,
    ties_rule_correct,
)
from jaxpref.metrics.win_rate import (
    H_FUNCTIONS,
    TIE_RULES,
    bootstrap_ci,
    h_transform,
    order_pair,
    position_swaps,
    unswap,
    verdict_values,
    win_rate,
)

__all__ = [
    # difficulty (Chen §4)
    "FLIP_CATEGORIES",
    "Difficulty",
    "FlipCategories",
    "example_difficulty",
    "flip_categories",
    "flip_categories_from_logps",
    "flip_threshold",
    "reference_log_ratio",
    "reward_accuracy",
    # ranking (Chen §2-3)
    "ALPHA_EPS", "DEFAULT_BETAS", "TIE_EPS", "TIE_SCALES", "RankingTallies", "Tally", "alignment_gap",
    "alpha_logit", "beta_summary", "clip_alpha", "competition_ranks", "exact_match_ranking", "idealized_correct",
    "idealized_ranking_accuracy", "length_normalized", "ranking_accuracy",
    "ranking_accuracy_with_ties", "ranking_correct", "tally", "tie_correct", "tie_rule_scores", "tie_scale_scores",
    "ties_rule_correct",
    # correlation (host-side, average ranks)
    "average_ranks", "pearson", "spearman",
    # CHES (Razin §5-6)
    "ChesScores", "ches_scores", "edit_distance", "last_hidden_inner_product", "lowest_fraction", "lowest_k",
    "normalized_edit_distance", "normalized_edit_distances", "quantile_window",
    # displacement (Razin)
    "Displacement", "MaxDrop", "displacement_stats", "is_displaced", "max_drop", "riser_predictor",
    "token_risers",
    # win rate
    "H_FUNCTIONS", "TIE_RULES", "bootstrap_ci", "h_transform", "order_pair", "position_swaps", "unswap",
    "verdict_values", "win_rate",
]
