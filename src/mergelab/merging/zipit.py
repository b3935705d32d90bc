"""ZipIt! (Stoica et al. 2024, "ZipIt! Merging Models from Different Tasks without Training"), as pure functions.

For every unit group of the unit graph, the features of all ``M`` models (``M * n`` of them, concatenated along the
unit axis) are *zipped* into ``n`` merged features: a greedy matching over the whole correlation matrix (Sec. 4.1,
Algorithm 1), where two features of one model may merge as well as features of different models, with the two
extensions of Sec. 4.3: ``alpha`` (a merged feature stays in play, its similarity to the rest decayed by ``alpha``)
and ``beta`` (each model's budget of within-model merges).

A zip is held as a cluster assignment (:class:`~mergelab.merging.engine.Zip`: feature -> merged feature), not as
dense matrices; the merge engine applies the paper's merge and unmerge matrices to weights with ``index_add``
(``W* = sum_i M_i^out W_i U_i^in``, Sec. 4.2), like every other method's transforms, and partial zipping
(``merge.stop_at``) and REPAIR are the engine's depth and correction. Vanilla averaging and permutation matching
are zips too (:func:`~mergelab.merging.engine.identity_zip`, :func:`~mergelab.merging.engine.permutation_zip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from mergelab.errors import UserError
from mergelab.merging.engine import Zip
from mergelab.merging.features import FeatureStats
from mergelab.models.graph import Group, UnitGraph


def within_model_budget(beta: float, units: int, num_models: int) -> int:
    """Sec. 4.3's ``beta``: each model may do ``floor(beta * merges / M)`` within-model merges, where
    ``merges = (M - 1) * n`` is the number needed to go from ``M * n`` features to ``n`` (``beta = 1`` lets a model
    halve itself when M = 2; ``beta = 0`` allows merges between models only)."""
    return math.floor(beta * (num_models - 1) * units / num_models + 1e-9)


def zip_features(corr: torch.Tensor, num_models: int, *, alpha: float, beta: float) -> Zip:
    """ZipIt!'s greedy matching (Algorithm 1 with Sec. 4.3's ``alpha`` and ``beta``) on a correlation matrix.

    ``corr`` is the (M*n, M*n) correlation of all models' features. Until ``n`` features remain, the most similar
    pair of current features (any two, also of one model) is merged; the merged feature's similarity to every
    other is ``alpha * min`` of its two parts' similarities (Sec. 4.3; ``alpha = 0`` takes it out of further
    matching, the basic algorithm where every feature merges once). A merge of two features that both contain
    features of model ``m`` is a within-model merge of ``m`` and spends one unit of its budget
    (:func:`within_model_budget`); a model whose budget is spent takes part in no more of them, unless no other
    merge is left (with three or more models and a small ``beta`` the greedy pairs can leave only such merges,
    and the most similar of them is taken).

    Vectorised: the matrices stay (M*n)^2 (dead rows are -inf instead of being cut out) and the best entry of every
    row is cached, so a merge costs O(M*n * rows whose best partner changed) rather than a full argmax.
    """
    size = corr.shape[0]
    if corr.shape != (size, size) or size % num_models:
        raise ValueError(f"zip_features: correlation of shape {tuple(corr.shape)} does not split into "
                         f"{num_models} models")
    if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
        raise UserError(f"ZipIt! needs 0 <= alpha <= 1 and 0 <= beta <= 1, got alpha={alpha}, beta={beta}")
    units = size // num_models
    raw = corr.detach().double().clone().nan_to_num_(nan=0.0)  # similarities, -inf for pairs out of play
    raw.fill_diagonal_(-math.inf)
    owner = torch.arange(size, device=raw.device) // units
    contains = torch.nn.functional.one_hot(owner, num_models).bool()  # models present in each current feature
    budget = torch.full((num_models,), within_model_budget(beta, units, num_models), device=raw.device)
    sim = _without_spent(raw, contains, budget <= 0)  # raw, also -inf for merges the budgets forbid
    label = torch.arange(size, device=raw.device)  # feature -> the index of the current feature holding it
    best, partner = sim.max(1)
    for _ in range(size - units):
        p = int(best.argmax())
        q = int(partner[p])
        if best[p] == -math.inf:
            p, q = divmod(int(raw.argmax()), size)
            if raw[p, q] == -math.inf:
                raise UserError(f"ZipIt! cannot reduce {size} features of {num_models} models to {units} with "
                                f"alpha={alpha}: merged features leave play; raise alpha")
        p, q = min(p, q), max(p, q)
        spent_before = budget <= 0
        budget -= (contains[p] & contains[q]).long()
        label[label == q] = p
        contains[p] |= contains[q]
        merged = torch.minimum(raw[p], raw[q]) * alpha if alpha > 0 else torch.full_like(raw[p], -math.inf)
        raw[p], raw[:, p] = merged, merged
        raw[q], raw[:, q] = -math.inf, -math.inf
        raw[p, p] = -math.inf
        spent = budget <= 0
        if (spent & ~spent_before).any():
            sim = _without_spent(raw, contains, spent)
            best, partner = sim.max(1)
            continue
        row = merged.masked_fill((contains & contains[p] & spent).any(1), -math.inf)
        row[p] = -math.inf
        sim[p], sim[:, p] = row, row
        sim[q], sim[:, q] = -math.inf, -math.inf
        # Refresh the row cache: row p changed, column p changed for everyone, column q died.
        stale = (partner == p) | (partner == q)
        stale[p] = True
        best[stale], partner[stale] = sim[stale].max(1)
        better = sim[:, p] > best
        best[better], partner[better] = sim[better, p], p
        best[q] = -math.inf
    order = torch.unique(label)  # sorted current-feature indices = merged features ordered by first member
    return Zip(torch.searchsorted(order, label).cpu(), num_models, units)


def _without_spent(raw: torch.Tensor, contains: torch.Tensor, spent: torch.Tensor) -> torch.Tensor:
    """``raw`` with -inf between every two current features that both contain a model whose budget is spent."""
    spent_members = (contains & spent).double()
    return raw.masked_fill(spent_members @ spent_members.T > 0, -math.inf)


def feature_similarity(stats: FeatureStats) -> torch.Tensor:
    """Pearson correlation of all models' features, exact for low-variance units, and 1 between two constant
    features with the same value (e.g. ReLU units dead on the data): either can stand for the other, which the
    correlation, undefined there, would not say. A constant feature is 0 to every other.

    Computed from ``stats.cov`` rather than ``stats.corr()``, whose epsilon keeps a rarely active unit's
    correlation with its own copy below 1, so that zipping a model with itself would merge such units within the
    model instead of with their copies.
    """
    cov, mean = stats.cov, stats.mean
    var = cov.diagonal().clamp_min(0)
    constant = var <= 1e-12 * var.max().clamp_min(1e-300)
    std = var.sqrt().masked_fill(constant, math.inf)
    corr = cov / torch.outer(std, std)
    same = (mean[:, None] - mean[None, :]).abs() <= 1e-6 * var.max().sqrt()
    return corr.masked_fill(constant[:, None] & constant[None, :] & same, 1.0)


def zip_groups(stats: Mapping[Group, FeatureStats], *, alpha: float, beta: float) -> dict[Group, Zip]:
    """ZipIt! matching of every group, each from its own features (:func:`feature_similarity`)."""
    return {group: zip_features(feature_similarity(s), s.num_models, alpha=alpha, beta=beta)
            for group, s in stats.items()}


@dataclass(frozen=True)
class ZipIt:
    """``merge=zipit``: the method's knobs, named as in the paper (Sec. 4.3).

    ``alpha``: how a merged feature's similarity decays for further merges; ``beta``: each model's budget of
    within-model merges; ``num_samples``: merge-data images the features are read on (``None``: all). Depth
    (``merge.stop_at``) and correction are the engine's, as for every method.
    """

    alpha: float = 0.5
    beta: float = 0.5
    num_samples: int | None = 20480
    name: str = "zipit"

    features = "post"  # correlations of the features after the nonlinearity (Sec. 4.1)

    @property
    def label(self) -> str:
        return self.name

    def match(self, graph: UnitGraph, models, stats: Mapping[Group, FeatureStats], anchor: int) -> dict[Group, Zip]:
        return zip_groups(stats, alpha=self.alpha, beta=self.beta)
