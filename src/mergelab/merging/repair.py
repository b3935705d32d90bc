"""REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", Sec. 4): after
a merge, every merged unit is rescaled so that its mean and standard deviation are the merge of its members' in the
parent models. A correction of the merge engine (``merge.correction=repair``), for every method and depth, on every
model whose unit graph is derived: each layer's output is read on its own channel axis
(:meth:`~mergelab.models.graph.UnitGraph.feature_dim`: 1 for N,C,H,W maps, the last for tokens and channels-last
layers such as ConvNeXt's MLPs).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from mergelab.errors import UserError
from mergelab.merging.features import as_samples, hooked_eval
from mergelab.models.graph import Group, Layer, UnitGraph


def correction_points(layers: Sequence[Layer]) -> list[Layer]:
    """Where REPAIR renormalises: each layer's last affine step before its nonlinearity or residual addition,
    i.e. every norm layer, and every linear/conv layer not directly followed by its own norm, one that normalises
    its output (same group and same hook: the norm lies on the layer's path to its activation or addition). A
    pre-norm transformer's stream writers (patch embedding, attention and MLP output projections) are followed by
    the next block's norm, which normalises the residual sum, not them: they are points of their own. Per-channel
    ``scale`` parameters (layer scale, position embeddings) are no layer of their own to renormalise."""
    points = []
    layers = [layer for layer in layers if layer.kind != "scale"]
    for layer, following in itertools.zip_longest(layers, layers[1:]):
        if layer.kind == "bn":
            points.append(layer)
        elif not (following is not None and following.kind == "bn" and following.out_group == layer.out_group
                  and following.hook == layer.hook != ""):
            points.append(layer)
    return points


class _Moments:
    """Streaming per-channel mean and variance (channels on axis ``dim``, every other axis indexes samples:
    positions of a map, tokens), float64."""

    def __init__(self, dim: int = 1):
        self.dim = dim
        self.count, self.sum, self.squares = 0, 0.0, 0.0

    def add(self, output: torch.Tensor) -> None:
        samples = as_samples(output.detach(), self.dim).double()
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
def channel_moments(model: nn.Module, names: Sequence[str], batches: Iterable,
                    dims: Mapping[str, int] | None = None) -> dict[str, _Moments]:
    """Per-channel mean and std of the outputs of modules ``names`` of ``model`` (eval mode), in one pass;
    ``dims[name]``: the channel axis of that output (1 when absent)."""
    moments = {name: _Moments((dims or {}).get(name, 1)) for name in names}
    hooks = [(model, name, lambda m, i, out, s=moments[name]: s.add(out)) for name in names]
    with hooked_eval([model], hooks):
        for x, _ in batches:
            model(x)
    return moments


@torch.no_grad()
def repair(model: nn.Module, trunk: nn.Module, parents: Sequence[nn.Module], layers: Sequence[Layer],
           merge_values: Callable[[Group, list[torch.Tensor]], torch.Tensor], batches: Iterable, graph: UnitGraph,
           eps: float = 1e-8) -> nn.Module:
    """REPAIR ``model`` in place: ``trunk`` (``model`` itself or its merged trunk) holds the merged ``layers``
    under the parents' module names; ``merge_values(group, per-parent vectors)`` merges a per-unit quantity
    like the weights (the members' average); ``graph`` (the parents' unit graph) gives each output's channel axis.

    At each correction point (:func:`correction_points`) the targets are the merged parents' per-channel mean and
    std. The merged network's own statistics are measured in one pass in which every point already renormalises
    its batch to the targets (the paper's reset layers), so each point sees corrected inputs; the affine
    correction ``a * y + b`` is then folded into the point's norm layer (``weight``, ``bias``) or its linear/conv
    layer.
    """
    points = [layer for layer in correction_points(layers) if layer.out_group is not None]
    names = [layer.name for layer in points]
    dims = {name: graph.feature_dim(name) for name in names}
    parent_moments = [channel_moments(parent, names, batches, dims) for parent in parents]
    targets = {layer.name: (merge_values(layer.out_group, [pm[layer.name].mean for pm in parent_moments]),
                            merge_values(layer.out_group, [pm[layer.name].std for pm in parent_moments]))
               for layer in points}
    measured = {name: _Moments(dims[name]) for name in names}

    def renormalise(name):
        def hook(module, inputs, output):
            measured[name].add(output)
            dim = dims[name] % output.ndim
            samples = as_samples(output, dim).double()
            mean, std = targets[name]
            scale = std / (samples.var(0, unbiased=False) + eps).sqrt()
            shape = tuple(-1 if d == dim else 1 for d in range(output.ndim))
            return ((output - samples.mean(0).view(shape).to(output.dtype)) * scale.view(shape).to(output.dtype)
                    + mean.view(shape).to(output.dtype))
        return hook

    with hooked_eval([model], [(trunk, name, renormalise(name)) for name in names]):
        for x, _ in batches:
            model(x)
    for layer in points:
        mean, std = targets[layer.name]
        scale = std / (measured[layer.name].std.square() + eps).sqrt()
        _fold_affine(trunk.get_submodule(layer.name), layer, scale, mean - scale * measured[layer.name].mean)
    return model


def _fold_affine(module: nn.Module, layer: Layer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Makes ``module``'s output ``scale * y + shift`` per output channel."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    if bias is None:
        raise UserError(f"REPAIR needs a bias or a BatchNorm after {layer.name}; use merge.correction=recompute_bn "
                        "or none for this model, or build it with model.bias=true")
    weight.mul_(scale.to(weight).view(-1, *([1] * (weight.ndim - 1))))
    bias.mul_(scale.to(bias)).add_(shift.to(bias))
