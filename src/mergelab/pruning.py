"""L1-magnitude pruning of a model's hidden weight layers, and keeping pruned weights at zero while retraining.

As in the OT-fusion generalisation study (pruning the parents before fusion), two kinds:

- ``unstructured``: in every hidden linear/conv weight, the ``fraction`` of entries with the smallest ``|w|``
  (``torch.nn.utils.prune.l1_unstructured``'s criterion);
- ``structured``: in every hidden layer, the ``fraction`` of output channels (conv filters, dense rows) with the
  smallest L1 norm (``ln_structured(n=1, dim=0)``'s criterion).

The classifier is never pruned (a structured prune would delete classes). Only weights are zeroed, as
``torch.nn.utils.prune`` does; biases and BatchNorm are left alone. Instead of torch's reparametrisation (which
renames state-dict keys to ``weight_orig``/``weight_mask`` and would change checkpoints), masks are applied in place
and :func:`freeze_pruned` masks the gradients: with zero weight, zero gradient and zero optimiser state, SGD (with
momentum and weight decay), Adam and AdamW all leave a pruned weight exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn

from mergelab.errors import UserError
from mergelab.models.graph import UnitGraph

KINDS = ("unstructured", "structured")


def prunable_weights(graph: UnitGraph) -> list[str]:
    """State-dict keys of the hidden linear/conv weights (every weight layer but the classifier)."""
    return [layer.keys[0] for layer in graph.layers if layer.kind in ("linear", "conv") and layer.out_group]


def l1_masks(state: dict[str, torch.Tensor], keys: list[str], fraction: float, kind: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing exactly ``round(fraction * count)`` entries (or output channels) per weight."""
    if kind not in KINDS:
        raise UserError(f"prune.type={kind} is not one of {', '.join(KINDS)}")
    if not 0 <= fraction < 1:
        raise UserError(f"prune.fraction must be in [0, 1), got {fraction}")
    masks = {}
    for key in keys:
        weight = state[key].detach()
        scores = weight.abs() if kind == "unstructured" else weight.abs().flatten(1).sum(1)
        count = round(fraction * scores.numel())
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=weight.device)
        keep[torch.topk(scores.flatten(), count, largest=False).indices] = False
        keep = keep.view(scores.shape)
        masks[key] = keep if kind == "unstructured" else keep.view(-1, *[1] * (weight.ndim - 1)).expand_as(weight)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries of ``model``'s weights in place."""
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        params[key].mul_(mask)


def freeze_pruned(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Gradient hooks that zero the pruned entries' gradients; returns the handles (``.remove()`` them after)."""
    params = dict(model.named_parameters())
    return [params[key].register_hook(lambda grad, mask=mask: grad * mask) for key, mask in masks.items()]


def sparsity(model: nn.Module, keys: list[str]) -> float:
    """Fraction of exactly-zero entries over the weights ``keys``."""
    params = dict(model.named_parameters())
    zeros = sum(int((params[k] == 0).sum()) for k in keys)
    return zeros / sum(params[k].numel() for k in keys)
