"""Learning-rate schedules, each with a linear warm-up, stepped once per optimiser step.

Every schedule is a ``torch.optim.lr_scheduler.LambdaLR`` whose factor multiplies the optimiser's base learning
rate. They are built from config as ``instantiate(cfg.scheduler, optimizer=..., total_steps=..., steps_per_epoch=...)``.
``warmup`` is a fraction of all steps when below 1, else a number of steps; the factor rises linearly from
``1 / (warmup_steps + 1)`` to 1 over it, then follows the schedule's body, whose progress is measured from the
first step after warm-up. Every schedule takes ``steps_per_epoch`` (only ``step_effnet`` needs it) and nothing else,
so a misspelt option is refused rather than ignored.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(warmup: float, total_steps: int) -> int:
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def with_warmup(optimizer: Optimizer, total_steps: int, warmup: float, body: Callable[[int, int], float]) -> LambdaLR:
    """A LambdaLR: linear warm-up over ``warmup`` steps, then ``body(step_after_warmup, steps_after_warmup)``."""
    n_warm = min(warmup_steps(warmup, total_steps), max(total_steps - 1, 0))
    n_body = max(total_steps - n_warm, 1)

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / (n_warm + 1)
        return body(step - n_warm, n_body)

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, steps_per_epoch: int = 0) -> LambdaLR:
    return with_warmup(optimizer, total_steps, warmup, lambda s, n: 1.0)


def cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, min_factor: float = 0.0,
           steps_per_epoch: int = 0) -> LambdaLR:
    """Cosine decay from the base rate to ``min_factor`` times it (Loshchilov & Hutter, 2017, no restarts)."""
    return with_warmup(
        optimizer, total_steps, warmup,
        lambda s, n: min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * s / n)),
    )


def linear(optimizer: Optimizer, total_steps: int, warmup: float = 0.0, min_factor: float = 0.0,
           steps_per_epoch: int = 0) -> LambdaLR:
    """Linear decay from the base rate to ``min_factor`` times it."""
    return with_warmup(optimizer, total_steps, warmup, lambda s, n: 1 - (1 - min_factor) * s / n)


def multistep_he(
    optimizer: Optimizer, total_steps: int, warmup: float = 0.0,
    milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1, steps_per_epoch: int = 0,
) -> LambdaLR:
    """Divide by 10 at 50% and 75% of training (He et al., 2016, CIFAR ResNets)."""
    return with_warmup(
        optimizer, total_steps, warmup,
        lambda s, n: gamma ** sum(s >= m * n for m in milestones),
    )


def step_effnet(
    optimizer: Optimizer, total_steps: int, steps_per_epoch: int, warmup: float = 0.0,
    gamma: float = 0.97, every_epochs: float = 2.0,
) -> LambdaLR:
    """Multiply by 0.97 every 2 epochs (Tan & Le, 2019, EfficientNet)."""
    period = max(int(round(every_epochs * steps_per_epoch)), 1)
    return with_warmup(optimizer, total_steps, warmup, lambda s, n: gamma ** (s // period))
