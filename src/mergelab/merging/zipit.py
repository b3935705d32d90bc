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

import numpy as np
import torch

from mergelab.errors import UserError
from mergelab.merging.engine import Zip
from mergelab.merging.features import FeatureStats
from mergelab.models.graph import Group, UnitGraph


BUDGET_RULES = ("original", "members")


def within_model_budget(beta: float, units: int, num_models: int) -> int:
    """Sec. 4.3's ``beta``: each model may do ``floor(beta * floor(merges / M))`` within-model merges, where
    ``merges = (M - 1) * n`` is the number needed to go from ``M * n`` features to ``n`` (``beta = 1`` lets a model
    halve itself when M = 2). The inner floor is gstoica27/ZipIt's (``to_remove // num_models``)."""
    return math.floor(beta * ((num_models - 1) * units // num_models) + 1e-9)


def zip_features(corr: torch.Tensor, num_models: int, *, alpha: float, beta: float,
                 budget_rule: str = "original") -> Zip:
    """ZipIt!'s greedy matching (Algorithm 1 with Sec. 4.3's ``alpha`` and ``beta``) on a correlation matrix.

    ``corr`` is the (M*n, M*n) correlation of all models' features. Until ``n`` features remain, the most similar
    pair of current features (any two, also of one model; ties go to the first pair in row-major order) is merged.
    The merged feature's similarity to every other is ``alpha * min`` of its two parts' similarities (Sec. 4.3).
    ``alpha = 0`` is the basic algorithm, where a merged feature takes no more features of the models it already
    holds; its similarity to features of other models stays the (undecayed) ``min``, so with three or more models
    a third model's feature can still join, as in gstoica27/ZipIt.

    ``beta`` sets each model's budget of within-model merges (:func:`within_model_budget`); ``budget_rule`` says
    which merges spend it:

    - ``"original"`` (gstoica27/ZipIt's ``match_tensors_zipit``): a merge is within model ``m`` when the *first*
      members of both features come from ``m``; once a merge has brought ``m``'s budget to zero, no two features
      whose first members are ``m``'s merge any more (so at ``beta = 0`` each model still makes one).
    - ``"members"``: a merge spends the budget of every model present in both features, and a model whose budget
      is zero takes part in no more of them (``beta = 0``: none at all).

    A pair the budgets forbid stays forbidden for what it merges into (the ``min`` keeps ``-inf``). Should only
    forbidden merges be left (three or more models with a small ``beta``, or ``alpha = 0``), the most similar of
    them is taken, so the matching always finishes.

    Vectorised: the matrices stay (M*n)^2 (dead rows are -inf instead of being cut out) and the best entry of every
    row is cached, so a merge costs O(M*n * rows whose best partner changed) rather than a full argmax.
    """
    size = corr.shape[0]
    if corr.shape != (size, size) or size % num_models:
        raise ValueError(f"zip_features: correlation of shape {tuple(corr.shape)} does not split into "
                         f"{num_models} models")
    if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
        raise UserError(f"ZipIt! needs 0 <= alpha <= 1 and 0 <= beta <= 1, got alpha={alpha}, beta={beta}")
    if budget_rule not in BUDGET_RULES:
        raise UserError(f"ZipIt! budget_rule={budget_rule!r} is unknown; choose from {list(BUDGET_RULES)}")
    units = size // num_models
    # sim: similarities as alpha leaves them, -inf where a budget forbids the merge (the matrix searched); raw: the
    # same without the budgets, kept from the first budget that runs out (before, it equals sim); base (alpha = 0
    # only): the undecayed min, never -inf, the last resort when alpha = 0 has left nothing in play.
    # numpy, not torch: the loop is one small update per merge, where torch's per-call overhead would dominate.
    sim = np.nan_to_num(corr.detach().double().cpu().numpy(), nan=0.0)
    np.fill_diagonal(sim, -np.inf)
    raw = None
    base = sim.copy() if alpha == 0 else None
    owner = np.arange(size) // units  # a current feature's first member is its own index
    contains = np.zeros((size, num_models), dtype=bool)  # models present in each current feature
    contains[np.arange(size), owner] = True
    alive = np.ones(size, dtype=bool)
    budget = [within_model_budget(beta, units, num_models)] * num_models
    if budget_rule == "members" and budget[0] <= 0:
        raw = sim.copy()
        for m in range(num_models):
            _forbid(sim, contains[:, m])
    label = np.arange(size)  # feature -> the index of the current feature holding it
    best, partner = _row_best(sim)
    for _ in range(size - units):
        p = int(best.argmax())
        if best[p] > -np.inf:
            q = int(partner[p])
        else:
            fallback = sim if raw is None else raw
            p, q = _first_max(fallback if base is None or fallback.max() > -np.inf else base)
        p, q = min(p, q), max(p, q)
        if budget_rule == "original":
            charged = [int(owner[p])] if owner[p] == owner[q] else []
        else:
            charged = np.flatnonzero(contains[p] & contains[q]).tolist()
        label[label == q] = p
        contains[p] |= contains[q]
        alive[q] = False
        for matrix in (sim, raw):
            if matrix is not None:
                _merge_rows(matrix, p, q, alpha, contains)
        if base is not None:
            _merge_rows(base, p, q, 1.0, None)
        killed = False
        for m in charged:
            budget[m] -= 1
            if budget[m] <= 0:
                raw = sim.copy() if raw is None else raw
                _forbid(sim, alive & (owner == m if budget_rule == "original" else contains[:, m]))
                killed = True
        if killed:
            best, partner = _row_best(sim)
            continue
        # Refresh the row cache: row p changed, column p changed for everyone, column q died.
        stale = np.flatnonzero((partner == p) | (partner == q))
        stale = np.append(stale, p)
        best[stale], partner[stale] = _row_best(sim[stale])
        column = sim[:, p]
        better = (column > best) | ((column == best) & (p < partner))
        best[better], partner[better] = column[better], p
        best[q] = -np.inf
    merged = np.searchsorted(np.unique(label), label)  # merged features ordered by first member
    return Zip(torch.from_numpy(merged).long(), num_models, units)


def _merge_rows(matrix: np.ndarray, p: int, q: int, alpha: float, contains: np.ndarray | None) -> None:
    """Feature ``q`` merged into ``p`` in a similarity matrix: row and column ``p`` become ``alpha * min`` of both
    (with ``alpha = 0``: the plain ``min``, -inf to features sharing a model with the merged one), ``q`` dies."""
    merged = np.minimum(matrix[p], matrix[q])
    if alpha > 0:
        merged *= alpha
    elif contains is not None:
        merged[(contains & contains[p]).any(1)] = -np.inf
    merged[p] = -np.inf
    matrix[p], matrix[:, p] = merged, merged
    matrix[q], matrix[:, q] = -np.inf, -np.inf


def _forbid(sim: np.ndarray, members: np.ndarray) -> None:
    """-inf between every two of the current features ``members`` (a spent budget)."""
    index = np.flatnonzero(members)
    sim[np.ix_(index, index)] = -np.inf


def _row_best(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row's largest entry and its first column (the original's row-major argmax breaks ties this way)."""
    partner = sim.argmax(1)
    return sim[np.arange(len(sim)), partner], partner


def _first_max(matrix: np.ndarray) -> tuple[int, int]:
    """The first entry (row-major) holding the matrix's largest value."""
    return divmod(int(matrix.argmax()), matrix.shape[1])


def feature_similarity(stats: FeatureStats) -> torch.Tensor:
    """Pearson correlation of all models' features, exact for low-variance units; a constant feature (e.g. a ReLU
    unit dead on the data) has similarity 0 to every feature, other constant ones included, as gstoica27/ZipIt's
    ``cov / clamp(std std^T, eps)`` gives it.

    Computed from ``stats.cov`` rather than ``stats.corr()``, whose epsilon keeps a rarely active unit's
    correlation with its own copy below 1, so that zipping a model with itself could merge such units within the
    model instead of with their copies.
    """
    cov = stats.cov
    var = cov.diagonal().clamp_min(0)
    constant = var <= 1e-12 * var.max().clamp_min(1e-300)
    std = var.sqrt().masked_fill(constant, math.inf)
    return cov / torch.outer(std, std)


def zip_groups(stats: Mapping[Group, FeatureStats], *, alpha: float, beta: float, budget_rule: str = "original"
               ) -> dict[Group, Zip]:
    """ZipIt! matching of every group, each from its own features (:func:`feature_similarity`)."""
    return {group: zip_features(feature_similarity(s), s.num_models, alpha=alpha, beta=beta, budget_rule=budget_rule)
            for group, s in stats.items()}


@dataclass(frozen=True)
class ZipIt:
    """``merge=zipit``: the method's knobs, named as in the paper (Sec. 4.3).

    ``alpha``: how a merged feature's similarity decays for further merges; ``beta``: each model's budget of
    within-model merges; ``budget_rule``: which merges spend it (:func:`zip_features`); ``writers``: where a
    residual stream's features are read (:func:`~mergelab.merging.features.feature_stats`); ``num_samples``:
    merge-data images the features are read on (``None``: all). Depth (``merge.stop_at``) and correction are the
    engine's, as for every method.
    """

    alpha: float = 0.5
    beta: float = 0.5
    budget_rule: str = "original"
    writers: str = "all"
    num_samples: int | None = 20480
    name: str = "zipit"

    features = "post"  # correlations of the features after the nonlinearity (Sec. 4.1)

    @property
    def label(self) -> str:
        return self.name

    def match(self, graph: UnitGraph, models, stats: Mapping[Group, FeatureStats], anchor: int) -> dict[Group, Zip]:
        return zip_groups(stats, alpha=self.alpha, beta=self.beta, budget_rule=self.budget_rule)
