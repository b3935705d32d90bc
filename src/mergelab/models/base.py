"""The contract every mergelab model keeps: a feature/head seam, a named classifier, a family name, an input size."""

from __future__ import annotations

import torch
from torch import nn



class ImageClassifier(nn.Module):
    """Base of every mergelab model.

    ``forward(x) == forward_head(forward_features(x))``: ``forward_features`` maps images to the pooled feature
    vector, ``forward_head`` applies the classifier, the ``nn.Linear`` at ``get_submodule(classifier_name)``; so
    heads can be swapped, shared or zeroed (model soups) and replaced per task (ZipIt!) with ``set_submodule``.
    ``arch`` names the family (``resnet20``, ``timm:resnet10t``...); ``input_size`` is ``(channels, height, width)``
    of the images it was built for (what tracing its unit graph feeds it).
    """

    arch: str
    classifier_name: str
    input_size: tuple[int, int, int]

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
