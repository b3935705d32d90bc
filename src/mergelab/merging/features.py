"""Streaming feature statistics of several models on the same inputs, per unit group of their unit graph.

Alignment by activations needs, for every unit group, how the units of the models co-vary: permutation matching
(Git Re-Basin, Ainsworth et al. 2023, Sec. 3.1 "matching activations") maximises the cross-correlation between model
A's and model B's units; OT fusion (Singh & Jaggi 2020, Sec. 4 "activation-based alignment") uses the distance
between unit activation vectors as its ground metric; ZipIt! (Stoica et al. 2024, Sec. 4.1) matches on the
correlation of all models' features together. All three are functions of the first and second moments of the
concatenated features, so one pass accumulates ``count``, ``sum`` and ``Σ fᵀf`` and never stores a feature matrix
(nor a samples x units x units tensor). The products run in the features' precision (float32 for float32 models) on
features centred by a per-group shift, and every chunk's result is added into float64 totals (see
:class:`_Accumulator`).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from scipy.linalg.blas import ssyrk
from torch import nn

from mergelab.errors import UserError
from mergelab.models.graph import Group, UnitGraph

# Samples per matrix product in the features' precision; each product is then added into the float64 totals, so a
# float32 sum never runs over more than this many samples.
CHUNK_ROWS = 4096
WRITERS = ("all", "last")


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
    """Running ``count``, ``sum`` and ``Σ fᵀf`` of one group, on the features' device.

    Each batch's features are written into one units-major (M*n, samples) block of about ``CHUNK_ROWS`` samples
    (whole images; the models' units stacked, a conv map's positions copied in contiguous runs), centred on the way
    by a fixed shift (the mean of the first images written, so ReLU features whose mean is large next to their
    spread lose no digits to cancellation). A full block is multiplied as ``X Xᵀ`` (:func:`_gram`) and
    refilled, so the pass allocates nothing per batch. Under the features lies a row of ones: the last column of the
    product is then their sum, so no pass of its own sums them. float64 features stay float64; any other precision
    is multiplied in float32 and each block's result added into float64 totals: float32 runs at twice float64's
    speed on CPU (far more on GPU), and ZipIt!'s groupings are those of float64 accumulation
    (tests/test_zipit_fidelity.py). Only the upper triangle of ``Σ fᵀf`` is accumulated; :meth:`stats` mirrors it.
    """

    def __init__(self, width: int, device: torch.device):
        self.width, self.count, self.filled = width, 0, 0
        self.shift: torch.Tensor | None = None
        self.block: torch.Tensor | None = None
        self.upper = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)

    def add(self, per_model: Sequence[torch.Tensor]) -> None:
        """One batch: every model's features of the group (samples on dim 0, units on dim 1), models in order."""
        first = per_model[0]
        units, positions = first.shape[1], first[0].numel() // first.shape[1]  # a conv map's positions per image
        start = 0
        while start < len(first):
            if self.block is None or (not self.filled and self.block.shape[1] < positions):  # (a larger map)
                dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
                self.block = torch.empty(self.width + 1, max(1, CHUNK_ROWS // positions) * positions, dtype=dtype,
                                         device=first.device)
                self.block[-1] = 1
            images = min(len(first) - start, (self.block.shape[1] - self.filled) // positions)
            if images == 0:
                self._multiply()
                continue
            columns = slice(self.filled, self.filled + images * positions)
            shift = self.shift if self.shift is not None else self.block.new_zeros(self.width, 1)
            for i, f in enumerate(per_model):
                rows = slice(i * units, (i + 1) * units)
                torch.sub(f[start:start + images].reshape(images, units, positions).transpose(0, 1),
                          shift[rows, :, None], out=self.block[rows, columns].view(units, images, positions))
            if self.shift is None:  # the first images, written as they are, give the shift and are centred in place
                self.shift = self.block[:-1, columns].mean(1, keepdim=True)
                self.block[:-1, columns] -= self.shift
            self.filled = columns.stop
            start += images

    def _multiply(self) -> None:
        block = self.block if self.filled == self.block.shape[1] else self.block[:, :self.filled].contiguous()
        self.upper += _gram(block)  # float32 into the float64 totals, no temporary
        self.count += self.filled
        self.filled = 0

    def stats(self, num_models: int, units: int) -> FeatureStats:
        """The uncentred moments, ``Σ (c+s)(c+s)ᵀ = Σ ccᵀ + s (Σ c)ᵀ + (Σ c) sᵀ + count s sᵀ``, in float64, from
        the products' upper triangle (``Σ ccᵀ``, and ``Σ c`` in the last column)."""
        if self.filled:
            self._multiply()
        shift = self.shift.squeeze(1).double()
        upper = self.upper[:-1, :-1].triu()
        centred = upper + upper.triu(1).T
        total = self.upper[:-1, -1]
        outer = centred + torch.outer(shift, total) + torch.outer(total, shift) + self.count * torch.outer(shift, shift)
        return FeatureStats(num_models, units, self.count, total + self.count * shift, outer)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x xᵀ`` of a contiguous (units, samples) matrix; only its upper triangle is meant. On CPU in float32 it is
    BLAS's ``ssyrk``, which computes that triangle alone (half a matrix product's work, read without a copy: a
    C-order ``x`` is a Fortran-order ``xᵀ``); elsewhere a matrix product."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(ssyrk(1.0, x.numpy().T, trans=1))
    return x @ x.T


def as_samples(features: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Features with units on axis ``dim`` as a (samples, units) matrix: every other axis indexes samples (a conv
    map N,C,H,W with ``dim=1`` gives N*H*W samples; tokens N,T,C with ``dim=-1`` give N*T)."""
    if features.ndim == 2 and dim in (1, -1):
        return features
    return features.movedim(dim, -1).reshape(-1, features.shape[dim])


def hook_modules(graph: UnitGraph, groups: Sequence[Group], where: str
                 ) -> dict[Group, tuple[tuple[str, bool, int, int], ...]]:
    """Group -> ``(module name, read its input, channel axis, start)`` for every point where the group is written.

    ``where="post"``: the output of each of the group's hook modules (:meth:`UnitGraph.feature_points`: the point
    after the layer's norm and nonlinearity, for a residual stream every point where a block has written into it).
    ``where="pre"``: the *input* of that module where it is an activation module of its own
    (:attr:`UnitGraph.elementwise`: the pre-activation; for a residual stream's post-addition ReLU, the sum of the
    block and its shortcut); elsewhere (a weight layer such as the classifier, a block, an activation fused with
    its norm) pre and post are the same output. The channel axis is :meth:`UnitGraph.feature_dim` (1 for maps, the
    last for tokens); the group's units are ``start:start + n`` of it (a part of a concatenation: the queries, keys
    or values of a fused projection).
    """
    if where not in ("pre", "post"):
        raise ValueError(f"where must be 'pre' or 'post', got {where!r}")
    points = {group: graph.feature_points(group) for group in groups}
    missing = [g for g, p in points.items() if not p]
    if missing:
        raise UserError(f"unit group {missing[0]} has no point where its features can be read; merge this model "
                        "by weights (merge.alignment=weights)")
    return {group: tuple((name, where == "pre" and name in graph.elementwise, graph.feature_dim(name), start)
                         for name, start in points[group])
            for group in groups}


@torch.inference_mode()
def feature_stats(models: Sequence[nn.Module], graph: UnitGraph, batches: Iterable, *,
                  groups: Sequence[Group] | None = None, num_batches: int | None = None,
                  where: str = "post", writers: str = "all") -> dict[Group, FeatureStats]:
    """One streaming pass of every model over ``batches`` (``(x, y)`` on the models' device), in eval mode and
    inference mode (no autograd bookkeeping at all).

    For each group (default: every group with a hook, in graph order) the features of all models are concatenated
    along the unit axis and their moments accumulated (see :class:`FeatureStats`). ``writers`` says which of the
    group's writers (``graph.hooks[group]``, in forward order) are read; it matters for a residual stream only:

    - ``"all"``: every writer (the stem and every block), each contributing its samples, writer ``k`` of every
      model paired with writer ``k`` of the others;
    - ``"last"``: the last writer, i.e. the stream where it leaves its stage (the input of the next stage or of the
      pooling), as gstoica27/ZipIt reads it (one PREFIX node per stage exit). ZipIt! offers both
      (``merge.writers``, default ``all``; the evidence is in docs/zipit.md).

    ``num_batches`` stops after that many batches.
    """
    if writers not in WRITERS:
        raise UserError(f"writers={writers!r} (merge.writers) is unknown; choose from {list(WRITERS)}")
    groups = [g for g in graph.groups if graph.feature_points(g)] if groups is None else list(groups)
    modules = hook_modules(graph, groups, where)
    if writers == "last":
        modules = {group: hooks[-1:] for group, hooks in modules.items()}
    captured: list[dict[Group, list[torch.Tensor]]] = [{g: [] for g in groups} for _ in models]
    hooks = [(model, name, _capture(store[group], read_input, dim, start, graph.groups[group]))
             for model, store in zip(models, captured)
             for group, hooked in modules.items() for name, read_input, dim, start in hooked]
    accumulators: dict[Group, _Accumulator] = {}
    with hooked_eval(models, hooks):
        for x, _ in itertools.islice(batches, num_batches):
            for model in models:
                model(x)
            for group in groups:
                per_model = [store[group] for store in captured]
                for writer in zip(*per_model):
                    if group not in accumulators:
                        accumulators[group] = _Accumulator(len(writer) * writer[0].shape[1], writer[0].device)
                    accumulators[group].add(writer)
                for features in per_model:
                    features.clear()
    if not accumulators:
        raise ValueError("feature_stats: no batches to read features from")
    stats = {group: acc.stats(len(models), graph.groups[group]) for group, acc in accumulators.items()}
    with torch.inference_mode(False):  # ordinary tensors for the caller (inference tensors refuse in-place updates)
        return {group: FeatureStats(s.num_models, s.units, s.count, s.sum.clone(), s.outer.clone())
                for group, s in stats.items()}


@contextmanager
def hooked_eval(models: Sequence[nn.Module], hooks: Iterable[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """``models`` in eval mode with forward hooks ``(model, module name, hook)`` registered; both undone on exit."""
    was_training = [model.training for model in models]
    # A hook marked ``reads_input`` runs before the module (its input, before an in-place activation overwrites it).
    handles = [model.get_submodule(name).register_forward_pre_hook(hook) if getattr(hook, "reads_input", False)
               else model.get_submodule(name).register_forward_hook(hook) for model, name, hook in hooks]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for model, mode in zip(models, was_training):
            model.train(mode)


def _capture(store: list[torch.Tensor], read_input: bool, dim: int = 1, start: int = 0, units: int | None = None):
    """A hook appending the module's output, or its first input (a forward pre-hook, copied: timm's activations
    work in place), with units ``start:start + units`` of axis ``dim`` moved to dim 1 (what the accumulators
    read: samples on dim 0, units on dim 1, positions after)."""
    def keep(features: torch.Tensor) -> None:
        features = features.detach()
        if units is not None and (start or units != features.shape[dim]):
            features = features.narrow(dim, start, units)
        store.append(features if dim in (1, 1 - features.ndim) else features.movedim(dim, 1))

    if read_input:
        def pre_hook(module, inputs):
            keep(inputs[0].clone())
        pre_hook.reads_input = True
        return pre_hook

    def hook(module, inputs, output):
        keep(output)
    return hook
