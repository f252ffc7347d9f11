"""Functional API over the core: scores, head redundancy, capacities and selection."""

from __future__ import annotations

from mixkv.ops._budget import POLICIES, capacities, capacities_into, capacity_bound
from mixkv.ops._capacities_select import capacities_select_into
from mixkv.ops._score import GQA_REDUCTIONS, METHODS, POOLINGS, ScoreResult, compute_scores, head_redundancy, scores
from mixkv.ops._select import select, select_into

__all__ = [
    "GQA_REDUCTIONS",
    "METHODS",
    "POLICIES",
    "POOLINGS",
    "ScoreResult",
    "capacities",
    "capacities_into",
    "capacities_select_into",
    "capacity_bound",
    "compute_scores",
    "head_redundancy",
    "scores",
    "select",
    "select_into",
]
