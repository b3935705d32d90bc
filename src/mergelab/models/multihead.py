"""A shared trunk with one head per task, cut out of any traceable model at a point of its unit graph.

Partial zipping (ZipIt!, Stoica et al. 2024, Sec. 4.3) merges a network up to some layer and keeps the rest of
every model as a separate head per task; evaluating models trained on disjoint tasks needs the same seam (the
heads' logits concatenated give the joint prediction). :func:`cut_points` lists where a network can be cut,
read from its unit graph and a module-level ``torch.fx`` trace (no per-architecture code); :func:`split_at` cuts it
there. The trace treats the modules and functions timm registers as untraceable (``timm.layers._fx``, the registry
timm's own feature extraction traces with) as leaves, so Vision Transformers trace too. ``torch.export``, which
derives the unit graph, gives an ATen graph without module calls: a trunk cut from it would hold no BatchNorm to
recompute and no module to hook for REPAIR, so the split reads module calls from ``torch.fx``.

A point is a cut when exactly one tensor crosses it (the output of a group's last hook, e.g. a ResNet stage's last
block, not a block in the middle of a stage, whose input the next block's identity shortcut still reads) and no
layer after it writes that group again. Its depth counts weight layers on the longest path up to it, so ResNet-20's
cuts are 7, 13 and 19 of 20 (the paper's ZipIt!_7/20, ZipIt!_13/20 and the full zip).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.fx
from torch import nn

from mergelab.errors import UserError
from mergelab.models.graph import Group, Layer, UnitGraph


@dataclass(frozen=True)
class Cut:
    """A point where a network splits into a trunk and a head: after module ``hook``, which carries ``group``.

    ``depth`` of ``total`` weight layers (linear/conv on the longest path) lie before it; ``layers`` are the
    weight layers writing ``group`` (any of them names the cut, as does ``hook`` or ``depth``).
    """

    depth: int
    total: int
    hook: str
    group: Group
    layers: tuple[str, ...]
    leaves: frozenset[str] = frozenset()  # the modules the trace keeps whole (see :func:`trace`)

    @property
    def label(self) -> str:
        return f"{self.depth}/{self.total}"


class MultiHead(nn.Module):
    """``trunk`` shared by every task, then ``heads[t]`` for task ``t``; ``forward`` concatenates the heads'
    logits (the joint prediction over the union of the tasks' classes), :meth:`forward_tasks` keeps them apart.

    An ``nn.Identity`` trunk with whole models as heads is an ensemble (or a single model), so every method of a
    comparison is evaluated, counted and measured the same way.
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward_tasks(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.trunk(x)
        return [head(shared) for head in self.heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.forward_tasks(x), dim=1)


def layer_depths(graph: UnitGraph) -> dict[str, int]:
    """Weight layer -> number of linear/conv layers on the longest path from the input up to and including it
    (norm layers do not count; a residual stream is as deep as the deepest layer that has written into it)."""
    group_depth: dict[Group | None, int] = {None: 0}
    depths = {}
    for layer in graph.layers:
        if layer.kind == "bn":
            continue
        depths[layer.name] = group_depth.get(layer.in_group, 0) + 1
        if layer.out_group is not None:
            group_depth[layer.out_group] = max(group_depth.get(layer.out_group, 0), depths[layer.name])
    return depths


class _Tracer(torch.fx.Tracer):
    """``torch.fx`` with timm's registered leaf modules and wrapped functions (when timm is installed), and
    ``leaves`` (module names) kept whole."""

    def __init__(self, leaves: frozenset[str]):
        self.leaf_names = leaves
        try:
            from timm.layers import _fx
        except ImportError:  # no timm: plain torch.fx
            self.leaves: tuple[type, ...] = ()
            super().__init__()
        else:
            self.leaves = tuple(_fx.get_notrace_modules())
            super().__init__(autowrap_functions=tuple(_fx.get_notrace_functions()))

    def trace(self, root, concrete_args=None):
        # fx wraps the registered functions in the globals of the root's code and of modules it calls as modules;
        # a wrapper calling ``net.forward_features(x)`` as a method needs its wrapped model's globals too.
        if isinstance(root, nn.Module):
            self._autowrap_search = [*getattr(self, "_autowrap_search", []),
                                     *{sys.modules[type(m).__module__] for m in root.modules()}]
        return super().trace(root, concrete_args)

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return name in self.leaf_names or isinstance(module, self.leaves) or super().is_leaf_module(module, name)


def graph_leaves(graph: UnitGraph) -> frozenset[str]:
    """The modules a trace keeps whole: the graph's weight layers and hook modules, so that every feature point
    is one module call (timm's ``LayerNorm`` subclasses ``nn.LayerNorm``, which fx would otherwise trace into)."""
    return frozenset({layer.name for layer in graph.layers if layer.kind != "scale"}
                     | {hook for hooks in graph.hooks.values() for hook in hooks}) - {""}


def trace(model: nn.Module, leaves: frozenset[str] = frozenset()) -> torch.fx.GraphModule:
    """``model`` as a ``GraphModule`` of calls to its own submodules, modules ``leaves`` kept whole;
    :class:`UserError` when fx cannot read it."""
    try:
        return torch.fx.GraphModule(model, _Tracer(leaves).trace(model))
    except Exception as error:  # fx raises many kinds; the message is what matters
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot cut {type(model).__name__} into a trunk and task heads: torch.fx cannot trace it "
                        f"({first[:200]}); merge it fully (merge.stop_at=null) with fuse.py") from error


def _single_crossing(nodes: list[torch.fx.Node], position: int) -> bool:
    """Whether the output of ``nodes[position]`` is the only value computed up to it that is used after it."""
    later = set(nodes[position + 1:])
    return not any(user in later for node in nodes[:position] for user in node.users)


@torch.no_grad()
def _called(model: nn.Module, hook: str, position: Mapping[str, int]) -> str:
    """The module call of the trace that outputs ``hook``'s output: ``hook`` itself, or the innermost module kept
    whole that contains it when that module returns the very output of ``hook`` (timm's ``BatchNormAct2d`` ends
    with its activation), checked on an example input; ``hook`` (no call) otherwise."""
    parts = hook.split(".")
    owner = next((".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in position),
                 None)
    if hook in position or owner is None:
        return hook
    from mergelab.models.trace import _example_input

    outputs = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, i, out, name=name: outputs.setdefault(name, out)) for name in (hook, owner)]
    was_training = model.training
    try:
        model.eval()(_example_input(model))  # eval: no BatchNorm statistics move
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    inner, outer = outputs.get(hook), outputs.get(owner)
    same = inner is outer or (isinstance(inner, torch.Tensor) and isinstance(outer, torch.Tensor)
                              and inner.shape == outer.shape and torch.equal(inner, outer))
    return owner if same else hook


