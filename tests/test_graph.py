"""Unit graphs: a network permuted through its graph computes the same function (Git Re-Basin's invariance)."""

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.errors import UserError
from mergelab.models import (apply_permutation, build_model, check_compatible, check_graph, random_permutation,
                             unit_graph)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

# Every family with bias and BatchNorm on and off (bias None = only where no BatchNorm follows).
VARIANTS = [
    ("mlpnet", {"bias": True}),
    ("mlpnet", {"bias": False}),
    ("mlpnet", {"hidden": [32, 16]}),
    ("vgg11", {"batchnorm": True}),
    ("vgg11", {"batchnorm": True, "bias": True}),
    ("vgg11", {"batchnorm": False}),
    ("vgg11", {"batchnorm": False, "bias": False}),
    ("resnet20", {"width": 1}),
    ("resnet20", {"width": 2}),
    ("resnet20", {"width": 1, "bias": True}),
    ("resnet20", {"width": 1, "batchnorm": False}),
    ("resnet20", {"width": 2, "batchnorm": False, "bias": False}),
    ("resnet18", {"batchnorm": True}),
    ("resnet18", {"batchnorm": True, "bias": True}),
    ("resnet18", {"batchnorm": False}),
    ("resnet18", {"batchnorm": False, "bias": False}),
]

# Small versions for tests that loop over every key.
SMALL = [("mlpnet", {"hidden": [12, 10, 8]}), ("vgg11", {"width": 0.125}),
         ("vgg11", {"width": 0.125, "batchnorm": False}), ("resnet20", {"width": 1}),
         ("resnet18", {"width": 0.125})]


