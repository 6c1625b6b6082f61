"""Evaluation: block-wise similarity, recall metrics, protocols and ensembles."""

from .protocols import (PROTOCOLS, ensemble_similarity, evaluate, evaluate_ensemble, metrics_from_sims,
                        protocol_folds)
from .recall import METRIC_KEYS, rank_metrics, recall_metrics, retrieval_ranks
from .similarity import encode_split, similarity_matrix

__all__ = [
    "METRIC_KEYS",
    "PROTOCOLS",
    "encode_split",
    "ensemble_similarity",
    "evaluate",
    "evaluate_ensemble",
    "metrics_from_sims",
    "protocol_folds",
    "rank_metrics",
    "recall_metrics",
    "retrieval_ranks",
    "similarity_matrix",
]
