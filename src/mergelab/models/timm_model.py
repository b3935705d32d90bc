"""Any timm model (Wightman, pytorch-image-models) behind mergelab's model contract, with local weight files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mergelab.errors import UserError
from mergelab.models.base import ImageClassifier

log = logging.getLogger(__name__)


class TimmModel(ImageClassifier):
    """``timm.create_model(name, pretrained, num_classes, in_chans=in_channels, **kwargs)`` held as ``net``.

    ``forward_features`` is timm's ``forward_features`` followed by ``forward_head(..., pre_logits=True)`` (so it
    ends at the pooled feature vector, like every mergelab model) and ``forward_head`` applies timm's classifier;
    ``classifier_name`` is its path (``net.fc``, ``net.classifier``...).

    ``pretrained=True`` downloads timm's weights from the hub (online only). ``weights`` is a local file instead:
    safetensors or a ``torch.load(weights_only=True)`` state dict of this timm model (e.g. from timm or
    torchvision; a mergelab checkpoint of a TimmModel, whose keys start with ``net.``, works too). It must match
    every backbone key and shape; the classifier is left freshly initialised when its shape differs (another number
    of classes), and a 3-channel first convolution is adapted to ``in_channels`` as timm does for its own
    pretrained weights. Skipped keys are logged and kept in ``skipped_keys``.
    ``image_size`` is not passed on (most timm models pool globally); models that need it (ViTs) take
    ``kwargs: {img_size: 32}``.
    """

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, name: str = "resnet10t",
                 pretrained: bool = False, weights: str | None = None, kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        import timm  # imported here: timm takes seconds to import and only this model family needs it

        if not timm.is_model(name):
            raise UserError(f"unknown timm model {name!r}; timm.list_models() lists the names")
        if pretrained and weights:
            raise UserError("set model.pretrained=true (timm hub download) or model.weights=<local file>, not both")
        self.arch = f"timm:{name}"
        self.input_size = (in_channels, image_size, image_size)
        self.net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels,
                                     **(kwargs or {}))
        head = self.net.get_classifier()
        self.classifier_name = "net." + next(n for n, m in self.net.named_modules() if m is head)
        self.skipped_keys: tuple[str, ...] = ()
        if weights:
            self.skipped_keys = load_weights(self.net, Path(weights), self.classifier_name.removeprefix("net."))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a ``torch.load(weights_only=True)`` state dict."""
    if not path.is_file():
        raise UserError(f"weights file {path} not found; set model.weights to a local .safetensors or torch "
                        "state-dict file")
    from mergelab.checkpoints import read_weights  # the one reader: never unpickles, one-line errors

    state = read_weights(path)
    if state and all(key.startswith("net.") for key in state):
        state = {key.removeprefix("net."): value for key, value in state.items()}
    return dict(state)


def _adapt_first_conv(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Sums or repeats the file's input-convolution channels to the model's (timm's ``adapt_input_conv``)."""
    first_conv = net.pretrained_cfg.get("first_conv")
    if not isinstance(first_conv, str):
        return
    key = f"{first_conv}.weight"
    own = net.state_dict().get(key)
    if own is None or key not in state or state[key].ndim != 4:
        return
    if state[key].shape[1] != own.shape[1] and state[key].shape[0] == own.shape[0]:
        log.info("weights %s: adapted %s from %d to %d input channels", path, key, state[key].shape[1], own.shape[1])
        from timm.models import adapt_input_conv

        state[key] = adapt_input_conv(own.shape[1], state[key], base_chans=state[key].shape[1])


def load_weights(net: nn.Module, path: Path, classifier: str) -> tuple[str, ...]:
    """Loads ``path`` into the timm model ``net``, strictly except the classifier (module path ``classifier``).

    Returns the classifier keys left at their fresh initialisation because the file's shapes differ or lack them.
    """
    state = read_state_dict(path)
    _adapt_first_conv(net, state, path)
    own = net.state_dict()
    problem = f"weights file {path} does not fit timm model {net.pretrained_cfg.get('architecture', '')}"
    head = [key for key in own if key.startswith(classifier + ".")]
    skipped = tuple(head) if any(key not in state or state[key].shape != own[key].shape for key in head) else ()
    for key, tensor in own.items():
        if key in skipped:
            continue
        if key not in state:
            raise UserError(f"{problem}: it has no {key}")
        if state[key].shape != tensor.shape:
            raise UserError(f"{problem}: {key} has shape {tuple(state[key].shape)} in the file and "
                            f"{tuple(tensor.shape)} in the model")
    for key in (k for k in state if k not in own):
        raise UserError(f"{problem}: unexpected key {key}")
    net.load_state_dict({key: value for key, value in state.items() if key not in skipped}, strict=False)
    if skipped:
        log.info("weights %s: classifier re-initialised for the new number of classes (skipped %s)",
                 path, ", ".join(skipped))
    return skipped
