"""Functional API over the core: scores, head redundancy, capacities and selection."""

from __future__ import annotations

from mixkv.ops._budget import POLICIES, capacities
from mixkv.ops._score import GQA_REDUCTIONS, METHODS, POOLINGS, head_redundancy, scores
from mixkv.ops._select import select

__all__ = [
    "GQA_REDUCTIONS",
    "METHODS",
    "POLICIES",
    "POOLINGS",
    "capacities",
    "head_redundancy",
    "scores",
    "select",
]
