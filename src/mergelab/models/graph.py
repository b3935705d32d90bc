"""Unit graphs: which weight axes carry the same hidden unit.

A network's function is unchanged when the hidden units of a layer are permuted and the next layers' inputs are
permuted the same way. Git Re-Basin (Ainsworth et al. 2023, Sec. 3 and its "permutation spec") writes that symmetry as
data; so do we. A :class:`UnitGraph` holds

- ``groups``: unit group -> number of units. A group is a set of units that must be permuted together: a layer's
  outputs, the inputs of the layers that read them, the BatchNorm vectors between, and for a ResNet the whole
  residual stream of a stage (every block adds into it, so all of them share one permutation);
- ``axes``: every state-dict key (parameters and buffers) -> the group acting on each of its axes, ``None`` where no
  permutation acts (input pixels, logits, kernel positions, scalars), or a tuple of groups where the axis is the
  concatenation of their units (a fused attention projection's outputs are ``(qk, qk, vo)``);
- ``blocks``: structured groups (:class:`Blocks`): attention heads, GroupNorm groups, depthwise channel multipliers;
- ``layers``: the weight layers in forward order, for methods that align layer by layer (OT fusion) and for
  methods that read activations (``Layer.hook``, :attr:`UnitGraph.hooks`).

Graphs are derived from the model by tracing its forward computation (:mod:`mergelab.models.trace`), so a graph
follows its model's config (bias on/off, BatchNorm on/off, width) and a new architecture needs no code.

Permutation convention: ``perm[i]`` is the old index of new unit ``i`` (``new = old.index_select(axis, perm)``),
so ``torch.argsort(perm)`` undoes it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from mergelab.errors import UserError

Group = str
Axis = Group | None | tuple  # one group, no permutation, or the concatenation of several groups' units


@dataclass(frozen=True)
class Blocks:
    """A structured group: its ``n`` units are ``count`` consecutive blocks of ``n // count``; a valid permutation
    moves blocks as wholes, block ``b`` to the place the permutation of group ``parent`` gives it (blocks stay in
    place when ``parent`` is ``None``), and permutes the units inside each block freely (each block its own way).

    Multi-head attention: the query/key group and the value/output group have ``count`` = heads and share one
    ``parent`` (the heads group), so heads move together and, inside a head, query and key dimensions move jointly,
    value and output dimensions jointly. GroupNorm: blocks are its groups (normalisation stays within each group).
    Depthwise convolution with channel multiplier ``m``: blocks of ``m`` outputs, one per input channel, ``parent``
    = the input channels' group.
    """

    parent: Group | None
    count: int


@dataclass(frozen=True)
class Layer:
    """One weight layer of a unit graph.

    ``name`` is its module path (``model.get_submodule(name)``); ``kind`` is ``"linear"``, ``"conv"`` (depthwise
    too: then ``in_group == out_group``), ``"bn"`` (any norm layer with per-channel vectors) or ``"scale"`` (a
    parameter used elementwise: layer scale, position embedding, class token; ``name`` is the module holding it);
    ``keys`` are its state-dict keys, weight first. ``in_group`` and
    ``out_group`` are the groups of its input and output units (``None``: pixels, flattened input, or logits; a norm
    layer has ``in_group == out_group``; a tuple of groups where the axis is a concatenation). ``hook`` is the
    module whose forward output carries ``out_group`` as this layer's activations: the module that ends the chain
    of norms, activations and additions after the layer (the nonlinearity; for a residual stream the point where
    the block has added into it: its post-addition ReLU, or the block itself), for the classifier the classifier
    itself (logits); ``""`` where no module outputs that tensor.
    """

    name: str
    kind: str
    keys: tuple[str, ...]
    in_group: Axis
    out_group: Axis
    hook: str


@dataclass(frozen=True)
class UnitGraph:
    """Which weight axes carry the same hidden unit (see the module docstring)."""

    groups: dict[Group, int]
    axes: dict[str, tuple[Axis, ...]]
    layers: tuple[Layer, ...]
    blocks: dict[Group, Blocks] = field(default_factory=dict)
    feature_dims: dict[str, int] = field(default_factory=dict)
    elementwise: frozenset[str] = frozenset()

    @property
    def structured(self) -> bool:
        """Whether some group has blocks or some axis is a concatenation: solvers must then keep the structure
        (:mod:`mergelab.merging.structured`)."""
        return bool(self.blocks) or any(isinstance(a, tuple) for axes in self.axes.values() for a in axes)

    def feature_dim(self, module: str) -> int:
        """The channel axis of hook ``module``'s output: 1 for N,C,H,W maps, the last for tokens and vectors."""
        return self.feature_dims.get(module, 1)

    @property
    def hooks(self) -> dict[Group, tuple[str, ...]]:
        """Group -> the modules whose outputs carry that group (channel axis :meth:`feature_dim`), forward order.

        One module for an ordinary group; for a residual stream, every module writing into it (the stem's ReLU for
        the first stage, every block's post-addition ReLU), since ZipIt! matches a stream on features gathered
        from all of its writers.
        """
        hooks: dict[Group, list[str]] = {}
        for layer in self.layers:
            if layer.out_group is not None and layer.hook and \
                    layer.hook not in hooks.setdefault(layer.out_group, []):
                hooks[layer.out_group].append(layer.hook)
        return {group: tuple(modules) for group, modules in hooks.items()}

    def feature_points(self, group: Group) -> tuple[tuple[str, int], ...]:
        """``(module, start)``: the hook modules whose outputs carry ``group``'s units at ``start:start + n`` of
        their channel axis (0 unless the layer writes a concatenation, e.g. a fused qkv projection), forward
        order. The plain groups' points are :attr:`hooks`."""
        points: list[tuple[str, int]] = []
        for layer in self.layers:
            entry = layer.out_group
            if not layer.hook or entry is None:
                continue
            start = 0
            for part in entry if isinstance(entry, tuple) else (entry,):
                if part == group and (layer.hook, start) not in points:
                    points.append((layer.hook, start))
                start += self.groups[part]
        return tuple(points)

    def members(self, group: Group) -> tuple[tuple[str, int], ...]:
        """Every ``(key, axis)`` on which ``group`` acts alone (concatenated axes: :meth:`slices`)."""
        return tuple((key, axis) for key, groups in self.axes.items()
                     for axis, g in enumerate(groups) if g == group)

    def slices(self, group: Group) -> tuple[tuple[str, int, int], ...]:
        """Every ``(key, axis, start)``: ``group``'s units are ``start:start + n`` of that axis (0 unless the axis
        is a concatenation)."""
        out = []
        for key, groups in self.axes.items():
            for axis, entry in enumerate(groups):
                start = 0
                for part in entry if isinstance(entry, tuple) else (entry,):
                    if part == group:
                        out.append((key, axis, start))
                    if part is not None:
                        start += self.groups[part]
        return tuple(out)


