"""Offline evaluation: the protocol (scenarios, Experiment), metrics and reports."""

from .metrics import (
    catalogue_coverage,
    intra_list_diversity,
    mrr,
    mrr_from_scores,
    ndcg_at_k,
    popularity_percentile,
    recall_at_k,
    recall_curve,
)
from .protocol import Experiment, Results, Scenario, franchise_key, same_franchise, scenarios
from .report import write_report

__all__ = [
    "Experiment",
    "Results",
    "Scenario",
    "scenarios",
    "franchise_key",
    "same_franchise",
    "write_report",
    "recall_at_k",
    "recall_curve",
    "ndcg_at_k",
    "mrr",
    "mrr_from_scores",
    "catalogue_coverage",
    "popularity_percentile",
    "intra_list_diversity",
]
