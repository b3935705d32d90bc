"""Sharpness of a model's loss surface from Hessian-vector products (autograd double backward, no explicit Hessian).

The OT-fusion generalisation study compares parents and fused models by:
- the top eigenvalues: power iteration with deflation (Yao et al. 2020, "PyHessian", Sec. 3.1);
- the trace: Hutchinson's estimator ``E_v[v^T H v]`` with Rademacher ``v`` (Hutchinson 1989; PyHessian Alg. 2);
- the eigenvalue density: stochastic Lanczos quadrature (Ghorbani et al. 2019, Sec. 2; Lin et al. 2016): Lanczos
  from random unit vectors gives Ritz values ``theta_k`` and weights ``tau_k`` (squared first components of the
  tridiagonal's eigenvectors); the density is ``mean_runs sum_k tau_k N(x; theta_k, sigma^2)``;
- the loss along the top eigenvector: ``L(theta + alpha u_1)`` over a grid of ``alpha``.

The loss is the mean cross-entropy (or ``loss_fn``) over fixed batches, the model in eval mode (BatchNorm uses its
running statistics, so the function is deterministic). Every vector is a list of tensors shaped like the parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Vector = list[torch.Tensor]


def _dot(u: Vector, v: Vector) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(u, v))


def _scale(v: Vector, c) -> Vector:
    return [x * c for x in v]


def _axpy(a, x: Vector, y: Vector) -> Vector:
    """``a x + y``."""
    return [a * xi + yi for xi, yi in zip(x, y)]


def _normalise(v: Vector) -> Vector:
    return _scale(v, 1 / _dot(v, v).sqrt().clamp_min(1e-30))


class Hessian:
    """Hessian-vector products of the mean loss of ``model`` over ``batches`` w.r.t. its parameters."""

    def __init__(self, model: nn.Module, batches: Iterable, loss_fn: Callable = F.cross_entropy):
        self.model, self.loss_fn = model, loss_fn
        self.batches = list(batches)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.count = sum(len(y) for _, y in self.batches)

    def loss(self) -> float:
        """Mean loss over the batches."""
        with torch.no_grad():
            return sum(self.loss_fn(self._forward(x), y).item() * len(y) for x, y in self.batches) / self.count

    def _forward(self, x):
        self.model.eval()
        return self.model(x)

    def hvp(self, v: Vector) -> Vector:
        """``H v``, accumulated batch by batch (each batch weighted by its size)."""
        total = [torch.zeros_like(p) for p in self.params]
        for x, y in self.batches:
            loss = self.loss_fn(self._forward(x), y) * (len(y) / self.count)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            hv = torch.autograd.grad(grads, self.params, grad_outputs=v)
            total = [t + h.detach() for t, h in zip(total, hv)]
        return total

    def random_vector(self, generator: torch.Generator, rademacher: bool = False) -> Vector:
        out = []
        for p in self.params:
            r = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            out.append(r.sign() if rademacher else r)
        return out


def top_eigenvalues(hessian: Hessian, k: int = 1, *, max_iter: int = 100, tol: float = 1e-4,
                    seed: int = 0) -> tuple[list[float], list[Vector]]:
    """The ``k`` eigenvalues of largest magnitude and their eigenvectors, by power iteration with deflation."""
    generator = torch.Generator().manual_seed(seed)
    values: list[float] = []
    vectors: list[Vector] = []
    for _ in range(k):
        v = _normalise(hessian.random_vector(generator))
        value = None
        for _ in range(max_iter):
            for u in vectors:  # keep v orthogonal to the eigenvectors already found
                v = _axpy(-_dot(u, v), u, v)
            hv = hessian.hvp(v)
            for lam, u in zip(values, vectors):
                hv = _axpy(-lam * _dot(u, v), u, hv)
            new = _dot(v, hv).item()
            v = _normalise(hv)
            if value is not None and abs(new - value) <= tol * (abs(value) + 1e-12):
                value = new
                break
            value = new
        values.append(value)
        vectors.append(v)
    return values, vectors


def hutchinson_trace(hessian: Hessian, samples: int = 20, seed: int = 0) -> float:
    """``mean_v v^T H v`` over ``samples`` Rademacher vectors (an unbiased estimate of ``tr H``)."""
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(samples):
        v = hessian.random_vector(generator, rademacher=True)
        estimates.append(_dot(v, hessian.hvp(v)).item())
    return sum(estimates) / len(estimates)


def lanczos(hessian: Hessian, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values and quadrature weights of ``steps`` Lanczos iterations (full reorthogonalisation) from a random
    unit vector."""
    basis = [_normalise(hessian.random_vector(generator))]
    alphas, betas = [], []
    for j in range(steps):
        w = hessian.hvp(basis[j])
        alpha = _dot(w, basis[j])
        alphas.append(alpha.item())
        for q in basis:  # full reorthogonalisation keeps spurious copies of converged Ritz values away
            w = _axpy(-_dot(w, q), q, w)
        beta = _dot(w, w).sqrt()
        if j == steps - 1 or beta < 1e-10:
            break
        betas.append(beta.item())
        basis.append(_scale(w, 1 / beta))
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas, dtype=torch.float64)
    tri += torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(tri)
    return nodes, vecs[0].square()


