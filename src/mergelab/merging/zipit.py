"""ZipIt! (Stoica et al. 2024, "ZipIt! Merging Models from Different Tasks without Training"), as pure functions.

For every unit group of the unit graph, the features of all ``M`` models (``M * n`` of them, concatenated along the
unit axis) are *zipped* into ``n`` merged features: a greedy matching over the whole correlation matrix (Sec. 4.1,
Algorithm 1), where two features of one model may merge as well as features of different models, with the two
extensions of Sec. 4.3: ``alpha`` (a merged feature stays in play, its similarity to the rest decayed by ``alpha``)
and ``beta`` (each model's budget of within-model merges).

A zip is held as a cluster assignment (:class:`Zip`: feature -> merged feature), not as dense matrices; the paper's
merge matrix ``M_i`` (n x n_i, averaging a merged feature's members) and unmerge matrix ``U_i`` (n_i x n, copying
it back) are applied to weights with ``index_add`` along one axis (:func:`zip_layer_state`), and are materialised
only on request (:meth:`Zip.merge_matrix`, :meth:`Zip.unmerge_matrix`). A merged layer is
``W* = sum_i M_i^out W_i U_i^in`` (Sec. 4.2), so biases and BatchNorm vectors (output axes) are averaged over each
merged feature's members and a residual stream, being one group, is merged once for every layer that writes it.

Vanilla averaging and permutation matching are zips too (:func:`identity_zip`, :func:`permutation_zip`), so every
baseline goes through the same weight code.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from mergelab.errors import UserError
from mergelab.merging.features import FeatureStats, as_samples, hooked_eval
from mergelab.models.graph import Group, Layer, UnitGraph
from mergelab.models.multihead import Cut, MultiHead, split_at, trunk_layers

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Zip:
    """How one unit group of ``num_models`` models with ``units`` units each is merged into ``units`` features.

    ``assign[k]`` (length ``num_models * units``, models concatenated) is the merged feature that feature ``k``
    joins; every merged feature has at least one member. Merged features are ordered by their first member.
    """

    assign: torch.Tensor
    num_models: int
    units: int

    @property
    def sizes(self) -> torch.Tensor:
        """Members per merged feature (``units``,)."""
        return torch.bincount(self.assign, minlength=self.units)

    def model_assign(self, i: int) -> torch.Tensor:
        """``assign`` restricted to model ``i``'s features (``units``,)."""
        return self.assign[i * self.units:(i + 1) * self.units]

    def merge_matrix(self, i: int | None = None) -> torch.Tensor:
        """The paper's merge matrix: row ``c`` averages merged feature ``c``'s members; (n, M*n), or model ``i``'s
        columns ``M_i`` (n, n). Rows of the full matrix sum to 1."""
        unmerge = self.unmerge_matrix().T
        merge = unmerge / self.sizes[:, None]
        return merge if i is None else merge[:, i * self.units:(i + 1) * self.units]

    def unmerge_matrix(self, i: int | None = None) -> torch.Tensor:
        """The paper's unmerge matrix: row ``k`` is one-hot at feature ``k``'s merged feature; (M*n, n), or model
        ``i``'s rows ``U_i`` (n, n). Column ``c`` sums to merged feature ``c``'s size."""
        onehot = torch.nn.functional.one_hot(self.assign, self.units).double()
        return onehot if i is None else onehot[i * self.units:(i + 1) * self.units]


def identity_zip(units: int, num_models: int) -> Zip:
    """Vanilla averaging: unit ``j`` of every model merges with unit ``j`` of the others."""
    return Zip(torch.arange(units).repeat(num_models), num_models, units)


def permutation_zip(perms: Sequence[torch.Tensor]) -> Zip:
    """Permutation matching then averaging: ``perms[i][j]`` is model ``i``'s unit matched to unit ``j`` of the
    reference (the unit graph's convention; the reference's own entry is the identity)."""
    return Zip(torch.cat([torch.argsort(p) for p in perms]), len(perms), len(perms[0]))


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


def _merge_axis(tensor: torch.Tensor, axis: int, index: torch.Tensor, units: int) -> torch.Tensor:
    """Sums slices of ``tensor`` along ``axis`` into ``units`` slots: slot ``index[k]`` receives slice ``k``
    (``index_add``; the product with a one-hot matrix, without building it)."""
    # index_add_ along dim 0 of a contiguous matrix is the fast path; along other dims it is far slower on CPU.
    front = tensor.movedim(axis, 0)
    rows = front.reshape(front.shape[0], -1)
    summed = rows.new_zeros(units, rows.shape[1]).index_add_(0, index.to(tensor.device), rows)
    return summed.reshape(units, *front.shape[1:]).movedim(0, axis)


