"""Weighted average of state dicts: the last step of every "align, then average" method (vanilla averaging is the
identity alignment). Uniform weights give the same model as :func:`mergelab.merging.soups.uniform_soup`; this adds
per-model fusion weights (OT fusion, Singh & Jaggi 2020, Sec. 4: ``W_fused = sum_k w_k W_k^aligned``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def fusion_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` normalised to sum 1 (``None``: uniform); ValueError for a wrong length or non-positive sum."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fusion weights must be {count} non-negative numbers with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def weighted_average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """``sum_k w_k state_k`` over floating-point tensors, accumulated in float64 and cast back to each tensor's
    dtype; integer buffers (BatchNorm's ``num_batches_tracked``) come from the first state. ``weights`` are
    normalised to sum 1 (``None``: uniform)."""
    weights = fusion_weights(weights, len(states))
    first = states[0]
    keys = [k for k, v in first.items() if v.is_floating_point()]
    total = [torch.zeros_like(first[k], dtype=torch.float64) for k in keys]
    for state, weight in zip(states, weights):
        torch._foreach_add_(total, [state[k].double() for k in keys], alpha=weight)
    averaged = {k: t.to(first[k].dtype) for k, t in zip(keys, total)}
    return {k: averaged.get(k, v) for k, v in first.items()}


class Average:
    """``merge=average``: vanilla weight averaging, the identity alignment (the baseline of every fusion table)."""

    name = "average"
    alignment = None

    def align(self, graph, state_a: State, state_b: State, stats=None, a: int = 0, b: int = 1) -> State:
        return state_b
