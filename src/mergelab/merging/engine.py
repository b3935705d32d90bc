"""What a merge is: one pipeline for every alignment method, correction and depth.

A merge of ``M`` models of one architecture reads their unit graph (which weight axes carry the same hidden unit)
and runs four steps; every method plugs into step 1 only, so every method gets every correction and depth:

1. **match** ``method.match(graph, models, stats, anchor) -> {group: Transform}``: for each unit group, how each
   model's ``n_i`` units map onto the ``n`` merged units. Methods that read activations get feature statistics of
   all models on the merge data (:func:`mergelab.merging.features.feature_stats`); the others get ``None``.

   ========================================  ===============  ====================================================
   method (``merge=``)                       transform        from
   ========================================  ===============  ====================================================
   ``average``                               :class:`Zip`     identity (unit ``j`` of every model merges)
   ``permute`` (weights or activations)      :class:`Zip`     Git Re-Basin matching of every model onto the anchor
   ``ot`` (weights or activations, EMD or    :class:`Plan`    OT fusion's transport plans onto the anchor
   Sinkhorn)
   ``zipit``                                 :class:`Zip`     ZipIt!'s greedy matching, within models too
   ========================================  ===============  ====================================================

2. **apply** :func:`merge_states`, the one weight code: with ``U_i`` model ``i``'s map (n_i x n), a merged tensor
   is ``W* = sum_i w_i U_i^T W_i U_i / mass`` (ZipIt! Sec. 4.2's ``sum_i M_i W_i U_i`` with fusion weights
   ``w_i``): the output axis (axis 0) is merged, every other grouped axis (inputs) reads the merged units.
3. **depth** ``stop_at``: ``None`` merges every layer into one model; a cut (:mod:`mergelab.models.multihead`)
   merges the trunk up to it and keeps each model's remaining layers as its own tail reading the merged features
   (:func:`merge_models` returns a :class:`~mergelab.models.multihead.MultiHead`). Only the trunk's groups are
   matched (:func:`trunk_graph`).
4. **correct** :func:`correct`: ``none``, ``recompute_bn`` (BatchNorm statistics re-estimated on the merge data) or
   ``repair`` (REPAIR, Jordan et al. 2023: every merged unit gets the average statistics of its members).

:func:`merge` runs the four steps; the tasks (``fuse.py``, ``zip.py``) load the population, call it and evaluate.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from mergelab.config import CORRECTIONS
from mergelab.errors import UserError
from mergelab.evaluation import recompute_bn
from mergelab.merging.features import FeatureStats, feature_stats
from mergelab.merging.repair import repair
from mergelab.models.graph import Group, Layer, UnitGraph
from mergelab.models.multihead import Cut, MultiHead, split_at, trunk_layers

State = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ the protocol


class Transform(Protocol):
    """How one unit group of ``num_models`` models is merged into ``units`` merged units.

    ``to_merged(tensor, axis, i)`` moves model ``i``'s units on ``axis`` onto the merged units, summing what lands
    on one: ``new[c] = sum_k U_i[k, c] old[k]``. ``mass(weights)`` is each merged unit's total weight
    ``sum_i w_i sum_k U_i[k, c]`` (what a merge divides by to average), or ``None`` where the maps already
    average (OT's corrected plans).
    """

    units: int
    num_models: int

    def to_merged(self, tensor: torch.Tensor, axis: int, i: int) -> torch.Tensor: ...

    def mass(self, weights: Sequence[float]) -> torch.Tensor | None: ...


class Method(Protocol):
    """An alignment method (``merge=<name>``): ``match`` returns a :class:`Transform` per group of ``graph``,
    mapping every model onto the merged units (those of model ``anchor`` for the methods that align to one).

    ``features`` is ``"pre"``/``"post"`` (the activations read, before or after the nonlinearity) when it reads
    activations, ``None`` when it reads weights only; ``num_samples``: how many merge-data images the features are
    read on (``None``: all); ``label`` names it in result rows (``ot-activations-sinkhorn``).
    """

    features: str | None
    num_samples: int | None

    @property
    def label(self) -> str: ...

    def match(self, graph: UnitGraph, models: Sequence[nn.Module], stats: Mapping[Group, FeatureStats] | None,
              anchor: int) -> dict[Group, Transform]: ...


def _index_sum(tensor: torch.Tensor, axis: int, index: torch.Tensor, units: int) -> torch.Tensor:
    """Slices of ``tensor`` along ``axis`` summed into ``units`` slots, slice ``k`` into slot ``index[k]``
    (``index_add``: the product with a one-hot matrix, without building it)."""
    # index_add_ along dim 0 of a contiguous matrix is the fast path; along other dims it is far slower on CPU.
    front = tensor.movedim(axis, 0)
    rows = front.reshape(front.shape[0], -1)
    summed = rows.new_zeros(units, rows.shape[1]).index_add_(0, index.to(tensor.device), rows)
    return summed.reshape(units, *front.shape[1:]).movedim(0, axis)


@dataclass(frozen=True)
class Zip:
    """A hard assignment: feature ``k`` of the concatenated models (length ``num_models * units``) joins merged
    feature ``assign[k]``; every merged feature has at least one member, and merged features are ordered by their
    first member. Vanilla averaging, permutation matching and ZipIt! are all zips; a merged feature is the
    (weighted) average of its members (ZipIt! Sec. 4.2's merge matrix ``M_i``), and a layer reading it reads the
    sum of its members' columns (the unmerge matrix ``U_i``)."""

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

    def to_merged(self, tensor: torch.Tensor, axis: int, i: int) -> torch.Tensor:
        return _index_sum(tensor, axis, self.model_assign(i), self.units)

    def mass(self, weights: Sequence[float]) -> torch.Tensor:
        return sum(w * torch.bincount(self.model_assign(i), minlength=self.units).double()
                   for i, w in enumerate(weights))

    def merge_matrix(self, i: int | None = None) -> torch.Tensor:
        """ZipIt!'s merge matrix: row ``c`` averages merged feature ``c``'s members; (n, M*n), or model ``i``'s
        columns ``M_i`` (n, n). Rows of the full matrix sum to 1."""
        merge = self.unmerge_matrix().T / self.sizes[:, None]
        return merge if i is None else merge[:, i * self.units:(i + 1) * self.units]

    def unmerge_matrix(self, i: int | None = None) -> torch.Tensor:
        """ZipIt!'s unmerge matrix: row ``k`` is one-hot at feature ``k``'s merged feature; (M*n, n), or model
        ``i``'s rows ``U_i`` (n, n). Column ``c`` sums to merged feature ``c``'s size."""
        onehot = torch.nn.functional.one_hot(self.assign, self.units).double()
        return onehot if i is None else onehot[i * self.units:(i + 1) * self.units]


def identity_zip(units: int, num_models: int) -> Zip:
    """Vanilla averaging: unit ``j`` of every model merges with unit ``j`` of the others."""
    return Zip(torch.arange(units).repeat(num_models), num_models, units)


def permutation_zip(perms: Sequence[torch.Tensor]) -> Zip:
    """Permutation matching: ``perms[i][j]`` is model ``i``'s unit matched to the anchor's unit ``j`` (the unit
    graph's convention; the anchor's own entry is the identity); merged unit ``j`` is the anchor's unit ``j``."""
    return Zip(torch.cat([torch.argsort(p) for p in perms]), len(perms), len(perms[0]))


def _contract(tensor: torch.Tensor, axis: int, plan: torch.Tensor) -> torch.Tensor:
    """``new[..., j, ...] = sum_i plan[i, j] old[..., i, ...]`` along ``axis``."""
    return (tensor.movedim(axis, -1) @ plan.to(tensor)).movedim(-1, axis)


@dataclass(frozen=True)
class Plan:
    """Soft maps: ``plans[i]`` (n_i x n, float64) sends model ``i``'s unit ``k`` to merged unit ``c`` with weight
    ``plans[i][k, c]``; ``None`` is the identity (the anchor). OT fusion's corrected plans (Singh & Jaggi 2020,
    Sec. 4: ``T~ = T diag(1/beta)``) give every merged unit a convex combination, so nothing is divided
    (``mass`` is ``None``): ``W* = sum_i w_i T~_i^T W_i T~_i``, the paper's aligned-then-averaged model."""

    plans: tuple[torch.Tensor | None, ...]
    units: int

    @property
    def num_models(self) -> int:
        return len(self.plans)

    def to_merged(self, tensor: torch.Tensor, axis: int, i: int) -> torch.Tensor:
        plan = self.plans[i]
        return tensor if plan is None else _contract(tensor, axis, plan)

    def mass(self, weights: Sequence[float]) -> None:
        return None


# ------------------------------------------------------------------------------------------------ apply


def merge_tensors(transform: Transform | None, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None
                  ) -> torch.Tensor:
    """``sum_i w_i to_merged(t_i) / mass`` along axis 0 (float64); where no transform acts (``transform=None``)
    or the maps average already (``mass`` None), ``sum_i w_i t_i / sum_i w_i``. ``weights=None``: all 1."""
    weights = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    total = 0
    for i, (tensor, weight) in enumerate(zip(tensors, weights)):
        total = total + weight * (tensor if transform is None else transform.to_merged(tensor, 0, i))
    mass = None if transform is None else transform.mass(weights)
    if mass is None:  # the maps average already: only the weights are normalised
        return total / sum(weights)
    return total / mass.to(total).view(-1, *([1] * (total.ndim - 1)))


def entry_to_merged(tensor: torch.Tensor, axis: int, entry, transforms: Mapping[Group, Transform], i: int,
                    graph: UnitGraph | None = None) -> torch.Tensor:
    """Model ``i``'s units on ``axis`` (one group, or a concatenation of groups: the unit graph's tuple entries,
    each part moved on its own slice) moved onto the merged units."""
    if not isinstance(entry, tuple):
        return transforms[entry].to_merged(tensor, axis, i) if entry in transforms else tensor
    pieces, start = [], 0
    for part in entry:
        size = graph.groups[part]
        piece = tensor.narrow(axis, start, size)
        pieces.append(transforms[part].to_merged(piece, axis, i) if part in transforms else piece)
        start += size
    return torch.cat(pieces, axis)


def output_axis(layer: Layer, axes: Sequence) -> int | None:
    """The output axis of one of ``layer``'s keys: axis 0 of a linear or convolution (grouped or not: a
    classifier's logits are not), else the first grouped axis (the channel axis of a norm's vectors or of a
    per-channel parameter such as a position embedding ``(1, tokens, channels)``); ``None`` if none is grouped."""
    if layer.kind in ("linear", "conv"):
        return 0
    return next((axis for axis, entry in enumerate(axes) if entry is not None), None)


def inputs_to_merged(tensor: torch.Tensor, axes: Sequence, transforms: Mapping[Group, Transform], i: int,
                     graph: UnitGraph | None = None, out: int | None = 0) -> torch.Tensor:
    """Model ``i``'s ``tensor`` with every grouped input axis (after the output axis ``out``) reading the merged
    units: ``W U_i``."""
    for axis, entry in enumerate(axes):
        if out is not None and axis > out and entry is not None:
            tensor = entry_to_merged(tensor, axis, entry, transforms, i, graph)
    return tensor


def merge_states(graph: UnitGraph, states: Sequence[State], transforms: Mapping[Group, Transform],
                 weights: Sequence[float] | None = None, layers: Sequence[Layer] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The merged tensors of ``layers`` (default: all of the graph's), in float64, cast back to each dtype.

    Per key: model ``i``'s inputs read the merged units (:func:`inputs_to_merged`), then the output axis
    (:func:`output_axis`) is merged by :func:`merge_tensors`, part by part where it is a concatenation (a fused
    attention projection). Groups without a transform are left alone (averaged with the weights). Integer
    buffers (BatchNorm's batch count) come from the first model.
    """
    merged = {}
    for layer in graph.layers if layers is None else layers:
        for key in layer.keys:
            first, axes = states[0][key], graph.axes[key]
            if not first.is_floating_point():
                merged[key] = first
                continue
            out = output_axis(layer, axes)
            tensors = [inputs_to_merged(state[key].double(), axes, transforms, i, graph, out)
                       for i, state in enumerate(states)]
            if out is None or axes[out] is None:
                merged[key] = merge_tensors(None, tensors, weights).to(first.dtype)
                continue
            parts = axes[out] if isinstance(axes[out], tuple) else (axes[out],)
            pieces, start = [], 0
            for part in parts:
                size = tensors[0].shape[out] if len(parts) == 1 else graph.groups[part]
                chunk = [t.movedim(out, 0).narrow(0, start, size) for t in tensors]
                pieces.append(merge_tensors(transforms.get(part), chunk, weights).movedim(0, out))
                start += size
            merged[key] = torch.cat(pieces, out).to(first.dtype)
    return merged


def unmerge_inputs(layers: Sequence[Layer], graph: UnitGraph, state: State, transforms: Mapping[Group, Transform],
                   i: int) -> dict[str, torch.Tensor]:
    """Model ``i``'s tail after a partial merge: every input axis of ``layers`` reading a merged group reads the
    merged units instead (``W U_i``; ZipIt! Sec. 4.3 "partial zipping"). Other keys are unchanged."""
    return {key: inputs_to_merged(state[key].double(), graph.axes[key], transforms, i, graph,
                                  output_axis(layer, graph.axes[key])).to(state[key].dtype)
            for layer in layers for key in layer.keys if any(g in transforms for g in graph.axes[key][1:])}


# ------------------------------------------------------------------------------------------------ depth


def trunk_graph(graph: UnitGraph, layers: Sequence[Layer]) -> UnitGraph:
    """The unit graph of ``layers`` alone: only the groups they write, only their keys. Methods matched on it see
    neither the layers after a cut nor their groups (a partial merge matches only what it merges)."""
    groups = {part for layer in layers if layer.out_group is not None
              for part in (layer.out_group if isinstance(layer.out_group, tuple) else (layer.out_group,))}
    groups |= {graph.blocks[g].parent for g in groups if g in graph.blocks and graph.blocks[g].parent is not None}
    keys = {key for layer in layers for key in layer.keys}

    def kept(entry):
        if isinstance(entry, tuple):
            return entry if all(part in groups for part in entry) else None
        return entry if entry in groups else None

    axes = {key: tuple(kept(g) for g in graph.axes[key]) for key in graph.axes if key in keys}
    return dataclasses.replace(graph, groups={g: n for g, n in graph.groups.items() if g in groups}, axes=axes,
                               layers=tuple(layers),
                               blocks={g: b for g, b in graph.blocks.items() if g in groups})


def merged_layers(model: nn.Module, graph: UnitGraph, cut: Cut | None) -> list[Layer]:
    """The layers a merge with depth ``cut`` merges: all (``None``), or those before the cut."""
    return list(graph.layers) if cut is None else trunk_layers(graph, split_at(model, cut)[0])[0]


def merge_models(models: Sequence[nn.Module], graph: UnitGraph, transforms: Mapping[Group, Transform],
                 cut: Cut | None = None, weights: Sequence[float] | None = None) -> nn.Module:
    """The merged network: with ``cut=None`` one model of the same class (every layer merged); with a cut a
    :class:`MultiHead` whose trunk is merged up to the cut and whose tails are each model's remaining layers,
    their inputs reading the merged features. The inputs are not modified."""
    states = [m.state_dict() for m in models]
    layers = merged_layers(models[0], graph, cut)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(merge_states(graph, states, transforms, weights, layers), strict=cut is None)
    if cut is None:
        return merged
    inside = {layer.name for layer in layers}
    outside = [layer for layer in graph.layers if layer.name not in inside]
    trunk_groups = {layer.out_group for layer in layers}
    transforms = {group: t for group, t in transforms.items() if group in trunk_groups}  # the tails' own units
    tails = []
    for i, (model, state) in enumerate(zip(models, states)):
        tail_source = copy.deepcopy(model)
        tail_source.load_state_dict(unmerge_inputs(outside, graph, state, transforms, i), strict=False)
        tails.append(split_at(tail_source, cut)[1])
    return MultiHead(split_at(merged, cut)[0], tails)


# ------------------------------------------------------------------------------------------------ correct


def correct(model: nn.Module, correction: str, parents: Sequence[nn.Module], layers: Sequence[Layer],
            transforms: Mapping[Group, Transform], batches: Iterable, weights: Sequence[float] | None = None,
            *, graph: UnitGraph) -> nn.Module:
    """``model`` corrected in place: ``none``; ``recompute_bn``: BatchNorm statistics recomputed on ``batches``;
    ``repair``: REPAIR at the correction points of the merged ``layers`` (:func:`mergelab.merging.repair.repair`),
    targets the merged parents' statistics, each layer's output read on its channel axis in ``graph``."""
    if correction == "recompute_bn":
        return recompute_bn(model, batches)
    if correction == "repair":
        trunk = model.trunk if isinstance(model, MultiHead) else model
        return repair(model, trunk, parents, [layer for layer in layers if layer.out_group in transforms],
                      lambda group, values: merge_tensors(transforms[group], values, weights), batches, graph)
    if correction != "none":
        raise UserError(f"merge.correction={correction} is not one of {', '.join(CORRECTIONS)}")
    return model


# ------------------------------------------------------------------------------------------------ the pipeline


def take(batches: Iterable, num_samples: int | None) -> Iterator:
    """The first ``num_samples`` samples of ``batches`` (all when ``None``), as batches."""
    seen = 0
    for x, y in batches:
        if num_samples is not None and seen >= num_samples:
            return
        count = len(x) if num_samples is None else min(len(x), num_samples - seen)
        seen += count
        yield x[:count], (y[:count] if y is not None else None)


def match(method: Method, models: Sequence[nn.Module], graph: UnitGraph, batches: Iterable, *, anchor: int = 0,
          cut: Cut | None = None, cache: dict | None = None) -> dict[Group, Transform]:
    """Step 1: ``method``'s transforms for the groups merged at depth ``cut``, with features of every model on
    ``batches`` when the method reads activations (``cache``: reuse one feature pass across methods)."""
    graph = trunk_graph(graph, merged_layers(models[0], graph, cut))
    stats = None
    if method.features is not None:
        cache = {} if cache is None else cache
        writers = getattr(method, "writers", "all")  # ZipIt!'s merge.writers; the other methods read every writer
        key = (method.features, method.num_samples, writers, tuple(graph.groups))
        if key not in cache:
            cache[key] = feature_stats(models, graph, take(batches, method.num_samples), where=method.features,
                                       writers=writers)
        stats = cache[key]
    if graph.structured and method.label != "average":  # heads, norm groups, concatenations: keep the structure
        from mergelab.merging import structured

        return structured.match(method, graph, models, stats, anchor)
    return method.match(graph, models, stats, anchor)


def merge(method: Method, models: Sequence[nn.Module], graph: UnitGraph, batches: Iterable, *,
          correction: str = "none", cut: Cut | None = None, anchor: int = 0,
          weights: Sequence[float] | None = None) -> nn.Module:
    """The four steps in one call: ``method``'s transforms, applied to ``models`` up to ``cut`` with fusion
    ``weights``, then ``correction`` on ``batches`` (an iterable that can be read more than once)."""
    transforms = match(method, models, graph, batches, anchor=anchor, cut=cut)
    merged = merge_models(models, graph, transforms, cut, weights)
    return correct(merged, correction, models, merged_layers(models[0], graph, cut), transforms, batches, weights,
                   graph=graph)


def tail_ensemble(model: nn.Module) -> nn.Module:
    """A partial merge of models of one task as one classifier: the mean of its tails' logits."""
    return _MeanOfTails(model) if isinstance(model, MultiHead) else model


class _MeanOfTails(nn.Module):
    def __init__(self, model: MultiHead):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.model.forward_tasks(x)).mean(0)


# ------------------------------------------------------------------------------------------------ from the config

SHARED_KEYS = ("correction", "stop_at", "base_recompute_bn")


def build_method(merge_cfg) -> Method:
    """The method of a ``merge`` config node (``_target_`` and its options; the engine's shared keys
    ``correction``, ``stop_at``, ``base_recompute_bn`` are read by the task). Bad options are one-line errors
    (:func:`mergelab.config.instantiate`)."""
    from mergelab.config import instantiate

    return instantiate(merge_cfg, key="merge", exclude=SHARED_KEYS)


def listed(value) -> list:
    """A config value that may be one item or a list of them, as a list."""
    return [value] if value is None or isinstance(value, (str, int, float)) else list(value)
