"""Unit graphs derived by tracing models mergelab has no code for: timm CNNs and a Vision Transformer (attention
heads), torchvision models (concatenation), GroupNorm and depthwise convolutions; and one-line refusals.

For every model: a random permutation of every group (heads included) leaves the outputs unchanged, dropping any
single (key, axis) from the graph breaks that (the graph is complete), and the features at every hook point are the
original features permuted by their group (the points activation-based methods read are right).
"""

import copy
from dataclasses import replace

import pytest
import timm
import torch
import torchvision
from torch import nn

from mergelab.errors import UserError
from mergelab.models import (TimmModel, apply_permutation, check_graph, check_permutation, random_permutation,
                             unit_graph)

# timm models of the list, at 32x32 with one input channel (digits); the ViT with 4x4 patches.
TIMM = {"test_resnet": {}, "test_convnext": {}, "test_efficientnet": {}, "test_vit": {"img_size": 32, "patch_size": 4},
        "mobilenetv3_small_050": {}, "resnet18": {}}


@torch.no_grad()
def randomise(model: nn.Module) -> nn.Module:
    """Float64, eval mode, and every vector (norm affine terms and statistics, layer scales, tokens, position
    embeddings) random, so that permuting any of them is not a no-op."""
    model = model.double().eval()
    torch.manual_seed(0)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        if "running_var" in name:
            tensor.uniform_(0.5, 1.5)
        elif tensor.ndim <= 1 or "token" in name or "pos_embed" in name:
            tensor.normal_(1.0 if "weight" in name or "gamma" in name else 0.0, 0.2)
    return model


def moving_permutation(graph, seed: int = 1) -> dict:
    """A random valid permutation in which no group (of 2+ units) keeps its identity order."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        perms = random_permutation(graph, generator)
        if all(not torch.equal(p, torch.arange(len(p))) for p in perms.values() if len(p) > 1):
            return perms
    raise AssertionError("no moving permutation found")


class GroupNormNet(nn.Module):
    """GroupNorm (channels stay in their groups) and a depthwise convolution with channel multiplier 2."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.dw = nn.Conv2d(8, 16, 3, groups=8)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.pw(torch.relu(self.dw(torch.relu(self.gn(self.conv(x)))))).mean((2, 3)))


def build(name: str):
    torch.manual_seed(0)
    if name in TIMM:
        size = 16 if name in ("resnet18", "mobilenetv3_small_050") else 32  # smaller maps keep the per-axis test fast
        return randomise(TimmModel(num_classes=10, in_channels=1, image_size=size, name=name, kwargs=TIMM[name])), \
            torch.randn(2, 1, size, size, dtype=torch.float64)
    if name == "torchvision_squeezenet":  # Fire modules concatenate two branches
        return randomise(torchvision.models.squeezenet1_1(num_classes=10)), torch.randn(2, 3, 48, 48,
                                                                                        dtype=torch.float64)
    if name == "bare_timm_vit":  # a timm module without mergelab's wrapper; input size from its config
        return randomise(timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4)), \
            torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return randomise(GroupNormNet()), torch.randn(2, 3, 12, 12, dtype=torch.float64)


MODELS = [*TIMM, "torchvision_squeezenet", "bare_timm_vit", "groupnorm_depthwise"]


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    model, x = build(request.param)
    example = x if request.param in ("torchvision_squeezenet", "groupnorm_depthwise") else None
    graph = unit_graph(model, example)
    return request.param, model, graph, x


def load_permuted(model, graph, perms):
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(graph, model.state_dict(), perms))
    return permuted


def test_permuted_model_computes_the_same_function(case):
    name, model, graph, x = case
    check_graph(graph, model.state_dict())
    perms = moving_permutation(graph)
    check_permutation(graph, perms)
    torch.testing.assert_close(load_permuted(model, graph, perms)(x), model(x), rtol=1e-9, atol=1e-9)
    grouped = {k for k, axes in graph.axes.items() if any(a is not None for a in axes)}
    assert len(grouped) > 0.7 * len(graph.axes), f"{name}: most keys should be permutable"


@torch.no_grad()
def test_dropping_any_axis_breaks_invariance(case):
    """Every (key, axis) of the graph is needed: left unpermuted, the function changes."""
    name, model, graph, x = case
    perms = moving_permutation(graph, seed=2)
    state = model.state_dict()
    permuted_state = apply_permutation(graph, state, perms)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(permuted_state)
    tensors = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    reference = model(x)
    for key, axes in graph.axes.items():
        for axis, entry in enumerate(axes):
            if entry is None:
                continue
            broken = replace(graph, axes={key: axes[:axis] + (None,) + axes[axis + 1:]})
            tensors[key].copy_(apply_permutation(broken, {key: state[key]}, perms)[key])
            assert not torch.allclose(fresh(x), reference), f"{name}: {key} axis {axis} is not needed"
            tensors[key].copy_(permuted_state[key])


@torch.no_grad()
def test_hooks_carry_their_group(case):
    name, model, graph, x = case
    perms = moving_permutation(graph, seed=3)
    permuted = load_permuted(model, graph, perms)
    hooks = {n for group, modules in graph.hooks.items() if group in graph.groups for n in modules}
    assert hooks, name
    seen = {}
    for m, store in ((model, {}), (permuted, {})):
        handles = [m.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n, s=store: s.__setitem__(n, out))
                   for n in hooks]
        m(x)
        for handle in handles:
            handle.remove()
        seen[m is model] = store
    for group, modules in graph.hooks.items():
        if group not in graph.groups:
            continue
        for module in modules:
            dim = graph.feature_dim(module)
            original = seen[True][module]
            assert original.shape[dim] == graph.groups[group], (name, module)
            torch.testing.assert_close(seen[False][module], original.index_select(dim, perms[group]))


