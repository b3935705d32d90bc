"""Model families and their unit graphs.

The front door is :func:`build_model`: every ``conf/model/*.yaml`` names a factory in ``_target_`` that takes
``num_classes``, ``in_channels`` and ``image_size`` plus its own options. Every model is an
:class:`~mergelab.models.base.ImageClassifier` (``forward_features``/``forward_head``, ``classifier_name``,
``arch``, ``input_size``); :func:`unit_graph` derives, by tracing, the permutation structure that
alignment-based merging needs, for these and for any other ``nn.Module`` it can read.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mergelab.config import instantiate
from mergelab.errors import UserError
from mergelab.models.base import ImageClassifier
from mergelab.models.graph import (Blocks, Layer, UnitGraph, apply_permutation, check_compatible, check_graph,
                                   check_permutation, random_permutation)
from mergelab.models.mlp import MLPNet
from mergelab.models.resnet import ResNet, resnet18, resnet20
from mergelab.models.timm_model import TimmModel
from mergelab.models.trace import derive_graph
from mergelab.models.vgg import VGG, vgg11

__all__ = ["Blocks", "ImageClassifier", "Layer", "MLPNet", "ResNet", "TimmModel", "UnitGraph", "VGG",
           "apply_permutation", "build_model", "check_compatible", "check_graph", "check_permutation",
           "random_permutation", "resnet18", "resnet20", "unit_graph", "vgg11"]


def build_model(model_cfg: Mapping[str, Any], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """:func:`mergelab.config.instantiate` of ``model_cfg`` with ``num_classes``, ``in_channels``, ``image_size``.

    Initial weights come from the caller's torch seed. Bad options, model errors and a model with an empty layer
    (a width of 0, which trains at chance without any error) become one-line :class:`UserError`s.
    """
    if "_target_" not in model_cfg:
        raise UserError("the model config has no _target_; pick one with model=<name> (conf/model/*.yaml)")
    model = instantiate(model_cfg, key="model", num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size)
    empty = next((name for name, p in model.named_parameters() if p.numel() == 0), None)
    if empty is not None:
        raise UserError(f"model config of {model_cfg['_target_']} gives {empty} no units; check its widths "
                        "(model.width, model.hidden...): every layer needs at least one")
    return model


def unit_graph(model: nn.Module, example: torch.Tensor | None = None) -> UnitGraph:
    """The :class:`UnitGraph` of any ``nn.Module``, derived by tracing ``model(example)``
    (:func:`mergelab.models.trace.derive_graph`); ``example`` defaults to two zero images of ``model.input_size``
    (mergelab models) or of a timm model's configured input. :class:`UserError` names an operation it cannot read."""
    return derive_graph(model, example)
