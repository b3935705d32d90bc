"""Vanilla weight averaging, the identity alignment (``merge=average``), and the fusion weights every merge takes
(OT fusion, Singh & Jaggi 2020, Sec. 4: ``W_fused = sum_k w_k W_k^aligned``). Uniform weights give the same model
as :func:`mergelab.merging.soups.uniform_soup`; here it is one method of the merge engine, so it gets every
correction and depth (:mod:`mergelab.merging.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mergelab.merging.engine import identity_zip


def fusion_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` normalised to sum 1 (``None``: uniform); ValueError for a wrong length or non-positive sum."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fusion weights must be {count} non-negative numbers with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class Average:
    """``merge=average``: unit ``j`` of every model merges with unit ``j`` of the others (no alignment)."""

    name: str = "average"

    features = None  # reads weights only
    num_samples = None

    @property
    def label(self) -> str:
        return self.name

    def match(self, graph, models, stats, anchor):
        return {group: identity_zip(n, len(models)) for group, n in graph.groups.items()}
