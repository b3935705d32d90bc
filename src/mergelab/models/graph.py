"""Unit graphs: which weight axes carry the same hidden unit.

A network's function is unchanged when the hidden units of a layer are permuted and the next layers' inputs are
permuted the same way. Git Re-Basin (Ainsworth et al. 2023, Sec. 3 and its "permutation spec") writes that symmetry as
data; so do we. A :class:`UnitGraph` holds

- ``groups``: unit group -> number of units. A group is a set of units that must be permuted together: a layer's
  outputs, the inputs of the layers that read them, the BatchNorm vectors between, and for a ResNet the whole
  residual stream of a stage (every block adds into it, so all of them share one permutation);
- ``axes``: every state-dict key (parameters and buffers) -> the group acting on each of its axes, ``None`` where no
  permutation acts (input pixels, logits, kernel positions, scalars);
- ``layers``: the weight layers in forward order, for methods that align layer by layer (OT fusion) and for
  methods that read activations (``Layer.hook``, :attr:`UnitGraph.hooks`).

Graphs are built from small fragments (:func:`linear`, :func:`conv`, :func:`norm`) joined by :func:`compose`; each
fragment reads shapes and which parameters exist from the module itself, so a graph follows its model's config
(bias on/off, BatchNorm on/off, width). A new architecture needs only its graph, written with these helpers.

Permutation convention: ``perm[i]`` is the old index of new unit ``i`` (``new = old.index_select(axis, perm)``),
so ``torch.argsort(perm)`` undoes it.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from mergelab.errors import UserError

Group = str


@dataclass(frozen=True)
class Layer:
    """One weight layer of a unit graph.

    ``name`` is its module path (``model.get_submodule(name)``); ``kind`` is ``"linear"``, ``"conv"`` or ``"bn"``
    (any norm layer with per-channel vectors); ``keys`` are its state-dict keys, weight first. ``in_group`` and
    ``out_group`` are the groups of its input and output units (``None``: pixels, flattened input, or logits; a norm
    layer has ``in_group == out_group``). ``hook`` is the module whose forward output carries ``out_group`` as this
    layer's activations: the nonlinearity after the layer (and its norm), for a residual stream the block's
    post-addition ReLU, for the classifier the classifier itself (logits).
    """

    name: str
    kind: str
    keys: tuple[str, ...]
    in_group: Group | None
    out_group: Group | None
    hook: str


@dataclass(frozen=True)
class UnitGraph:
    """Which weight axes carry the same hidden unit (see the module docstring)."""

    groups: dict[Group, int]
    axes: dict[str, tuple[Group | None, ...]]
    layers: tuple[Layer, ...]

    @property
    def hooks(self) -> dict[Group, tuple[str, ...]]:
        """Group -> the modules whose outputs carry that group (channel dim 1), in forward order.

        One module for an ordinary group; for a residual stream, every module writing into it (the stem's ReLU for
        the first stage, every block's post-addition ReLU), since ZipIt! matches a stream on features gathered
        from all of its writers.
        """
        hooks: dict[Group, list[str]] = {}
        for layer in self.layers:
            if layer.out_group is not None and layer.hook not in hooks.setdefault(layer.out_group, []):
                hooks[layer.out_group].append(layer.hook)
        return {group: tuple(modules) for group, modules in hooks.items()}

    def members(self, group: Group) -> tuple[tuple[str, int], ...]:
        """Every ``(key, axis)`` on which ``group`` acts."""
        return tuple((key, axis) for key, groups in self.axes.items()
                     for axis, g in enumerate(groups) if g == group)


def compose(*parts: UnitGraph) -> UnitGraph:
    """Joins graph fragments in forward order; a group named in several fragments must have one size."""
    groups: dict[Group, int] = {}
    axes: dict[str, tuple[Group | None, ...]] = {}
    layers: list[Layer] = []
    for part in parts:
        for group, size in part.groups.items():
            if groups.setdefault(group, size) != size:
                raise ValueError(f"unit graph bug: group {group} has sizes {groups[group]} and {size}")
        for key, key_axes in part.axes.items():
            if key in axes:
                raise ValueError(f"unit graph bug: key {key} is described twice")
            axes[key] = key_axes
        layers.extend(part.layers)
    return UnitGraph(groups, axes, tuple(layers))


def _weight_layer(name: str, kind: str, module: nn.Module, in_group: Group | None, out_group: Group | None,
                  hook: str, in_size: int, out_size: int) -> UnitGraph:
    """A linear or conv layer: weight axes (out, in, kernel...), bias axis (out,)."""
    state = module.state_dict()
    axes = {f"{name}.weight": (out_group, in_group) + (None,) * (state["weight"].ndim - 2)}
    if "bias" in state:
        axes[f"{name}.bias"] = (out_group,)
    sizes = {g: n for g, n in ((in_group, in_size), (out_group, out_size)) if g is not None}
    return UnitGraph(sizes, axes, (Layer(name, kind, tuple(axes), in_group, out_group, hook),))


def linear(name: str, module: nn.Linear, in_group: Group | None, out_group: Group | None, hook: str) -> UnitGraph:
    """A dense layer ``name`` reading units of ``in_group`` and writing units of ``out_group``."""
    return _weight_layer(name, "linear", module, in_group, out_group, hook, module.in_features, module.out_features)


def conv(name: str, module: nn.Conv2d, in_group: Group | None, out_group: Group | None, hook: str) -> UnitGraph:
    """A convolution (weight ``out, in, kh, kw``); grouped convolutions tie units differently and are refused."""
    if module.groups != 1:
        raise ValueError(f"unit graph: grouped convolution {name} is not supported")
    return _weight_layer(name, "conv", module, in_group, out_group, hook, module.in_channels, module.out_channels)


def norm(name: str, module: nn.Module | None, group: Group, hook: str) -> UnitGraph:
    """A per-channel norm layer (BatchNorm): every vector is indexed by ``group``, scalars (batch counts) by nothing.

    An absent norm (``None`` or a parameter-free ``nn.Identity``) gives an empty fragment, so the same graph code
    serves models with and without BatchNorm.
    """
    state = module.state_dict() if module is not None else {}
    if not state:
        return UnitGraph({}, {}, ())
    axes = {f"{name}.{suffix}": (group,) * tensor.ndim for suffix, tensor in state.items()}
    size = next(t.shape[0] for t in state.values() if t.ndim == 1)
    return UnitGraph({group: size}, axes, (Layer(name, "bn", tuple(axes), group, group, hook),))


def random_permutation(graph: UnitGraph, generator: torch.Generator | None = None) -> dict[Group, torch.Tensor]:
    """A uniformly random permutation of every group (``torch.randperm``, drawn in group order)."""
    return {group: torch.randperm(size, generator=generator) for group, size in graph.groups.items()}


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
        for axis, group in enumerate(graph.axes[key]):
            if group in perms:
                tensor = tensor.index_select(axis, perms[group].to(tensor.device))
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
            if group is not None and tensor.shape[axis] != graph.groups[group]:
                raise UserError(f"state dict key {key} has size {tensor.shape[axis]} on axis {axis}, "
                                f"but its unit group {group} has {graph.groups[group]} units")


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
