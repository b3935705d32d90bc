"""A shared trunk with one head per task, cut out of any traceable model at a point of its unit graph.

Partial zipping (ZipIt!, Stoica et al. 2024, Sec. 4.3) merges a network up to some layer and keeps the rest of
every model as a separate head per task; evaluating models trained on disjoint tasks needs the same seam (the
heads' logits concatenated give the joint prediction). :func:`cut_points` lists where a network can be cut,
read from its unit graph and its ``torch.fx`` trace (no per-architecture code); :func:`split_at` cuts it there.

A point is a cut when exactly one tensor crosses it (the output of a group's last hook, e.g. a ResNet stage's last
block, not a block in the middle of a stage, whose input the next block's identity shortcut still reads) and no
layer after it writes that group again. Its depth counts weight layers on the longest path up to it, so ResNet-20's
cuts are 7, 13 and 19 of 20 (the paper's ZipIt!_7/20, ZipIt!_13/20 and the full zip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def _single_crossing(nodes: list[torch.fx.Node], position: int) -> bool:
    """Whether the output of ``nodes[position]`` is the only value computed up to it that is used after it."""
    later = set(nodes[position + 1:])
    return not any(user in later for node in nodes[:position] for user in node.users)


def cut_points(model: nn.Module, graph: UnitGraph) -> list[Cut]:
    """Every point where ``model`` splits into a trunk and a head, in forward order (the last one is the full zip:
    everything but the classifier in the trunk)."""
    nodes = list(torch.fx.symbolic_trace(model).graph.nodes)
    position = {node.target: k for k, node in enumerate(nodes) if node.op == "call_module"}
    depths = layer_depths(graph)
    total = max(depths.values())
    cuts = []
    for group, hooks in graph.hooks.items():
        hook = hooks[-1]
        writers = [layer for layer in graph.layers if layer.out_group == group]
        if hook not in position or not _single_crossing(nodes, position[hook]):
            continue
        if any(position.get(layer.name, -1) > position[hook] for layer in writers):
            continue
        depth = max(depths.get(layer.name, 0) for layer in writers)
        cuts.append(Cut(depth, total, hook, group, tuple(layer.name for layer in writers)))
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


def split_at(model: nn.Module, hook: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(trunk, head)`` with ``head(trunk(x)) == model(x)``: the trunk ends with module ``hook``'s output.

    Both are ``GraphModule``s over ``model``'s own submodules (no copies), each holding only the modules it calls.
    """
    traced = torch.fx.symbolic_trace(model)
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