def zip_layer_state(layer: Layer, graph: UnitGraph, states: Sequence[State], zips: Mapping[Group, Zip]
                    ) -> dict[str, torch.Tensor]:
    """The merged tensors of one layer: ``sum_i M_i^out W_i U_i^in`` (Sec. 4.2), accumulated in float64.

    Axis 0 of every key is the layer's output (merged: members averaged); axis 1 of a weight is its input
    (unmerged: a merged feature feeds the sum of the columns of its members). Groups without a zip, and integer
    buffers (BatchNorm's batch count, taken from the first model), are left alone.
    """
    merged = {}
    for key in layer.keys:
        first = states[0][key]
        if not first.is_floating_point():
            merged[key] = first
            continue
        axes = graph.axes[key]
        total = None
        for i, state in enumerate(states):
            tensor = state[key].double()
            for axis, group in enumerate(axes[:2]):
                if group in zips:
                    zipped = zips[group]
                    tensor = _merge_axis(tensor, axis, zipped.model_assign(i), zipped.units)
            total = tensor if total is None else total + tensor
        out = axes[0] if axes else None
        if out in zips:
            total = total / zips[out].sizes.to(total.device, total.dtype).view(-1, *([1] * (total.ndim - 1)))
        else:
            total = total / len(states)
        merged[key] = total.to(first.dtype)
    return merged


def zip_states(graph: UnitGraph, states: Sequence[State], zips: Mapping[Group, Zip],
               layers: Sequence[Layer] | None = None) -> dict[str, torch.Tensor]:
    """The merged state of ``layers`` (default: all of the graph's) of ``states`` zipped by ``zips``."""
    merged = {}
    for layer in graph.layers if layers is None else layers:
        merged.update(zip_layer_state(layer, graph, states, zips))
    return merged


def unmerge_inputs(layers: Sequence[Layer], graph: UnitGraph, state: State, zips: Mapping[Group, Zip], i: int
                   ) -> dict[str, torch.Tensor]:
    """Model ``i``'s head after a partial zip: every weight of ``layers`` reading a zipped group gets ``U_i`` on
    its input axis, so it reads the merged features (Sec. 4.3 "partial zipping"). Other keys are unchanged."""
    out = {}
    for layer in layers:
        weight = layer.keys[0]
        group = layer.in_group
        if layer.kind != "bn" and group in zips:
            zipped = zips[group]
            out[weight] = _merge_axis(state[weight], 1, zipped.model_assign(i), zipped.units)
    return out


def merged_targets(zipped: Zip, per_model: Sequence[torch.Tensor]) -> torch.Tensor:
    """The average over each merged feature's members of a per-unit quantity of every model (``M_i`` applied to
    ``per_model[i]`` and summed): REPAIR's target statistics of the merged units."""
    values = torch.cat([v.double() for v in per_model])
    total = torch.zeros(zipped.units, dtype=torch.float64, device=values.device)
    total.index_add_(0, zipped.assign.to(values.device), values)
    return total / zipped.sizes.to(values.device)


# ------------------------------------------------------------------------------------------ zipped multi-head models


def zipped_model(models: Sequence[nn.Module], graph: UnitGraph, zips: Mapping[Group, Zip], cut: Cut
                 ) -> tuple[MultiHead, list[Layer], dict[Group, Zip]]:
    """Models zipped up to ``cut``: one merged trunk and, per model, its own remaining layers as a head reading the
    merged features (its first layers' inputs unmerged). Returns ``(model, trunk layers, zips used)``.

    With the deepest cut the heads are the classifiers alone (the full zip); the inputs are not modified.
    """
    states = [m.state_dict() for m in models]
    inside, outside = trunk_layers(graph, split_at(models[0], cut.hook)[0])
    used = {layer.out_group: zips[layer.out_group] for layer in inside if layer.out_group is not None}
    trunk_source = copy.deepcopy(models[0])
    trunk_source.load_state_dict(zip_states(graph, states, used, inside), strict=False)
    heads = []
    for i, (model, state) in enumerate(zip(models, states)):
        head_source = copy.deepcopy(model)
        head_source.load_state_dict(unmerge_inputs(outside, graph, state, used, i), strict=False)
        heads.append(split_at(head_source, cut.hook)[1])
    return MultiHead(split_at(trunk_source, cut.hook)[0], heads), inside, used


def correction_points(layers: Sequence[Layer]) -> list[Layer]:
    """Where REPAIR renormalises: each layer's last affine step before its nonlinearity or residual addition,
    i.e. every norm layer, and every linear/conv layer not directly followed by its norm."""
    points = []
    for layer, following in itertools.zip_longest(layers, layers[1:]):
        if layer.kind == "bn":
            points.append(layer)
        elif not (following is not None and following.kind == "bn" and following.out_group == layer.out_group):
            points.append(layer)
    return points


