"""Optimal-transport fusion (Singh & Jaggi 2020, "Model Fusion via Optimal Transport", NeurIPS; Sec. 4, Algorithm 1).

Model B is aligned to model A (the anchor) unit group by unit group, in forward order. For a group written by a
layer with input plan ``T~_in``:

1. past correction (Sec. 4.1): B's incoming weights are re-expressed in A's input units, ``W^_B = W_B T~_in``;
2. ground metric ``M[i, j]`` between B's unit ``i`` and A's unit ``j``: distance between their incoming weight rows
   (``alignment=weights``) or between their activation vectors on the same inputs (``alignment=activations``);
   Euclidean or cosine, squared or not, optionally normalised by its max/mean/median;
3. marginals ``alpha`` (B) and ``beta`` (A): uniform, or proportional to the units' incoming weight norms;
4. plan ``T = argmin <T, M>`` s.t. ``T 1 = alpha, T^T 1 = beta``: exact EMD (``ot.emd``) or entropic (``ot.sinkhorn``
   in the log domain, so that small ``reg`` does not underflow);
5. ``rescale_plan`` (the reference's ``--correction``): ``T~ = T diag(1/beta)``, so every A unit receives a convex
   combination of B units and an equal-width permutation plan becomes a permutation matrix; without it ``T~ = T``
   (the reference code's default, which scales the aligned weights by the marginals).

Every axis of every tensor of B indexed by a group is then contracted with that group's ``T~`` (by the merge
engine's one weight code, :class:`~mergelab.merging.engine.Plan`): output rows ``T~^T W``, inputs ``W T~``,
BatchNorm vectors ``T~^T v``. Groups tied by the unit graph (a ResNet's residual stream,
a layer's BatchNorm) share one plan. A stream's weight metric is built from every writer whose inputs are already
aligned when the stream is first met (the first block of the stage and its shortcut; later blocks read the stream
itself); its activation metric uses every writer's activations. Everything is computed in float64.
A plan whose marginals are not met (Sinkhorn stopped before converging, NaN weights) raises
:class:`UserError` naming the layer: never a silently wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import ot
import torch
from torch import nn

from mergelab.errors import UserError
from mergelab.merging.engine import Plan
from mergelab.merging.features import FeatureStats
from mergelab.models.graph import Group, Layer, UnitGraph

State = Mapping[str, torch.Tensor]

METRICS = ("euclidean", "cosine")
NORMALIZE = ("none", "max", "mean", "median")
SOLVERS = ("emd", "sinkhorn")
MARGINALS = ("uniform", "norm")


def check_options(*, alignment: str, ground_metric: str, normalize: str, solver: str, marginals: str,
                  reg: float) -> None:
    """UserError naming the first unknown option."""
    for name, value, allowed in (("alignment", alignment, ("weights", "activations")),
                                 ("ground_metric", ground_metric, METRICS), ("normalize", normalize, NORMALIZE),
                                 ("solver", solver, SOLVERS), ("marginals", marginals, MARGINALS)):
        if value not in allowed:
            raise UserError(f"merge.{name}={value} is not one of {', '.join(allowed)}")
    if solver == "sinkhorn" and not reg > 0:
        raise UserError(f"merge.reg must be positive for the Sinkhorn solver, got {reg}")


def contract(tensor: torch.Tensor, axis: int, plan: torch.Tensor) -> torch.Tensor:
    """``tensor`` with axis ``axis`` (B's units) mapped to A's units: ``new[..., j, ...] = sum_i plan[i, j] old[..., i, ...]``."""
    return (tensor.movedim(axis, -1) @ plan).movedim(-1, axis)


def weight_rows(layer: Layer, state: State, graph: UnitGraph, plans: Mapping[Group, torch.Tensor]) -> torch.Tensor:
    """The incoming weights of ``layer``'s output units as rows (float64), inputs past-corrected by their plan."""
    weight = state[layer.keys[0]].detach().double().cpu()
    if layer.in_group is not None and layer.in_group in plans:
        weight = contract(weight, 1, plans[layer.in_group])
    return weight.reshape(weight.shape[0], -1)


def weight_cost(rows_b: torch.Tensor, rows_a: torch.Tensor, metric: str, squared: bool) -> torch.Tensor:
    """Ground metric between weight rows: ``M[i, j] = d(B_i, A_j)``."""
    if metric == "cosine":
        return 1 - _unit(rows_b) @ _unit(rows_a).T
    distance = torch.cdist(rows_b, rows_a)
    return distance.square() if squared else distance


def activation_cost(stats: FeatureStats, b: int, a: int, metric: str, squared: bool) -> torch.Tensor:
    """Ground metric between activation vectors over the sampled inputs, from second moments (no samples x units x
    units tensor): Euclidean ``||f_b,i - f_a,j||`` or cosine ``1 - <f_b,i, f_a,j> / (||f_b,i|| ||f_a,j||)``."""
    if metric == "cosine":
        gram = stats.outer
        norm_b = stats.block(b, b, gram).diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
        norm_a = stats.block(a, a, gram).diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
        return 1 - stats.block(b, a, gram) / torch.outer(norm_b, norm_a)
    squared_distance = stats.sq_distances(b, a)
    return squared_distance if squared else squared_distance.sqrt()


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def normalise_cost(cost: torch.Tensor, how: str) -> torch.Tensor:
    """The ground metric divided by its max, mean or median (the reference's ``ground_metric_normalize``)."""
    if how == "none":
        return cost
    scale = {"max": cost.max(), "mean": cost.mean(), "median": cost.median()}[how]
    return cost / scale if scale > 0 else cost


def marginal(rows: torch.Tensor, how: str) -> np.ndarray:
    """Uniform mass ``1/n``, or mass proportional to each unit's incoming weight norm (float64, sums to 1)."""
    n = rows.shape[0]
    if how == "uniform":
        return np.full(n, 1.0 / n)
    norms = rows.norm(dim=1).numpy()
    return norms / norms.sum() if norms.sum() > 0 else np.full(n, 1.0 / n)


def solve_plan(alpha: np.ndarray, beta: np.ndarray, cost: torch.Tensor, *, solver: str, reg: float,
               max_iter: int, tol: float, where: str) -> torch.Tensor:
    """The transport plan (n_B x n_A, float64), checked: NaN or marginals missed by more than ``tol`` in total
    variation raise a UserError naming ``where``."""
    cost_np = cost.numpy()
    if solver == "emd":
        plan = ot.emd(alpha, beta, cost_np, numItermax=max(max_iter, 100_000))
    else:
        # Log-domain iterations: the kernel exp(-M/reg) underflows to 0 for small reg in the plain algorithm.
        plan = ot.sinkhorn(alpha, beta, cost_np, reg, method="sinkhorn_log", numItermax=max_iter, warn=False)
    plan = np.asarray(plan, dtype=np.float64)
    error = np.abs(plan.sum(1) - alpha).sum() + np.abs(plan.sum(0) - beta).sum()
    if not np.isfinite(plan).all() or not error <= tol:
        hint = (f"raise merge.max_iter (now {max_iter}) or merge.reg (now {reg}), or use merge.solver=emd"
                if solver == "sinkhorn" else "check the models for NaN weights")
        raise UserError(f"degenerate OT plan for {where}: marginal error {error:.3g} (not converged, or NaN); "
                        f"{hint}")
    return torch.from_numpy(plan)


def transport_plans(graph: UnitGraph, state_a: State, state_b: State, *, alignment: str = "weights",
                    stats: Mapping[Group, FeatureStats] | None = None, a: int = 0, b: int = 1,
                    ground_metric: str = "euclidean", squared: bool = False, normalize: str = "none",
                    solver: str = "emd", reg: float = 0.01, marginals: str = "uniform", rescale_plan: bool = True,
                    past_correction: bool = True, max_iter: int = 1000, tol: float = 1e-3
                    ) -> dict[Group, torch.Tensor]:
    """``{group: T~}`` (n_B x n_A, float64) aligning model B to model A (steps 1-5 of the module docstring).

    ``stats`` (with ``a`` and ``b`` the two models' indices in them) are required for ``alignment=activations``.
    ``past_correction=False`` measures B's weights in its own input units (the paper's ablation).
    """
    check_options(alignment=alignment, ground_metric=ground_metric, normalize=normalize, solver=solver,
                  marginals=marginals, reg=reg)
    if alignment == "activations" and stats is None:
        raise ValueError("alignment=activations needs feature statistics")
    plans: dict[Group, torch.Tensor] = {}
    for layer in graph.layers:
        group = layer.out_group
        if layer.kind == "bn" or group is None or group in plans:
            continue
        writers = [w for w in graph.layers if w.out_group == group and w.kind != "bn"
                   and (w.in_group is None or w.in_group in plans)]
        corrected = plans if past_correction else {}
        rows_a = torch.cat([weight_rows(w, state_a, graph, {}) for w in writers], 1)
        rows_b = torch.cat([weight_rows(w, state_b, graph, corrected) for w in writers], 1)
        if alignment == "weights":
            cost = weight_cost(rows_b, rows_a, ground_metric, squared)
        else:
            cost = activation_cost(stats[group], b, a, ground_metric, squared)
        cost = normalise_cost(cost, normalize)
        alpha, beta = marginal(rows_b, marginals), marginal(rows_a, marginals)
        plan = solve_plan(alpha, beta, cost, solver=solver, reg=reg, max_iter=max_iter, tol=tol,
                          where=f"unit group {group} (layer {layer.name})")
        plans[group] = plan / torch.from_numpy(beta)[None, :] if rescale_plan else plan
    return plans


@dataclass(frozen=True)
class OTFusion:
    """``merge=ot``: every model aligned to the anchor by :func:`transport_plans`, as one :class:`Plan` per group
    (the anchor's map is the identity); the engine averages with the fusion weights, ``sum_k w_k T~_k^T W_k T~_k``.
    ``where``/``num_samples``: activations read for ``alignment=activations``. The other options are those of
    :func:`transport_plans`."""

    alignment: str = "weights"
    where: str = "pre"
    num_samples: int | None = 200
    ground_metric: str = "euclidean"
    squared: bool = False
    normalize: str = "none"
    solver: str = "emd"
    reg: float = 0.01
    marginals: str = "uniform"
    rescale_plan: bool = True
    past_correction: bool = True
    max_iter: int = 1000
    tol: float = 1e-3
    name: str = "ot"

    def __post_init__(self):
        check_options(alignment=self.alignment, ground_metric=self.ground_metric, normalize=self.normalize,
                      solver=self.solver, marginals=self.marginals, reg=self.reg)

    @property
    def features(self) -> str | None:
        return self.where if self.alignment == "activations" else None

    @property
    def label(self) -> str:
        return f"{self.name}-{self.alignment}-{self.solver}"

    def match(self, graph: UnitGraph, models: Sequence[nn.Module], stats, anchor: int) -> dict[Group, Plan]:
        states = [m.state_dict() for m in models]
        options = {k: getattr(self, k) for k in ("alignment", "ground_metric", "squared", "normalize", "solver",
                                                 "reg", "marginals", "rescale_plan", "past_correction", "max_iter",
                                                 "tol")}
        plans = [None if k == anchor else transport_plans(graph, states[anchor], state, stats=stats, a=anchor, b=k,
                                                          **options)
                 for k, state in enumerate(states)]
        return {group: Plan(tuple(None if p is None else p[group] for p in plans), n)
                for group, n in graph.groups.items()}