def axis_size(graph: UnitGraph, entry: Axis) -> int | None:
    """Units on an axis entry (``None`` for an unpermuted axis)."""
    if entry is None:
        return None
    return sum(graph.groups[g] for g in entry) if isinstance(entry, tuple) else graph.groups[entry]


def axis_index(graph: UnitGraph, entry: Axis, perms: Mapping[Group, torch.Tensor]) -> torch.Tensor | None:
    """The reindexing of an axis: its group's permutation, the parts' permutations placed one after another for a
    concatenation (groups without a permutation in ``perms`` keep their order); ``None`` when nothing moves."""
    if entry is None:
        return None
    parts = entry if isinstance(entry, tuple) else (entry,)
    if not any(p in perms for p in parts):
        return None
    index, start = [], 0
    for part in parts:
        n = graph.groups[part]
        index.append((perms[part].cpu() if part in perms else torch.arange(n)) + start)
        start += n
    return torch.cat(index)


def random_permutation(graph: UnitGraph, generator: torch.Generator | None = None) -> dict[Group, torch.Tensor]:
    """A uniformly random valid permutation of every group (``torch.randperm``, drawn in group order); a structured
    group (:class:`Blocks`) moves its blocks by its parent's permutation and permutes inside each block."""
    perms = {group: torch.randperm(size, generator=generator) for group, size in graph.groups.items()}
    return structure(graph, perms, lambda size: torch.randperm(size, generator=generator))


def structure(graph: UnitGraph, perms: dict[Group, torch.Tensor], within) -> dict[Group, torch.Tensor]:
    """``perms`` with every structured group rebuilt from its parent's (already final) permutation and
    ``within(block_size)`` for each block; parents are resolved first."""
    done: set[Group] = set()

    def resolve(group: Group) -> None:
        if group in done:
            return
        done.add(group)
        if group not in graph.blocks:
            return
        spec = graph.blocks[group]
        size = graph.groups[group] // spec.count
        if spec.parent is not None:
            resolve(spec.parent)
        order = perms[spec.parent] if spec.parent is not None else torch.arange(spec.count)
        perms[group] = torch.cat([order[b] * size + within(size) for b in range(spec.count)])

    for group in graph.groups:
        resolve(group)
    return perms


