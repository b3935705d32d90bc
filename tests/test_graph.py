"""Unit graphs of the built-in families, derived by tracing: a network permuted through its graph computes the same
function (Git Re-Basin's invariance), the graph is complete, and it partitions every axis exactly as the
hand-written graphs (tests/graph_oracles.py) do."""

import copy
import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.errors import UserError
from mergelab.models import (apply_permutation, build_model, check_compatible, check_graph, random_permutation,
                             unit_graph)
from tests.graph_oracles import oracle_graph

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


@functools.cache
def _graph(family: str, frozen: tuple, in_channels: int = 1, image_size: int = 8):
    return unit_graph(build(family, dict(frozen), in_channels, image_size))


def graph_of(family: str, options: dict, in_channels: int = 1, image_size: int = 8):
    """The derived graph of ``build(family, options)``, traced once per test session."""
    return _graph(family, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())),
                  in_channels, image_size)


def partition(graph) -> tuple:
    """The graph as a partition of the (key, axis) pairs, group names forgotten, plus the unpermuted pairs."""
    classes: dict = {}
    for key, axes in graph.axes.items():
        for axis, group in enumerate(axes):
            classes.setdefault(group, set()).add((key, axis))
    fixed = classes.pop(None, set())
    return frozenset(fixed), frozenset(frozenset(c) for c in classes.values())


@pytest.mark.parametrize("family,options", VARIANTS, ids=[f"{f}-{o}" for f, o in VARIANTS])
def test_derived_graph_equals_the_hand_written_one(family, options):
    """Same partition of every axis, same group sizes, same weight layers in the same order with the same
    input/output groups and feature points (up to group names)."""
    model = build(family, options)
    derived, oracle = graph_of(family, options), oracle_graph(model)
    assert partition(derived) == partition(oracle)
    rename = {o: d for key in oracle.axes for o, d in zip(oracle.axes[key], derived.axes[key]) if o is not None}
    assert {rename[g]: n for g, n in oracle.groups.items()} == derived.groups
    assert [(layer.name, layer.kind, layer.keys, rename.get(layer.in_group), rename.get(layer.out_group), layer.hook)
            for layer in oracle.layers] == [(layer.name, layer.kind, layer.keys, layer.in_group, layer.out_group,
                                             layer.hook) for layer in derived.layers]
    assert not derived.structured


@pytest.mark.parametrize("family,options", VARIANTS, ids=[f"{f}-{o}" for f, o in VARIANTS])
def test_permuted_network_computes_the_same_function(family, options):
    model, x = model_and_input(family, options)
    graph = graph_of(family, options)
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
    graph = graph_of(family, {}, 3, 32)
    perms = random_permutation(graph, torch.Generator().manual_seed(2))
    torch.testing.assert_close(permuted_outputs(model, graph, perms, x), model(x), rtol=1e-9, atol=1e-9)


# ResNet-18 is built from the same basic_block fragments as ResNet-20 (covered here) and has ~4x the axes; leaving
# it out keeps this exhaustive per-axis test fast.
TEETH = [(f, o) for f, o in SMALL if f != "resnet18"]


@pytest.mark.parametrize("family,options", TEETH, ids=[f"{f}-{o}" for f, o in TEETH])
def test_dropping_any_axis_from_the_graph_breaks_invariance(family, options):
    """The invariance test has teeth: a graph missing any single (key, axis) gives a different function."""
    model, x = model_and_input(family, options)
    graph = graph_of(family, options)
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
    graph = graph_of(family, options)
    perms = random_permutation(graph, torch.Generator().manual_seed(4))
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(graph, model.state_dict(), perms))
    original, moved = record_hooks(model, graph, x), record_hooks(permuted, graph, x)
    for group, modules in graph.hooks.items():
        for name in modules:
            dim = graph.feature_dim(name)
            assert original[name].shape[dim] == graph.groups[group]
            torch.testing.assert_close(moved[name], original[name].index_select(dim, perms[group]))


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
    graph = graph_of(family, options)
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
    axes = graph_of("resnet20", {}).axes
    stream1 = {axes["conv1.weight"][0], axes["bn1.running_mean"][0], axes["layer1.0.conv1.weight"][1],
               axes["layer1.0.conv2.weight"][0], axes["layer1.2.bn2.bias"][0], axes["layer2.0.shortcut.conv.weight"][1],
               axes["layer2.0.conv1.weight"][1]}
    stream3 = {axes["layer3.0.shortcut.conv.weight"][0], axes["layer3.0.shortcut.bn.weight"][0],
               axes["layer3.0.conv2.weight"][0], axes["layer3.1.conv1.weight"][1], axes["layer3.2.bn2.running_var"][0],
               axes["fc.weight"][1]}
    assert stream1 == {"conv1"} and stream3 == {"layer3.0.conv2"}  # named after the first layer writing them
    assert axes["layer1.0.conv1.weight"][0] == "layer1.0.conv1"
    assert axes["conv1.weight"][1] is None and axes["fc.weight"][0] is None and axes["fc.bias"] == (None,)


def test_graph_follows_the_config():
    with_bn, without_bn = graph_of("resnet20", {}), graph_of("resnet20", {"batchnorm": False})
    assert "bn1.running_mean" in with_bn.axes and "conv1.bias" not in with_bn.axes
    assert "conv1.bias" in without_bn.axes
    assert not any(layer.kind == "bn" for layer in without_bn.layers)
    assert graph_of("resnet20", {"width": 2}).groups["layer3.0.conv2"] == 128


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
    graph, state = graph_of("mlpnet", {}), model.state_dict()
    with pytest.raises(ValueError, match="not a group"):
        apply_permutation(graph, state, {"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="shape"):
        apply_permutation(graph, state, {"fc1": torch.arange(3)})
    with pytest.raises(UserError, match="extra.weight"):
        apply_permutation(graph, {**state, "extra.weight": torch.zeros(2)}, {})
    with pytest.raises(UserError, match="fc2.weight"):
        check_graph(graph_of("mlpnet", {"hidden": [400, 100, 100]}), state)


def test_subset_of_groups_and_inverse():
    model, x = model_and_input("resnet20", {})
    graph, state = graph_of("resnet20", {}), model.state_dict()
    perms = random_permutation(graph, torch.Generator().manual_seed(5))
    stream2 = graph.axes["layer2.0.conv2.weight"][0]
    only_stream2 = apply_permutation(graph, state, {stream2: perms[stream2]})
    changed = {key for key in state if not torch.equal(only_stream2[key], state[key])}
    assert changed == {key for key, _ in graph.members(stream2)}
    torch.testing.assert_close(permuted_outputs(model, graph, {stream2: perms[stream2]}, x), model(x))
    inverse = {group: torch.argsort(perm) for group, perm in perms.items()}
    restored = apply_permutation(graph, apply_permutation(graph, state, perms), inverse)
    assert all(torch.equal(restored[key], state[key]) for key in state)