def test_layers_in_forward_order(case):
    name, model, graph, _ = case
    produced = set()
    for layer in graph.layers:
        model.get_submodule(layer.name)
        if layer.kind in ("linear", "conv") and layer.in_group is not None and layer.in_group != layer.out_group:
            parts = layer.in_group if isinstance(layer.in_group, tuple) else (layer.in_group,)
            assert all(p in produced for p in parts), f"{name}: {layer.name} reads a group not yet written"
        if layer.out_group is not None:
            produced.update(layer.out_group if isinstance(layer.out_group, tuple) else (layer.out_group,))
    keys = [k for layer in graph.layers for k in layer.keys]
    assert len(keys) == len(set(keys))
    assert set(keys) >= {k for k, axes in graph.axes.items() if any(a is not None for a in axes)}


def test_attention_heads_are_structured():
    """A fused qkv projection: (qk, qk, vo) concatenated on its output axis; qk and vo blocked by heads sharing one
    parent; permuting qk freely (splitting heads) changes the function, the structured permutation does not."""
    model, x = build("test_vit")
    graph = unit_graph(model)
    qkv = graph.axes["net.blocks.0.attn.qkv.weight"][0]
    qk, k, vo = qkv
    assert qk == k and qk != vo and graph.groups[qk] == graph.groups[vo] == 64
    heads = model.net.blocks[0].attn.num_heads
    assert graph.blocks[qk].count == graph.blocks[vo].count == heads
    assert graph.blocks[qk].parent == graph.blocks[vo].parent and graph.groups[graph.blocks[qk].parent] == heads
    assert graph.axes["net.blocks.0.attn.proj.weight"][1] == vo
    assert graph.structured
    perms = moving_permutation(graph)
    free = dict(perms, **{qk: torch.randperm(64, generator=torch.Generator().manual_seed(0))})
    with pytest.raises(ValueError, match="block"):
        check_permutation(graph, free)
    assert not torch.allclose(load_permuted(model, graph, free)(x), model(x))


def test_groupnorm_and_depthwise_multiplier_are_structured():
    model, x = build("groupnorm_depthwise")
    graph = unit_graph(model, x)
    conv, dw = graph.axes["conv.weight"][0], graph.axes["dw.weight"][0]
    assert graph.blocks[conv].count == 2 and graph.groups[graph.blocks[conv].parent] == 2  # GroupNorm's groups
    assert graph.blocks[dw].parent == conv and graph.blocks[dw].count == 8  # two outputs per input channel
    assert graph.axes["dw.weight"][1] is None


def test_concatenation_assembles_a_group_from_its_parts():
    model, x = build("torchvision_squeezenet")
    graph = unit_graph(model, x)
    entry = graph.axes["features.4.squeeze.weight"][1]
    assert entry == (graph.axes["features.3.expand1x1.weight"][0], graph.axes["features.3.expand3x3.weight"][0])


class Sorted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.sort(self.fc(x), dim=-1).values)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x):
        return self.grouped(self.conv(x)).mean((2, 3))


class Flattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("module,x,message", [
    (Sorted(), torch.randn(2, 4), r"operation sort in module \(root\) \(Sorted\) is not supported \(supported: "),
    (Grouped(), torch.randn(2, 3, 8, 8), r"operation conv2d in module grouped \(Conv2d\): grouped convolution"),
    (Flattened(), torch.randn(2, 1, 8, 8), r"operation flatten.using_ints .* merges a channel axis with other axes"),
], ids=["sort", "grouped-conv", "flatten-feature-map"])
def test_unsupported_operations_are_refused_in_one_line(module, x, message):
    with pytest.raises(UserError, match=message) as error:
        unit_graph(module, x)
    assert "\n" not in str(error.value)


def test_unknown_input_size_is_refused():
    with pytest.raises(UserError, match="input size is unknown; pass an example input"):
        unit_graph(Sorted())


@pytest.mark.parametrize("name", ["test_efficientnet_gn", "test_vit4", "test_mambaout", "test_byobnet"])
@torch.no_grad()
def test_more_timm_models_are_derived_exactly(name):
    """Further timm architectures (GroupNorm EfficientNet, a 3-head ViT, MambaOut's gated convolutions, BYOBNet):
    invariance under a random structured permutation."""
    model = randomise(TimmModel(num_classes=10, in_channels=1, image_size=32, name=name))
    graph = unit_graph(model)
    perms = moving_permutation(graph)
    check_permutation(graph, perms)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(load_permuted(model, graph, perms)(x), model(x), rtol=1e-9, atol=1e-9)
    if name in ("test_efficientnet_gn", "test_vit4"):
        assert graph.blocks


def test_export_failure_is_one_line():
    """A model torch.export cannot run at this input size (MaxViT's windows): one line, torch's log kept quiet."""
    model = TimmModel(num_classes=10, in_channels=1, image_size=32, name="test_maxvit")
    with pytest.raises(UserError, match="cannot derive the unit graph of TimmModel: torch.export failed: ") as error:
        unit_graph(model)
    assert "\n" not in str(error.value)