def check_permutation(graph: UnitGraph, perms: Mapping[Group, torch.Tensor]) -> None:
    """``ValueError`` unless every permutation in ``perms`` is one and keeps its group's block structure."""
    for group, perm in perms.items():
        if not torch.equal(perm.sort().values, torch.arange(graph.groups[group])):
            raise ValueError(f"permutation of {group} is not a permutation")
        spec = graph.blocks.get(group)
        if spec is None:
            continue
        size = graph.groups[group] // spec.count
        moved = perm.view(spec.count, size) // size
        if not (moved == moved[:, :1]).all():
            raise ValueError(f"permutation of {group} splits a block")
        target = perms[spec.parent] if spec.parent is not None else torch.arange(spec.count)
        if not torch.equal(moved[:, 0].cpu(), target.cpu()):
            raise ValueError(f"permutation of {group} does not move its blocks with {spec.parent}")


def apply_permutation(graph: UnitGraph, state_dict: Mapping[str, torch.Tensor],
                      perms: Mapping[Group, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with every axis of every key reindexed by its group's permutation.

    ``perms`` may cover a subset of the groups; other axes are left alone, and tensors no permutation touches are
    shared with ``state_dict``, which is not modified.
    """
    for group, perm in perms.items():
        if group not in graph.groups:
            raise ValueError(f"apply_permutation: {group!r} is not a group of this unit graph")
        if tuple(perm.shape) != (graph.groups[group],):
            raise ValueError(f"apply_permutation: permutation of {group} has shape {tuple(perm.shape)}, "
                             f"expected ({graph.groups[group]},)")
    permuted = {}
    for key, tensor in state_dict.items():
        if key not in graph.axes:
            raise UserError(f"state dict key {key} is not in the model's unit graph; "
                            "was it saved from a different model config?")
        for axis, entry in enumerate(graph.axes[key]):
            index = axis_index(graph, entry, perms)
            if index is not None:
                tensor = tensor.index_select(axis, index.to(tensor.device))
        permuted[key] = tensor
    return permuted


def check_graph(graph: UnitGraph, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raises :class:`UserError` naming the first key where ``state_dict`` and ``graph`` disagree.

    They agree when both have the same keys, every key has one group entry per axis, and every grouped axis has
    its group's size.
    """
    for key in (k for k in graph.axes if k not in state_dict):
        raise UserError(f"state dict has no key {key}, which the model's unit graph expects; "
                        "was it saved from a different model config?")
    for key, tensor in state_dict.items():
        if key not in graph.axes:
            raise UserError(f"state dict key {key} is not in the model's unit graph; "
                            "was it saved from a different model config?")
        groups = graph.axes[key]
        if len(groups) != tensor.ndim:
            raise UserError(f"state dict key {key} has {tensor.ndim} axes, the unit graph describes {len(groups)}")
        for axis, group in enumerate(groups):
            size = axis_size(graph, group)
            if size is not None and tensor.shape[axis] != size:
                raise UserError(f"state dict key {key} has size {tensor.shape[axis]} on axis {axis}, "
                                f"but its unit group {group} has {size} units")


def _model_names(count: int) -> list[str]:
    """``model A``, ``model B``, ... (``model 27``... past the alphabet)."""
    return [f"model {string.ascii_uppercase[i] if i < 26 else i + 1}" for i in range(count)]


def check_compatible(state_dicts: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raises :class:`UserError` naming the first key whose presence or shape differs from the first state dict.

    Merging needs every model to have the same keys and shapes; ``names`` (default ``model A``, ``model B``, ...)
    name the models in the message, e.g. ``cannot merge: fc1.weight has shape (400, 64) in model A and (200, 64) in
    model B``.
    """
    names = list(names) if names is not None else _model_names(len(state_dicts))
    reference, ref_name = state_dicts[0], names[0]
    for state, name in zip(state_dicts[1:], names[1:]):
        for key in (k for k in reference if k not in state):
            raise UserError(f"cannot merge: {key} is in {ref_name} but not in {name}")
        for key in (k for k in state if k not in reference):
            raise UserError(f"cannot merge: {key} is in {name} but not in {ref_name}")
        for key, tensor in reference.items():
            if tensor.shape != state[key].shape:
                raise UserError(f"cannot merge: {key} has shape {tuple(tensor.shape)} in {ref_name} "
                                f"and {tuple(state[key].shape)} in {name}")
