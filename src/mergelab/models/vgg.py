"""VGG for small images (Simonyan & Zisserman 2015), as used by OT fusion (Singh & Jaggi 2020) and ZipIt! (Stoica et
al. 2024): 3x3 convolutions with padding 1, max-pools, global pooling, one linear classifier."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from mergelab.models.base import ImageClassifier

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class VGG(ImageClassifier):
    """``features`` = ``conv{i}`` [+ ``bn{i}``] + ``relu{i}`` per number of ``plan``, ``pool{j}`` per ``"M"``;
    then global average pooling and ``classifier``.

    Small inputs: a max-pool is skipped once the feature map is 1x1 (so 8x8 digits and 28x28 MNIST work), and the
    final global pooling makes the feature vector ``plan[-1]`` wide for any input size (on 32x32 CIFAR the map is
    already 1x1 there and the pooling does nothing).
    ``bias=None`` gives convolutions a bias exactly when no BatchNorm follows, and the classifier always; ``True``
    or ``False`` switch every bias (the fusion paper's vgg11_nobias is ``bias=False, batchnorm=False``).
    PyTorch's default initialisation.
    """

    classifier_name = "classifier"

    def __init__(self, plan, *, arch: str, num_classes: int, in_channels: int, image_size: int,
                 width: float = 1, batchnorm: bool = True, bias: bool | None = None):
        super().__init__()
        self.arch = arch
        self.input_size = (in_channels, image_size, image_size)
        conv_bias = (not batchnorm) if bias is None else bias
        layers, size, channels, convs, pools = OrderedDict(), image_size, in_channels, 0, 0
        for item in plan:
            if item == "M":
                if size > 1:
                    pools += 1
                    layers[f"pool{pools}"] = nn.MaxPool2d(2)
                    size //= 2
                continue
            convs += 1
            out = _scaled(item, width)
            layers[f"conv{convs}"] = nn.Conv2d(channels, out, 3, padding=1, bias=conv_bias)
            if batchnorm:
                layers[f"bn{convs}"] = nn.BatchNorm2d(out)
            layers[f"relu{convs}"] = nn.ReLU()
            channels = out
        self.num_convs = convs
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes, bias=True if bias is None else bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def vgg11(*, num_classes: int, in_channels: int, image_size: int, width: float = 1, batchnorm: bool = True,
          bias: bool | None = None) -> VGG:
    """VGG11 (configuration A: 64,M,128,M,256,256,M,512,512,M,512,512,M) with channels times ``width``."""
    return VGG(VGG11, arch="vgg11", num_classes=num_classes, in_channels=in_channels, image_size=image_size,
               width=width, batchnorm=batchnorm, bias=bias)
