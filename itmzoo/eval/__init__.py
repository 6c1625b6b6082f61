"""Evaluation: block-wise similarity, two-stage re-ranking, recall metrics, protocols and ensembles.

Evaluating a model imports nothing of `itmzoo.train`.
"""

from .options import EvalOptions, eval_options
from .protocols import (
    PROTOCOLS,
    FoldRanks,
    direction_matrices,
    ensemble_similarity,
    evaluate,
    evaluate_ensemble,
    fold_ranks,
    metrics_from_sims,
    protocol_folds,
)
from .recall import METRIC_KEYS, DirectionalScores, rank_metrics, recall_metrics, retrieval_ranks
from .report import chance_metrics, format_metrics
from .similarity import encode_split, similarity_matrix

__all__ = [
    "METRIC_KEYS",
    "PROTOCOLS",
    "DirectionalScores",
    "EvalOptions",
    "FoldRanks",
    "chance_metrics",
    "direction_matrices",
    "encode_split",
    "ensemble_similarity",
    "eval_options",
    "evaluate",
    "evaluate_ensemble",
    "fold_ranks",
    "format_metrics",
    "metrics_from_sims",
    "protocol_folds",
    "rank_metrics",
    "recall_metrics",
    "retrieval_ranks",
    "similarity_matrix",
]
