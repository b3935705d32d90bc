"""Streaming feature statistics of several models on the same inputs, per unit group of their unit graph.

Alignment by activations needs, for every unit group, how the units of the models co-vary: permutation matching
(Git Re-Basin, Ainsworth et al. 2023, Sec. 3.1 "matching activations") maximises the cross-correlation between model
A's and model B's units; OT fusion (Singh & Jaggi 2020, Sec. 4 "activation-based alignment") uses the distance
between unit activation vectors as its ground metric; ZipIt! (Stoica et al. 2024, Sec. 4.1) matches on the
correlation of all models' features together. All three are functions of the first and second moments of the
concatenated features, so one pass accumulates ``count``, ``sum`` and ``Σ fᵀf`` in float64 and never stores a
feature matrix (nor a samples x units x units tensor).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from mergelab.models.graph import Group, UnitGraph

# Rows per float64 matrix product, so a large convolutional batch (N*H*W samples) is not copied to float64 at once.
CHUNK_ROWS = 16384


@dataclass
class FeatureStats:
    """First and second moments of the features of ``num_models`` models on one unit group.

    Features are concatenated along the unit axis: model 0's ``units`` units, then model 1's, ... ``sum`` is
    ``Σ f`` (M*n,) and ``outer`` is ``Σ fᵀf`` (M*n, M*n) over ``count`` samples, all float64.
    """

    num_models: int
    units: int
    count: int
    sum: torch.Tensor
    outer: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Mean feature, (M*n,)."""
        return self.sum / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[fᵀf]``, (M*n, M*n)."""
        return self.outer / self.count

    @property
    def cov(self) -> torch.Tensor:
        """Covariance ``E[fᵀf] - E[f]ᵀE[f]`` (population, divided by ``count``), (M*n, M*n)."""
        mean = self.mean
        return self.second_moment - torch.outer(mean, mean)

    def corr(self, eps: float = 1e-7) -> torch.Tensor:
        """Pearson correlation; ``eps`` is added to every standard deviation so dead (constant) units give 0."""
        std = self.cov.diagonal().clamp_min(0).sqrt() + eps
        return self.cov / torch.outer(std, std)

    def block(self, i: int, j: int, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """The n x n block of ``matrix`` (default :meth:`corr`) between model ``i``'s and model ``j``'s units."""
        matrix = self.corr() if matrix is None else matrix
        n = self.units
        return matrix[i * n:(i + 1) * n, j * n:(j + 1) * n]

    def sq_distances(self, i: int, j: int) -> torch.Tensor:
        """``D[a, b] = Σ_samples (f_i[a] - f_j[b])²``: squared Euclidean distance between the activation vectors of
        unit ``a`` of model ``i`` and unit ``b`` of model ``j`` (OT fusion's activation ground metric), from the
        second moments as ``G_aa + G_bb - 2 G_ab``."""
        gram = self.outer
        g_ii = self.block(i, i, gram).diagonal()
        g_jj = self.block(j, j, gram).diagonal()
        return (g_ii[:, None] + g_jj[None, :] - 2 * self.block(i, j, gram)).clamp_min(0)


class _Accumulator:
    """Running ``count``, ``sum`` and ``Σ fᵀf`` of one group (float64, on the features' device)."""

    def __init__(self, width: int, device: torch.device):
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.outer = torch.zeros(width, width, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        for rows in features.split(CHUNK_ROWS):
            rows = rows.double()
            self.count += rows.shape[0]
            self.sum += rows.sum(0)
            self.outer.addmm_(rows.T, rows)


def as_samples(features: torch.Tensor) -> torch.Tensor:
    """Features with units on dim 1 as a (samples, units) matrix: a conv map N,C,H,W gives N*H*W samples."""
    if features.ndim == 2:
        return features
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def hook_modules(graph: UnitGraph, groups: Sequence[Group], where: str) -> dict[Group, tuple[str, bool]]:
    """Group -> ``(module name, read its input)`` for every writer of the group.

    ``where="post"``: the output of each module of ``graph.hooks[group]`` (the nonlinearity after the layer, for a
    residual stream every post-addition ReLU). ``where="pre"``: the pre-activation, i.e. the *input* of that
    nonlinearity (for a residual stream the sum of the block and its shortcut before the ReLU); where the hook is
    the weight layer itself (the classifier's logits) pre and post are the same output.
    """
    if where not in ("pre", "post"):
        raise ValueError(f"where must be 'pre' or 'post', got {where!r}")
    layer_names = {layer.name for layer in graph.layers}
    hooks = graph.hooks
    return {group: tuple((name, where == "pre" and name not in layer_names) for name in hooks[group])
            for group in groups}


@torch.no_grad()
def feature_stats(models: Sequence[nn.Module], graph: UnitGraph, batches: Iterable, *,
                  groups: Sequence[Group] | None = None, num_batches: int | None = None,
                  where: str = "post") -> dict[Group, FeatureStats]:
    """One streaming pass of every model over ``batches`` (``(x, y)`` on the models' device), in eval mode.

    For each group (default: every group with a hook, in graph order) the features of all models are concatenated
    along the unit axis and their moments accumulated (see :class:`FeatureStats`); a residual stream's writers
    each contribute their samples (writer ``k`` of every model is paired with writer ``k`` of the others).
    ``num_batches`` stops after that many batches.
    """
    groups = [g for g in graph.hooks if g in graph.groups] if groups is None else list(groups)
    modules = hook_modules(graph, groups, where)
    captured: list[dict[Group, list[torch.Tensor]]] = [{g: [] for g in groups} for _ in models]
    hooks = [(model, name, _capture(store[group], read_input))
             for model, store in zip(models, captured)
             for group, writers in modules.items() for name, read_input in writers]
    accumulators: dict[Group, _Accumulator] = {}
    with hooked_eval(models, hooks):
        for x, _ in itertools.islice(batches, num_batches):
            for model in models:
                model(x)
            for group in groups:
                per_model = [store[group] for store in captured]
                for writer in zip(*per_model):
                    joined = torch.cat([as_samples(f) for f in writer], dim=1)
                    if group not in accumulators:
                        accumulators[group] = _Accumulator(joined.shape[1], joined.device)
                    accumulators[group].add(joined)
                for features in per_model:
                    features.clear()
    if not accumulators:
        raise ValueError("feature_stats: no batches to read features from")
    return {group: FeatureStats(len(models), graph.groups[group], acc.count, acc.sum, acc.outer)
            for group, acc in accumulators.items()}


@contextmanager
def hooked_eval(models: Sequence[nn.Module], hooks: Iterable[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """``models`` in eval mode with forward hooks ``(model, module name, hook)`` registered; both undone on exit."""
    was_training = [model.training for model in models]
    handles = [model.get_submodule(name).register_forward_hook(hook) for model, name, hook in hooks]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for model, mode in zip(models, was_training):
            model.train(mode)


def _capture(store: list[torch.Tensor], read_input: bool):
    def hook(module, inputs, output):
        store.append((inputs[0] if read_input else output).detach())
    return hook
