"""The hand-written unit graphs of the four built-in families (Git Re-Basin style permutation specs, built from small
fragments), kept as test oracles: the graph derived by tracing must partition every axis exactly as these do."""

from __future__ import annotations

from torch import nn

from mergelab.models.graph import Group, Layer, UnitGraph


def compose(*parts: UnitGraph) -> UnitGraph:
    """Joins graph fragments in forward order; a group named in several fragments must have one size."""
    groups: dict[Group, int] = {}
    axes: dict[str, tuple[Group | None, ...]] = {}
    layers: list[Layer] = []
    for part in parts:
        for group, size in part.groups.items():
            if groups.setdefault(group, size) != size:
                raise ValueError(f"unit graph bug: group {group} has sizes {groups[group]} and {size}")
        for key, key_axes in part.axes.items():
            if key in axes:
                raise ValueError(f"unit graph bug: key {key} is described twice")
            axes[key] = key_axes
        layers.extend(part.layers)
    return UnitGraph(groups, axes, tuple(layers))


def _weight_layer(name: str, kind: str, module: nn.Module, in_group: Group | None, out_group: Group | None,
                  hook: str, in_size: int, out_size: int) -> UnitGraph:
    """A linear or conv layer: weight axes (out, in, kernel...), bias axis (out,)."""
    state = module.state_dict()
    axes = {f"{name}.weight": (out_group, in_group) + (None,) * (state["weight"].ndim - 2)}
    if "bias" in state:
        axes[f"{name}.bias"] = (out_group,)
    sizes = {g: n for g, n in ((in_group, in_size), (out_group, out_size)) if g is not None}
    return UnitGraph(sizes, axes, (Layer(name, kind, tuple(axes), in_group, out_group, hook),))


def linear(name: str, module: nn.Linear, in_group: Group | None, out_group: Group | None, hook: str) -> UnitGraph:
    """A dense layer ``name`` reading units of ``in_group`` and writing units of ``out_group``."""
    return _weight_layer(name, "linear", module, in_group, out_group, hook, module.in_features, module.out_features)


def conv(name: str, module: nn.Conv2d, in_group: Group | None, out_group: Group | None, hook: str) -> UnitGraph:
    """A convolution (weight ``out, in, kh, kw``); grouped convolutions tie units differently and are refused."""
    if module.groups != 1:
        raise ValueError(f"unit graph: grouped convolution {name} is not supported")
    return _weight_layer(name, "conv", module, in_group, out_group, hook, module.in_channels, module.out_channels)


def norm(name: str, module: nn.Module | None, group: Group, hook: str) -> UnitGraph:
    """A per-channel norm layer (BatchNorm): every vector is indexed by ``group``, scalars (batch counts) by nothing.

    An absent norm (``None`` or a parameter-free ``nn.Identity``) gives an empty fragment, so the same graph code
    serves models with and without BatchNorm.
    """
    state = module.state_dict() if module is not None else {}
    if not state:
        return UnitGraph({}, {}, ())
    axes = {f"{name}.{suffix}": (group,) * tensor.ndim for suffix, tensor in state.items()}
    size = next(t.shape[0] for t in state.values() if t.ndim == 1)
    return UnitGraph({group: size}, axes, (Layer(name, "bn", tuple(axes), group, group, hook),))


def basic_block(name: str, block: nn.Module, stream_in: Group, stream_out: Group) -> UnitGraph:
    """The graph of one :class:`BasicBlock` reading residual stream ``stream_in`` and writing ``stream_out``.

    ``conv1``'s channels are the block's own group ``<name>.conv1``; ``conv2``, ``bn2`` and the projection shortcut
    write the stream. An identity shortcut adds the input units to the output units one to one, so it needs
    ``stream_in == stream_out``.
    """
    inner, inner_hook, out_hook = f"{name}.conv1", f"{name}.relu1", f"{name}.relu2"
    parts = [conv(f"{name}.conv1", block.conv1, stream_in, inner, inner_hook),
             norm(f"{name}.bn1", block.bn1, inner, inner_hook),
             conv(f"{name}.conv2", block.conv2, inner, stream_out, out_hook),
             norm(f"{name}.bn2", block.bn2, stream_out, out_hook)]
    if isinstance(block.shortcut, nn.Identity):
        if stream_in != stream_out:
            raise ValueError(f"unit graph bug: identity shortcut of {name} joins {stream_in} and {stream_out}")
    else:
        parts += [conv(f"{name}.shortcut.conv", block.shortcut.conv, stream_in, stream_out, out_hook),
                  norm(f"{name}.shortcut.bn", block.shortcut.bn, stream_out, out_hook)]
    return compose(*parts)


def resnet_graph(model) -> UnitGraph:
    """Group ``stream{s}`` = the residual stream of stage ``s`` (the stem writes ``stream1``), group
    ``layer{s}.{b}.conv1`` = the inner channels of block ``b``; ``fc`` reads the last stream."""
    parts = [conv("conv1", model.conv1, None, "stream1", hook="relu"),
             norm("bn1", model.bn1, "stream1", hook="relu")]
    stream = "stream1"
    for stage in range(1, model.num_stages + 1):
        for b, block in enumerate(getattr(model, f"layer{stage}")):
            parts.append(basic_block(f"layer{stage}.{b}", block, stream, f"stream{stage}"))
            stream = f"stream{stage}"
    parts.append(linear("fc", model.fc, stream, None, hook="fc"))
    return compose(*parts)


def vgg_graph(model) -> UnitGraph:
    """Group ``conv{i}`` = the channels of convolution ``i`` (and its BatchNorm); the last feeds the classifier."""
    parts, group = [], None
    for i in range(1, model.num_convs + 1):
        name, hook = f"conv{i}", f"features.relu{i}"
        parts.append(conv(f"features.{name}", getattr(model.features, name), group, name, hook))
        parts.append(norm(f"features.bn{i}", getattr(model.features, f"bn{i}", None), name, hook))
        group = name
    parts.append(linear("classifier", model.classifier, group, None, hook="classifier"))
    return compose(*parts)


def mlp_graph(model) -> UnitGraph:
    """Group ``fc{i}`` = the outputs of hidden layer ``i``; pixels and logits are not permuted."""
    parts, group = [], None
    for i in range(1, model.depth + 1):
        parts.append(linear(f"fc{i}", getattr(model, f"fc{i}"), group, f"fc{i}", hook=f"relu{i}"))
        group = f"fc{i}"
    parts.append(linear("classifier", model.classifier, group, None, hook="classifier"))
    return compose(*parts)


def oracle_graph(model: nn.Module) -> UnitGraph:
    """The hand-written graph of a built-in family's model."""
    return {"mlpnet": mlp_graph, "vgg11": vgg_graph, "resnet20": resnet_graph, "resnet18": resnet_graph}[
        model.arch](model)