def eigenvalue_density(hessian: Hessian, *, runs: int = 1, steps: int = 30, bins: int = 200, sigma: float | None = None,
                       seed: int = 0) -> dict[str, list[float]]:
    """Stochastic Lanczos quadrature: the spectral density on a grid, Gaussian-smoothed with width ``sigma``
    (default 1% of the spectrum's range)."""
    generator = torch.Generator().manual_seed(seed)
    quadratures = [lanczos(hessian, steps, generator) for _ in range(runs)]
    nodes = torch.cat([n for n, _ in quadratures])
    low, high = nodes.min().item(), nodes.max().item()
    span = max(high - low, 1e-12)
    sigma = sigma or 0.01 * span
    grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, bins, dtype=torch.float64)
    density = torch.zeros_like(grid)
    for theta, tau in quadratures:
        kernel = torch.exp(-((grid[:, None] - theta[None, :]) ** 2) / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
        density += kernel @ tau / runs
    return {"grid": grid.tolist(), "values": density.tolist()}


@torch.no_grad()
def perturbation_curve(hessian: Hessian, direction: Vector, alphas: Sequence[float]) -> dict[str, list[float]]:
    """``L(theta + alpha u)`` for each ``alpha``; the parameters are restored afterwards."""
    originals = [p.detach().clone() for p in hessian.params]
    losses = []
    try:
        for alpha in alphas:
            for p, p0, u in zip(hessian.params, originals, direction):
                p.copy_(p0 + alpha * u)
            losses.append(hessian.loss())
    finally:
        for p, p0 in zip(hessian.params, originals):
            p.copy_(p0)
    return {"alphas": [float(a) for a in alphas], "loss": losses}


def sharpness_report(model: nn.Module, batches: Iterable, *, top_k: int = 3, power_iters: int = 50,
                     trace_samples: int = 20, lanczos_steps: int = 30, density_runs: int = 1,
                     radius: float = 1.0, points: int = 21, seed: int = 0) -> dict:
    """``{top_eigenvalues, trace, density: {grid, values}, perturbation: {alphas, loss}}`` for results.json."""
    hessian = Hessian(model, batches)
    values, vectors = top_eigenvalues(hessian, top_k, max_iter=power_iters, seed=seed)
    alphas = torch.linspace(-radius, radius, points, dtype=torch.float64).tolist()
    return {
        "top_eigenvalues": values,
        "trace": hutchinson_trace(hessian, trace_samples, seed=seed),
        "density": eigenvalue_density(hessian, runs=density_runs, steps=lanczos_steps, seed=seed),
        "perturbation": perturbation_curve(hessian, vectors[0], alphas),
    }
