"""Loss barrier along the straight line between two models (Frankle et al. 2020, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis"; Entezari et al. 2022, Eq. 1): ``B = max_alpha L((1-alpha) A + alpha B)
- ((1-alpha) L(A) + alpha L(B))``. Measured before and after aligning B to A, it shows what alignment buys.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from mergelab.merging.soups import interpolate

State = Mapping[str, torch.Tensor]


def barrier_height(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """Largest excess of the loss over the straight line between the two end points' losses."""
    start, end = losses[0], losses[-1]
    return max(loss - ((1 - a) * start + a * end) for a, loss in zip(alphas, losses))


def interpolation_curve(state_a: State, state_b: State, points: int,
                        evaluate: Callable[[dict[str, torch.Tensor]], dict[str, float]]) -> dict:
    """``{alphas, loss, acc, height}`` for ``points`` evenly spaced ``alpha`` in [0, 1]; ``evaluate(state)`` returns
    ``{"loss", "acc"}`` (the caller loads the state, recalibrates BatchNorm if asked, and picks the split)."""
    if points < 2:
        raise ValueError(f"a barrier needs at least 2 points, got {points}")
    alphas = torch.linspace(0, 1, points, dtype=torch.float64).tolist()
    results = [evaluate(interpolate(state_a, state_b, alpha)) for alpha in alphas]
    losses = [r["loss"] for r in results]
    return {"alphas": alphas, "loss": losses, "acc": [r["acc"] for r in results],
            "height": barrier_height(alphas, losses)}