class _Moments:
    """Streaming per-channel mean and variance (channel dim 1; conv positions as samples), float64."""

    def __init__(self):
        self.count, self.sum, self.squares = 0, 0.0, 0.0

    def add(self, output: torch.Tensor) -> None:
        samples = as_samples(output.detach()).double()
        self.count += samples.shape[0]
        self.sum = self.sum + samples.sum(0)
        self.squares = self.squares + samples.square().sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        return (self.squares / self.count - self.mean.square()).clamp_min(0).sqrt()


@torch.no_grad()
def channel_moments(model: nn.Module, names: Sequence[str], batches: Iterable, num_batches: int | None = None
                    ) -> dict[str, _Moments]:
    """Per-channel mean and std of the outputs of modules ``names`` of ``model`` (eval mode), in one pass."""
    moments = {name: _Moments() for name in names}
    hooks = [(model, name, lambda m, i, out, s=moments[name]: s.add(out)) for name in names]
    with hooked_eval([model], hooks):
        for x, _ in itertools.islice(batches, num_batches):
            model(x)
    return moments


@torch.no_grad()
def repair(zipped: MultiHead, parents: Sequence[nn.Module], layers: Sequence[Layer], zips: Mapping[Group, Zip],
           batches: Iterable, num_batches: int | None = None, eps: float = 1e-8) -> MultiHead:
    """REPAIR (Jordan et al. 2023, Sec. 4): rescale every merged unit so that its mean and standard deviation are
    the average of its members' in the parent models, in place.

    At each correction point of the trunk (:func:`correction_points`) the targets are the members' averages of the
    parents' per-channel mean and std (:func:`merged_targets`). The merged network's own statistics are measured
    in one pass in which every point already renormalises its batch to the targets (the paper's reset layers), so
    each point sees corrected inputs; the affine correction ``a * y + b`` is then folded into the point's norm
    layer (``weight``, ``bias``) or its linear/conv layer.
    """
    points = correction_points(layers)
    names = [layer.name for layer in points]
    parent_moments = [channel_moments(parent, names, batches, num_batches) for parent in parents]
    targets = {}
    for layer in points:
        zipped_group = zips[layer.out_group]
        targets[layer.name] = (merged_targets(zipped_group, [pm[layer.name].mean for pm in parent_moments]),
                               merged_targets(zipped_group, [pm[layer.name].std for pm in parent_moments]))
    measured = {name: _Moments() for name in names}

    def renormalise(name):
        def hook(module, inputs, output):
            measured[name].add(output)
            samples = as_samples(output).double()
            mean, std = targets[name]
            scale = std / (samples.var(0, unbiased=False) + eps).sqrt()
            shape = (1, -1) + (1,) * (output.ndim - 2)
            return ((output - samples.mean(0).view(shape).to(output.dtype)) * scale.view(shape).to(output.dtype)
                    + mean.view(shape).to(output.dtype))
        return hook

    trunk = zipped.trunk
    with hooked_eval([zipped], [(trunk, name, renormalise(name)) for name in names]):
        for x, _ in itertools.islice(batches, num_batches):
            zipped(x)
    for layer in points:
        mean, std = targets[layer.name]
        scale = std / (measured[layer.name].std.square() + eps).sqrt()
        _fold_affine(trunk.get_submodule(layer.name), layer, scale, mean - scale * measured[layer.name].mean)
    return zipped


def _fold_affine(module: nn.Module, layer: Layer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Makes ``module``'s output ``scale * y + shift`` per output channel."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    if bias is None:
        raise UserError(f"REPAIR needs a bias or a BatchNorm after {layer.name}; use recompute_bn or none for this "
                        "model, or build it with model.bias=true")
    weight.mul_(scale.to(weight).view(-1, *([1] * (weight.ndim - 1))))
    bias.mul_(scale.to(bias)).add_(shift.to(bias))


@dataclass(frozen=True)
class ZipIt:
    """``merge=zipit``: the method's knobs, named as in the paper (Sec. 4.3).

    ``alpha``: how a merged feature's similarity decays for further merges; ``beta``: each model's budget of
    within-model merges; ``stop_at``: zip up to this cut (depth, hook or layer name; ``None``: everything but the
    classifiers); ``num_batches``: batches of training data the features (and REPAIR's statistics) are read on.
    """

    alpha: float = 0.5
    beta: float = 0.5
    stop_at: int | str | None = None
    num_batches: int | None = 20
    name: str = "zipit"

    def match(self, stats: Mapping[Group, FeatureStats]) -> dict[Group, Zip]:
        return zip_groups(stats, alpha=self.alpha, beta=self.beta)