def cut_points(model: nn.Module, graph: UnitGraph) -> list[Cut]:
    """Every point where ``model`` splits into a trunk and a head, in forward order (the last one is the full zip:
    everything but the classifier in the trunk)."""
    leaves = graph_leaves(graph)
    nodes = list(trace(model, leaves).graph.nodes)
    position = {node.target: k for k, node in enumerate(nodes) if node.op == "call_module"}
    depths = layer_depths(graph)
    total = max(depths.values())
    cuts = []
    for group, hooks in graph.hooks.items():
        hook = _called(model, hooks[-1], position)
        writers = [layer for layer in graph.layers if layer.out_group == group]
        if hook not in position or not _single_crossing(nodes, position[hook]):
            continue
        if any(position.get(layer.name, -1) > position[hook] for layer in writers):
            continue
        depth = max(depths.get(layer.name, 0) for layer in writers)
        cuts.append(Cut(depth, total, hook, group, tuple(layer.name for layer in writers), leaves))
    return sorted(cuts, key=lambda cut: position[cut.hook])


def find_cut(cuts: Sequence[Cut], stop_at: int | str | None) -> Cut:
    """The cut named by ``stop_at``: a depth, a hook module or a weight layer writing the cut's group; ``None`` is
    the deepest cut (full zip). :class:`UserError` listing the choices when it names none."""
    if stop_at is None:
        return cuts[-1]
    for cut in cuts:
        if str(stop_at) in (str(cut.depth), cut.hook, *cut.layers):
            return cut
    choices = ", ".join(f"{cut.depth} ({cut.hook})" for cut in cuts)
    raise UserError(f"stop_at={stop_at} names no layer where this model can be cut; choose one of: {choices} "
                    "(or null for the full zip; python zip.py list_layers=true prints them)")


def split_at(model: nn.Module, cut: Cut) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(trunk, head)`` with ``head(trunk(x)) == model(x)``: the trunk ends with ``cut``'s hook module's output.

    Both are ``GraphModule``s over ``model``'s own submodules (no copies), each holding only the modules it calls.
    """
    hook = cut.hook
    traced = trace(model, cut.leaves)
    nodes = list(traced.graph.nodes)
    cut = next((k for k, node in enumerate(nodes) if node.op == "call_module" and node.target == hook), None)
    if cut is None or not _single_crossing(nodes, cut):
        raise ValueError(f"split_at: {hook} is not a cut point of {type(model).__name__}")
    trunk_graph, head_graph = torch.fx.Graph(), torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes[:cut + 1]:
        env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output(env[nodes[cut]])
    env = {nodes[cut]: head_graph.placeholder("features")}
    for node in nodes[cut + 1:]:
        env[node] = head_graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(model, trunk_graph), torch.fx.GraphModule(model, head_graph)


def trunk_layers(graph: UnitGraph, trunk: nn.Module) -> tuple[list[Layer], list[Layer]]:
    """The graph's layers split into those the trunk holds and the rest (the head's), both in forward order."""
    held = {name for name, _ in trunk.named_modules()}
    inside = [layer for layer in graph.layers if layer.name in held]
    return inside, [layer for layer in graph.layers if layer.name not in held]
