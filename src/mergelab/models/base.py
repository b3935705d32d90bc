"""The contract every mergelab model keeps: a feature/head seam, a named classifier, a family name, a unit graph."""

from __future__ import annotations

import torch
from torch import nn

from mergelab.errors import UserError

ALIGNABLE = ("mlpnet", "vgg11", "resnet20", "resnet18")


class ImageClassifier(nn.Module):
    """Base of every mergelab model.

    ``forward(x) == forward_head(forward_features(x))``: ``forward_features`` maps images to the pooled feature
    vector, ``forward_head`` applies the classifier, the ``nn.Linear`` at ``get_submodule(classifier_name)``; so
    heads can be swapped, shared or zeroed (model soups) and replaced per task (ZipIt!) with ``set_submodule``.
    ``arch`` names the family (``resnet20``, ``timm:resnet10t``...).
    """

    arch: str
    classifier_name: str

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier by a freshly initialised one with ``num_classes`` outputs (same bias setting)."""
        old = self.get_classifier()
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        self.set_submodule(self.classifier_name, new.to(old.weight.device, old.weight.dtype))

    def unit_graph(self):
        """The model's :class:`~mergelab.models.graph.UnitGraph`; families without one raise :class:`UserError`."""
        raise UserError(f"merging by alignment supports {', '.join(ALIGNABLE)}; got {self.arch} "
                        "(use a soup or an average for it, or pick one of those models)")
