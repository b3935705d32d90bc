"""Evaluation: logits, accuracy and loss of a model on a split, and BatchNorm statistics recomputation."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def predict(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` in eval mode over every batch, concatenated (on the model's device)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``logits`` against ``labels``."""
    return (logits.argmax(1) == labels).double().mean().item() * 100


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy."""
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item() * 100,
        "loss": F.cross_entropy(logits, labels).item(),
    }


def evaluate(model: nn.Module, batches: Batches) -> dict[str, float]:
    return metrics_from_logits(*predict(model, batches))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Batches) -> nn.Module:
    """Recompute every BatchNorm's running statistics for the current weights, in place.

    Statistics are reset and re-estimated as an equal-weight average over the batches (``momentum=None``), exactly
    as ``torch.optim.swa_utils.update_bn`` does; averaged or merged weights need this because averaged running
    statistics do not describe the averaged network's activations. A model without BatchNorm is returned as is.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for x, _ in batches:
        model(x)
    for m in norms:
        m.momentum = momenta[m]
    model.train(was_training)
    return model
