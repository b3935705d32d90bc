"""Permutation matching of one model onto another through their unit graph (Ainsworth et al. 2023, "Git Re-Basin").

- :func:`weight_matching`: Sec. 3.2 / Algorithm 1, coordinate descent over unit groups. For group ``g`` with the
  other groups' permutations fixed, ``max_P sum_(key, axis) <W_A[key], P W_B[key]>`` along ``axis`` is a linear
  assignment problem (``scipy.optimize.linear_sum_assignment``); groups are visited in a random order each sweep
  until no group improves.
- :func:`activation_matching`: Sec. 3.1, per group the assignment maximising the cross-correlation of model A's and
  model B's features (from :func:`mergelab.merging.features.feature_stats`); groups are independent.

A result is ``{group: perm}`` in the unit graph's convention (``perm[i]`` is B's unit placed at A's unit ``i``), so
``apply_permutation(graph, state_b, perms)`` is model B aligned to A, computing the same function as B.
:class:`Permute` is the merge engine's method (``merge=permute``): a permutation zip per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mergelab.errors import UserError
from mergelab.merging.engine import Zip, permutation_zip
from mergelab.merging.features import FeatureStats
from mergelab.models.graph import Group, UnitGraph

State = Mapping[str, torch.Tensor]


def solve_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """``perm`` maximising ``sum_i similarity[i, perm[i]]`` (rows: A's units, columns: B's units)."""
    rows, cols = linear_sum_assignment(similarity.detach().cpu().double().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.int64)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    return perm


def _permute_other_axes(graph: UnitGraph, key: str, tensor: torch.Tensor, perms: Mapping[Group, torch.Tensor],
                        skip: int) -> torch.Tensor:
    for axis, group in enumerate(graph.axes[key]):
        if axis != skip and group is not None:
            tensor = tensor.index_select(axis, perms[group])
    return tensor


def group_similarity(graph: UnitGraph, group: Group, state_a: State, state_b: State,
                     perms: Mapping[Group, torch.Tensor], parameters: Collection[str] | None = None) -> torch.Tensor:
    """``S[i, j] = sum_(key, axis) <A[key] unit i, B[key] unit j>`` with B's other axes permuted by ``perms``:
    the linear objective of Algorithm 1 for one group (float64, n x n).

    Only ``parameters`` (the keys of ``model.named_parameters()``; ``None``: every floating-point key) enter the
    sum: buffers such as BatchNorm's running mean and variance are statistics of the data, not weights, and Git
    Re-Basin's specs leave them out (its ResNet spec matches BatchNorm weight and bias only).
    """
    n = graph.groups[group]
    similarity = torch.zeros(n, n, dtype=torch.float64)
    for key, axis in graph.members(group):
        a, b = state_a[key], state_b[key]
        if not a.is_floating_point() or (parameters is not None and key not in parameters):
            continue
        b = _permute_other_axes(graph, key, b, perms, axis)
        a, b = (t.detach().cpu().double().movedim(axis, 0).reshape(n, -1) for t in (a, b))
        similarity += a @ b.T
    return similarity


def weight_matching(graph: UnitGraph, state_a: State, state_b: State, *, max_iter: int = 100, seed: int = 0,
                    parameters: Collection[str] | None = None) -> dict[Group, torch.Tensor]:
    """Git Re-Basin weight matching (Algorithm 1): permutations of B's units maximising ``sum <W_A, P W_B>`` over
    the ``parameters`` (see :func:`group_similarity`).

    Coordinate descent from the identity; a group's permutation changes only when it strictly improves the
    objective (ties keep the current one, so the loop ends). ``seed`` fixes the random group order of each sweep.
    """
    perms = {group: torch.arange(n) for group, n in graph.groups.items()}
    generator = torch.Generator().manual_seed(seed)
    groups = list(graph.groups)
    for _ in range(max_iter):
        improved = False
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group = groups[index]
            similarity = group_similarity(graph, group, state_a, state_b, perms, parameters)
            candidate = solve_assignment(similarity)
            rows = torch.arange(len(candidate))
            gain = similarity[rows, candidate].sum() - similarity[rows, perms[group]].sum()
            if gain > 1e-12 * similarity.abs().sum().clamp_min(1):
                perms[group], improved = candidate, True
        if not improved:
            break
    return perms


def activation_matching(stats: Mapping[Group, FeatureStats], a: int = 0, b: int = 1) -> dict[Group, torch.Tensor]:
    """Git Re-Basin activation matching: per group, the permutation of model ``b``'s units maximising the sum of
    Pearson correlations with model ``a``'s units (``stats`` from ``feature_stats`` over both models)."""
    return {group: solve_assignment(s.block(a, b)) for group, s in stats.items()}


@dataclass(frozen=True)
class Permute:
    """``merge=permute``: every model permuted onto the anchor by :func:`weight_matching` (``alignment=weights``)
    or :func:`activation_matching` (``alignment=activations``, features ``where`` = pre/post on ``num_samples``
    merge-data images); the engine averages the aligned units (a :func:`permutation_zip` per group)."""

    alignment: str = "weights"
    max_iter: int = 100
    seed: int = 0
    where: str = "post"
    num_samples: int | None = 1000
    name: str = "permute"

    def __post_init__(self):
        if self.alignment not in ("weights", "activations"):
            raise UserError(f"merge.alignment={self.alignment} is not one of weights, activations")

    @property
    def features(self) -> str | None:
        return self.where if self.alignment == "activations" else None

    @property
    def label(self) -> str:
        return f"{self.name}-{self.alignment}"

    def match(self, graph: UnitGraph, models: Sequence[nn.Module], stats, anchor: int) -> dict[Group, Zip]:
        states = [m.state_dict() for m in models]
        perms = []
        for k, model in enumerate(models):
            if k == anchor:
                perms.append({group: torch.arange(n) for group, n in graph.groups.items()})
            elif self.alignment == "weights":
                perms.append(weight_matching(graph, states[anchor], states[k], max_iter=self.max_iter,
                                             seed=self.seed, parameters={n for n, _ in model.named_parameters()}))
            else:
                perms.append(activation_matching(stats, anchor, k))
        return {group: permutation_zip([p[group] for p in perms]) for group in graph.groups}
