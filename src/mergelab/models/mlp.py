"""MLPNet: the multilayer perceptron of OT fusion (Singh & Jaggi 2020, "Model Fusion via Optimal Transport", Sec. 5)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mergelab.models.base import ImageClassifier


class MLPNet(ImageClassifier):
    """Flatten -> ``fc{i}`` + ``relu{i}`` for each hidden size -> ``classifier``.

    ``hidden``: hidden layer sizes (the paper's 400, 200, 100 by default); ``bias`` switches every layer's bias (the
    fusion paper's no-bias variant is ``bias=False``). PyTorch's default initialisation.
    """

    arch = "mlpnet"
    classifier_name = "classifier"

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int,
                 hidden: Sequence[int] = (400, 200, 100), bias: bool = True):
        super().__init__()
        self.depth = len(hidden)
        self.input_size = (in_channels, image_size, image_size)
        width = in_channels * image_size * image_size
        for i, size in enumerate(hidden, 1):
            setattr(self, f"fc{i}", nn.Linear(width, size, bias=bias))
            setattr(self, f"relu{i}", nn.ReLU())
            width = size
        self.classifier = nn.Linear(width, num_classes, bias=bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return x
