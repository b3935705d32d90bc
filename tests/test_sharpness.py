"""Hessian sharpness on a quadratic model, where every quantity has a closed form."""

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.sharpness import (Hessian, eigenvalue_density, hutchinson_trace, lanczos, perturbation_curve,
                                sharpness_report, top_eigenvalues)


def quadratic(dim=6, samples=40):
    """Least squares ``L(w) = mean (x^T w - y)^2``: Hessian ``2/N X^T X`` exactly, for every ``w``."""
    torch.manual_seed(0)
    x = torch.randn(samples, dim, dtype=torch.float64) * torch.linspace(0.3, 3, dim, dtype=torch.float64)
    y = torch.randn(samples, 1, dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]  # uneven batches: the mean must weight them by size
    hessian = Hessian(model, batches, loss_fn=F.mse_loss)
    return hessian, 2 * x.T @ x / samples, model, x, y


def test_top_eigenvalues_and_vector_match_the_analytic_hessian():
    hessian, exact, *_ = quadratic()
    eigenvalues, eigenvectors = torch.linalg.eigh(exact)
    values, vectors = top_eigenvalues(hessian, k=3, max_iter=500, tol=1e-12)
    torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), eigenvalues.flip(0)[:3], rtol=1e-6, atol=0)
    top = vectors[0][0].flatten()
    assert abs(top @ eigenvectors[:, -1]) > 1 - 1e-6


def test_hutchinson_trace_and_lanczos_nodes():
    hessian, exact, *_ = quadratic()
    estimate = hutchinson_trace(hessian, samples=400)
    assert abs(estimate - exact.trace().item()) < 0.1 * exact.trace().item()
    # Lanczos run for the full dimension reproduces the spectrum; its weights are a probability vector.
    nodes, weights = lanczos(hessian, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(nodes, torch.linalg.eigvalsh(exact), rtol=1e-8, atol=1e-10)
    assert abs(weights.sum().item() - 1) < 1e-10
    density = eigenvalue_density(hessian, steps=6, bins=400)
    grid, values = torch.tensor(density["grid"]), torch.tensor(density["values"])
    assert abs(torch.trapezoid(values, grid).item() - 1) < 1e-3  # a density integrates to 1


def test_loss_along_the_top_eigenvector_is_the_quadratic():
    hessian, exact, model, x, y = quadratic()
    values, vectors = top_eigenvalues(hessian, k=1, max_iter=500, tol=1e-12)
    u = vectors[0]
    w0 = model.weight.detach().clone()
    grad = (2 * x.T @ (x @ w0.T - y) / len(x)).flatten()
    curve = perturbation_curve(hessian, u, [-1.0, 0.0, 0.5, 2.0])
    base = hessian.loss()
    for alpha, loss in zip(curve["alphas"], curve["loss"]):
        expected = base + alpha * (grad @ u[0].flatten()).item() + 0.5 * values[0] * alpha ** 2
        assert abs(loss - expected) < 1e-9 * max(1, abs(expected))
    assert torch.equal(model.weight, w0)  # parameters restored


def test_report_schema_on_a_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(30, 4), torch.randint(0, 3, (30,)))]
    report = sharpness_report(model, batches, top_k=2, power_iters=20, trace_samples=3, lanczos_steps=5, points=5)
    assert set(report) == {"top_eigenvalues", "trace", "density", "perturbation"}
    assert len(report["top_eigenvalues"]) == 2 and abs(report["top_eigenvalues"][0]) >= abs(report["top_eigenvalues"][1]) - 1e-6
    assert len(report["perturbation"]["loss"]) == 5