def build(family: str, options: dict, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    """A float64 model from ``conf/model/<family>.yaml`` with ``options`` overridden, BatchNorm randomised, eval."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options)
    torch.manual_seed(0)
    model = build_model(cfg, 10, in_channels, image_size).double().eval()
    randomise_norms(model)
    return model


@torch.no_grad()
def randomise_norms(model: nn.Module) -> None:
    """Distinct per-channel BatchNorm statistics and affine terms, so that permuting them is not a no-op."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.normal_(1, 0.5)
            module.bias.normal_(0, 0.5)


def permuted_outputs(model: nn.Module, graph, perms, x: torch.Tensor, fresh: nn.Module | None = None):
    """Outputs of ``fresh`` (default: a new copy of ``model``) loaded with ``model``'s weights permuted by ``graph``."""
    fresh = fresh if fresh is not None else copy.deepcopy(model)
    fresh.load_state_dict(apply_permutation(graph, model.state_dict(), perms))
    return fresh(x)


def model_and_input(family: str, options: dict, in_channels: int = 1, image_size: int = 8):
    model = build(family, options, in_channels, image_size)
    return model, torch.randn(4, in_channels, image_size, image_size, dtype=torch.float64)


@pytest.mark.parametrize("family,options", VARIANTS, ids=[f"{f}-{o}" for f, o in VARIANTS])
def test_permuted_network_computes_the_same_function(family, options):
    model, x = model_and_input(family, options)
    graph = unit_graph(model)
    state = model.state_dict()
    assert set(graph.axes) == set(state), "every state-dict key is described by the graph"
    check_graph(graph, state)
    perms = random_permutation(graph, torch.Generator().manual_seed(1))
    assert set(perms) == set(graph.groups)

    permuted = apply_permutation(graph, state, perms)

    for key, groups in graph.axes.items():
        if any(g is not None for g in groups):
            assert not torch.equal(permuted[key], state[key]), f"{key} was not permuted"
    torch.testing.assert_close(permuted_outputs(model, graph, perms, x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["vgg11", "resnet20", "mlpnet"])
def test_invariance_on_cifar_shaped_input(family):
    model, x = model_and_input(family, {}, in_channels=3, image_size=32)
    graph = unit_graph(model)
    perms = random_permutation(graph, torch.Generator().manual_seed(2))
    torch.testing.assert_close(permuted_outputs(model, graph, perms, x), model(x), rtol=1e-9, atol=1e-9)


# ResNet-18 is built from the same basic_block fragments as ResNet-20 (covered here) and has ~4x the axes; leaving
# it out keeps this exhaustive per-axis test fast.
TEETH = [(f, o) for f, o in SMALL if f != "resnet18"]


@pytest.mark.parametrize("family,options", TEETH, ids=[f"{f}-{o}" for f, o in TEETH])
def test_dropping_any_axis_from_the_graph_breaks_invariance(family, options):
    """The invariance test has teeth: a graph missing any single (key, axis) gives a different function."""
    model, x = model_and_input(family, options)
    graph = unit_graph(model)
    perms = random_permutation(graph, torch.Generator().manual_seed(3))
    reference, fresh = model(x), copy.deepcopy(model)
    for key, groups in graph.axes.items():
        for axis, group in enumerate(groups):
            if group is None:
                continue
            broken = replace(graph, axes={**graph.axes, key: groups[:axis] + (None,) + groups[axis + 1:]})
            assert not torch.allclose(permuted_outputs(model, broken, perms, x, fresh), reference), (key, axis)


@pytest.mark.parametrize("family,options", SMALL, ids=[f"{f}-{o}" for f, o in SMALL])
def test_hooks_carry_their_group(family, options):
    """Features at a group's hook points of the permuted model are the original features, permuted by that group."""
    model, x = model_and_input(family, options)
    graph = unit_graph(model)
    perms = random_permutation(graph, torch.Generator().manual_seed(4))
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(graph, model.state_dict(), perms))
    original, moved = record_hooks(model, graph, x), record_hooks(permuted, graph, x)
    for group, modules in graph.hooks.items():
        for name in modules:
            assert original[name].shape[1] == graph.groups[group]
            torch.testing.assert_close(moved[name], original[name].index_select(1, perms[group]))


def record_hooks(model: nn.Module, graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward outputs of every hook module of ``graph``."""
    outputs, handles = {}, []
    for name in {n for modules in graph.hooks.values() for n in modules}:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out)))
    model(x)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("family,options", SMALL, ids=[f"{f}-{o}" for f, o in SMALL])
def test_layers_in_forward_order(family, options):
    model, _ = model_and_input(family, options)
    graph = unit_graph(model)
    produced, keys = set(), []
    for layer in graph.layers:
        assert layer.kind in ("linear", "conv", "bn")
        assert layer.in_group is None or layer.in_group in produced, f"{layer.name} reads a group not yet written"
        assert isinstance(model.get_submodule(layer.name), (nn.Linear, nn.Conv2d, nn.BatchNorm2d))
        model.get_submodule(layer.hook)
        produced.add(layer.out_group)
        keys += layer.keys
    assert sorted(keys) == sorted(graph.axes), "the layers hold every key exactly once"
    assert graph.layers[0].in_group is None and graph.layers[-1].out_group is None
    assert graph.layers[-1].name == model.classifier_name


def test_resnet_residual_stream_is_one_group():
    model, _ = model_and_input("resnet20", {})
    axes = unit_graph(model).axes
    stream1 = {axes["conv1.weight"][0], axes["bn1.running_mean"][0], axes["layer1.0.conv1.weight"][1],
               axes["layer1.0.conv2.weight"][0], axes["layer1.2.bn2.bias"][0], axes["layer2.0.shortcut.conv.weight"][1],
               axes["layer2.0.conv1.weight"][1]}
    stream3 = {axes["layer3.0.shortcut.conv.weight"][0], axes["layer3.0.shortcut.bn.weight"][0],
               axes["layer3.0.conv2.weight"][0], axes["layer3.1.conv1.weight"][1], axes["layer3.2.bn2.running_var"][0],
               axes["fc.weight"][1]}
    assert stream1 == {"stream1"} and stream3 == {"stream3"}
    assert axes["layer1.0.conv1.weight"][0] != "stream1"
    assert axes["conv1.weight"][1] is None and axes["fc.weight"][0] is None and axes["fc.bias"] == (None,)


def test_graph_follows_the_config():
    with_bn, without_bn = build("resnet20", {}), build("resnet20", {"batchnorm": False})
    assert "bn1.running_mean" in unit_graph(with_bn).axes and "conv1.bias" not in unit_graph(with_bn).axes
    assert "conv1.bias" in unit_graph(without_bn).axes
    assert not any(layer.kind == "bn" for layer in unit_graph(without_bn).layers)
    assert unit_graph(build("resnet20", {"width": 2})).groups["stream3"] == 128


def test_timm_models_have_no_graph():
    model = build_model(OmegaConf.load(CONF / "timm.yaml"), 10, 1, 8)
    with pytest.raises(UserError, match="supports mlpnet, vgg11, resnet20, resnet18; got timm:resnet10t"):
        unit_graph(model)


def test_check_compatible_names_the_first_mismatch():
    wide = build("mlpnet", {}).state_dict()
    narrow = build("mlpnet", {"hidden": [200, 100, 50]}).state_dict()
    with pytest.raises(UserError, match=r"cannot merge: fc1\.weight has shape \(400, 64\) in model A and "
                                        r"\(200, 64\) in model B"):
        check_compatible([wide, narrow])
    with pytest.raises(UserError, match=r"fc1\.bias is in model A but not in model B"):
        check_compatible([wide, build("mlpnet", {"bias": False}).state_dict()])
    check_compatible([wide, build("mlpnet", {}).state_dict(), wide])


def test_apply_permutation_rejects_bad_input():
    model, _ = model_and_input("mlpnet", {})
    graph, state = unit_graph(model), model.state_dict()
    with pytest.raises(ValueError, match="not a group"):
        apply_permutation(graph, state, {"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="shape"):
        apply_permutation(graph, state, {"fc1": torch.arange(3)})
    with pytest.raises(UserError, match="extra.weight"):
        apply_permutation(graph, {**state, "extra.weight": torch.zeros(2)}, {})
    with pytest.raises(UserError, match="fc2.weight"):
        check_graph(unit_graph(build("mlpnet", {"hidden": [400, 100, 100]})), state)


def test_subset_of_groups_and_inverse():
    model, x = model_and_input("resnet20", {})
    graph, state = unit_graph(model), model.state_dict()
    perms = random_permutation(graph, torch.Generator().manual_seed(5))
    only_stream2 = apply_permutation(graph, state, {"stream2": perms["stream2"]})
    changed = {key for key in state if not torch.equal(only_stream2[key], state[key])}
    assert changed == {key for key, _ in graph.members("stream2")}
    torch.testing.assert_close(permuted_outputs(model, graph, {"stream2": perms["stream2"]}, x), model(x))
    inverse = {group: torch.argsort(perm) for group, perm in perms.items()}
    restored = apply_permutation(graph, apply_permutation(graph, state, perms), inverse)
    assert all(torch.equal(restored[key], state[key]) for key in state)
