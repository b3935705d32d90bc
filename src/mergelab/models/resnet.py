"""ResNets for small images (He et al. 2016, "Deep Residual Learning for Image Recognition"): ResNet-20 of the CIFAR
section (Sec. 4.2) and the CIFAR variant of ResNet-18 (3x3 stem, no max-pool), with width multipliers as in ZipIt!
(Stoica et al. 2024) and Git Re-Basin (Ainsworth et al. 2023)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from mergelab.models.base import ImageClassifier


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


class BasicBlock(nn.Module):
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))`` with two 3x3 convolutions.

    The shortcut is the identity when the shape is kept, else a 1x1 strided convolution + norm (option B of He et
    al.), so every write into the residual stream is a weight layer the unit graph sees.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, batchnorm: bool, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(channels, batchnorm)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.bn2 = _norm(channels, batchnorm)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, channels, 1, stride=stride, bias=bias),
                bn=_norm(channels, batchnorm)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(ImageClassifier):
    """``conv1`` (3x3) + ``bn1`` + ``relu``, stages ``layer1..layerN`` of :class:`BasicBlock` (the first block of
    every stage after the first halves the resolution), global average pooling, ``fc``.

    ``batchnorm=False`` puts ``nn.Identity`` where the BatchNorms were (no state-dict keys). ``bias=None`` gives
    convolutions a bias exactly when no BatchNorm follows, and ``fc`` always; ``True``/``False`` switch every bias.
    PyTorch's default initialisation.
    """

    classifier_name = "fc"

    def __init__(self, widths: Sequence[int], blocks: int, *, arch: str, num_classes: int, in_channels: int,
                 image_size: int, batchnorm: bool = True, bias: bool | None = None):
        super().__init__()
        self.arch = arch
        self.input_size = (in_channels, image_size, image_size)
        self.num_stages = len(widths)
        conv_bias = (not batchnorm) if bias is None else bias
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=conv_bias)
        self.bn1 = _norm(widths[0], batchnorm)
        self.relu = nn.ReLU()
        channels = widths[0]
        for stage, width in enumerate(widths, 1):
            stride = 1 if stage == 1 else 2
            setattr(self, f"layer{stage}", nn.Sequential(*(
                BasicBlock(channels if b == 0 else width, width, stride if b == 0 else 1, batchnorm, conv_bias)
                for b in range(blocks))))
            channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=True if bias is None else bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.pool(x).flatten(1)


def _widths(base: Sequence[int], width: float) -> list[int]:
    return [max(1, round(c * width)) for c in base]


def resnet20(*, num_classes: int, in_channels: int, image_size: int, width: float = 1, batchnorm: bool = True,
             bias: bool | None = None) -> ResNet:
    """ResNet-20: 3 stages x 3 blocks of 16/32/64 channels times ``width`` (ZipIt! uses 1, 4, 8, 16).

    Global pooling takes any ``image_size``; it is kept as the size the unit graph is traced with.
    """
    return ResNet(_widths((16, 32, 64), width), 3, arch="resnet20", num_classes=num_classes,
                  in_channels=in_channels, image_size=image_size, batchnorm=batchnorm, bias=bias)


def resnet18(*, num_classes: int, in_channels: int, image_size: int, width: float = 1, batchnorm: bool = True,
             bias: bool | None = None) -> ResNet:
    """CIFAR ResNet-18: 3x3 stem without max-pool, 4 stages x 2 blocks of 64/128/256/512 channels times ``width``.

    Global pooling takes any ``image_size``; it is kept as the size the unit graph is traced with.
    """
    return ResNet(_widths((64, 128, 256, 512), width), 2, arch="resnet18", num_classes=num_classes,
                  in_channels=in_channels, image_size=image_size, batchnorm=batchnorm, bias=bias)
