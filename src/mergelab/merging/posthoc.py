"""Post-hoc EMA: any averaging length after training, from snapshots of two power-function EMAs.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), Sec. 3 and
Appendix C. A *power-function EMA* with exponent ``gamma`` averages the weights seen up to step ``t`` with the
profile ``p_{t,gamma}(s) = (gamma + 1) s^gamma / t^(gamma + 1)`` on ``0 <= s <= t`` (Eq. 3's continuous form).
Its width relative to its age is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (the profile's
standard deviation divided by ``t``), which the paper uses as the knob; ``gamma`` follows from ``sigma_rel`` as
the largest real root of the cubic ``gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0``
(Algorithm 2). ``sigma_rel = 0.05`` is ``gamma = 16.97``, ``0.10`` is ``gamma = 6.94``.

Tracking during training is an EMA whose decay grows with the step count: after step ``t`` (1-based),
``shadow <- beta_t shadow + (1 - beta_t) w_t`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` (Eq. 127 with one step per
update). The recursion telescopes: the weight of ``w_tau`` in the average after step ``t`` is
``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)``, which is exactly ``p_{t,gamma}`` integrated over
``[tau - 1, tau]``. So a tracked average *is* the continuous profile applied to the step-wise constant weight
trajectory, and the paper's continuous inner products below are exact for it, however few steps a run has.

Reconstruction (Algorithm 3): snapshots ``i`` of profiles ``(t_i, gamma_i)`` are combined with coefficients ``x``
that minimise ``|| sum_i x_i p_i - p_target ||^2`` in L2: the normal equations ``A x = b`` with
``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_target>``, in closed form (Eq. 151). As in the EDM2 reference code
(``training/phema.py``), the coefficients are then rescaled to sum to 1, so a constant trajectory is reproduced
exactly. We solve with least squares (``numpy.linalg.lstsq``) rather than ``solve``: identical for a well-posed
system, and the minimum-norm solution when dense snapshots make ``A`` numerically singular.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma = 0: the uniform average of everything so far


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent ``gamma`` (Eq. 123)."""
    gamma = float(gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma > 0`` whose profile has relative width ``sigma_rel`` (Eq. 126, Algorithm 2).

    ValueError outside ``(0, sqrt(1/12))``: wider profiles than the uniform average (gamma = 0) are not power
    functions with a positive exponent.
    """
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    inv = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def decay_to_sigma_rel(decay: float, steps: int) -> float:
    """The sigma_rel at step ``steps`` of a classic EMA with per-step ``decay``: the standard deviation of its
    geometric profile, ``sqrt(decay) / (1 - decay)`` steps, divided by ``steps``. Two averages of one width, not of
    one shape (exponential against power function); this places the classic decays on the sigma_rel axis."""
    return math.sqrt(decay) / (1.0 - decay) / steps


def power_ema_weight(gamma: float, t: int, every: int = 1) -> float:
    """The lerp weight ``1 - beta`` of the update after ``t`` optimiser steps (1-based), folding in the weights
    every ``every`` steps: ``1 - (1 - every / t)^(gamma + 1)`` (Eq. 127); it is 1 at the first update."""
    return 1.0 - (1.0 - every / t) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """``<p_{t_a,gamma_a}, p_{t_b,gamma_b}>`` in L2 over time (Eq. 151), elementwise over broadcast arrays.

    ``integral_0^min(t_a,t_b) (ga+1)(gb+1) s^(ga+gb) ds / (t_a^(ga+1) t_b^(gb+1))``; written with the ratio of the
    two ages so that large steps and exponents do not overflow.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.where(t_a <= t_b, (t_a / t_b) ** gamma_b, (t_b / t_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(in_steps: Sequence[float], in_gammas: Sequence[float],
                       out_steps: Sequence[float], out_gammas: Sequence[float]) -> np.ndarray:
    """Least-squares coefficients ``X[i, j]`` of snapshot ``i`` in reconstruction ``j`` (Algorithm 3).

    Snapshot ``i`` is the power-function EMA with exponent ``in_gammas[i]`` at step ``in_steps[i]``; output ``j``
    the one with ``out_gammas[j]`` at ``out_steps[j]``. Columns sum to 1.
    """
    col = lambda v: np.asarray(v, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    row = lambda v: np.asarray(v, dtype=np.float64).reshape(1, -1)  # noqa: E731
    gram = profile_inner(col(in_steps), col(in_gammas), row(in_steps), row(in_gammas))
    rhs = profile_inner(col(in_steps), col(in_gammas), row(out_steps), row(out_gammas))
    coefs = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return coefs / coefs.sum(axis=0, keepdims=True)


@torch.no_grad()
def combine(snapshots: Iterable[Mapping[str, torch.Tensor]], coefs: np.ndarray,
            chunk: int = 16) -> list[dict[str, torch.Tensor]]:
    """``out_j = sum_i coefs[i, j] snapshot_i`` for every column ``j``, streaming ``chunk`` snapshots at a time.

    Each snapshot's floating-point tensors are read as one float64 vector; every ``chunk`` of them is folded into
    all outputs by one matrix product (``acc += coefs[chunk].T @ vectors``), so the accumulator is read once per
    chunk, not once per snapshot. Float64 because coefficients of dense snapshots alternate in sign and can be
    large. Memory: ``(outputs + chunk) x parameters`` float64 values. Outputs are cast back to the snapshot's
    dtypes; integer tensors (``num_batches_tracked``) come from the last snapshot, which the caller orders by step.
    """
    coefs = torch.as_tensor(np.asarray(coefs, dtype=np.float64))
    total: torch.Tensor | None = None
    pending: list[torch.Tensor] = []
    last: Mapping[str, torch.Tensor] = {}
    count = 0

    def fold() -> None:
        block = coefs[count - len(pending):count].to(pending[0].device)
        total.addmm_(block.T, torch.stack(pending))
        pending.clear()

    for state in snapshots:
        if count >= coefs.shape[0]:
            raise ValueError(f"more snapshots than the {coefs.shape[0]} rows of coefficients")
        pending.append(torch.cat([v.reshape(-1).double() for v in state.values() if v.is_floating_point()]))
        if total is None:
            total = torch.zeros(coefs.shape[1], pending[0].numel(), dtype=torch.float64, device=pending[0].device)
        last, count = state, count + 1
        if len(pending) == chunk:
            fold()
    if pending:
        fold()
    if total is None or count != coefs.shape[0]:
        raise ValueError(f"{count} snapshots for {coefs.shape[0]} rows of coefficients")
    keys = [k for k, v in last.items() if v.is_floating_point()]
    outs = []
    for row in total:
        parts = dict(zip(keys, row.split([last[k].numel() for k in keys])))
        outs.append({k: parts[k].view_as(v).to(v.dtype) if k in parts else v.clone() for k, v in last.items()})
    return outs
