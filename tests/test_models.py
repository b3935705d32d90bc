"""Models: every conf/model/*.yaml builds for every data shape and keeps the feature/head contract."""

import time
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from mergelab.errors import UserError
from mergelab.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
FAMILIES = ["mlpnet", "vgg11", "resnet20", "resnet18", "timm"]
SHAPES = {"digits": (1, 8), "mnist": (1, 28), "cifar": (3, 32)}


def config(family: str, **options):
    return OmegaConf.merge(OmegaConf.load(CONF / f"{family}.yaml"), options)


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_config_builds_and_keeps_the_contract(family, shape):
    in_channels, size = SHAPES[shape]
    model = build_model(config(family), 7, in_channels, size).eval()
    x = torch.randn(3, in_channels, size, size)
    out = model(x)
    features = model.forward_features(x)
    assert out.shape == (3, 7)
    assert features.ndim == 2 and features.shape[0] == 3
    torch.testing.assert_close(model.forward_head(features), out)
    head = model.get_submodule(model.classifier_name)
    assert isinstance(head, nn.Linear) and head.out_features == 7 and head.in_features == features.shape[1]
    assert model.arch == ("timm:resnet10t" if family == "timm" else family)
    assert model.input_size == (in_channels, size, size)  # what unit_graph traces the model with


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_can_be_replaced(family):
    model = build_model(config(family), 10, 1, 8).eval()
    model.reset_classifier(3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    zero = nn.Linear(model.get_classifier().in_features, 3)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    model.set_submodule(model.classifier_name, zero)
    assert torch.count_nonzero(model(torch.randn(2, 1, 8, 8))) == 0


def test_initialisation_follows_the_callers_seed():
    weights = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        weights.append(build_model(config("resnet20"), 10, 1, 8).conv1.weight)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_switches_shape_the_model():
    def has(model, kind):
        return any(isinstance(m, kind) for m in model.modules())

    vgg = build_model(config("vgg11"), 10, 3, 32)
    assert has(vgg, nn.BatchNorm2d) and vgg.features.conv1.bias is None and vgg.classifier.bias is not None
    nobias = build_model(config("vgg11", bias=False, batchnorm=False), 10, 3, 32)
    assert not has(nobias, nn.BatchNorm2d) and all(p.ndim > 1 for p in nobias.parameters())
    assert sum(isinstance(m, nn.MaxPool2d) for m in build_model(config("vgg11"), 10, 1, 8).modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 5
    plain = build_model(config("resnet20", batchnorm=False), 10, 1, 8)
    assert not has(plain, nn.BatchNorm2d) and plain.layer2[0].shortcut.conv.bias is not None
    wide = build_model(config("resnet20", width=4), 10, 1, 8)
    assert wide.fc.in_features == 256 and wide.conv1.out_channels == 64
    assert build_model(config("resnet18", width=0.5), 10, 1, 8).fc.in_features == 256
    mlp = build_model(config("mlpnet", hidden=[32], bias=False), 10, 1, 28)
    assert mlp.fc1.weight.shape == (32, 784) and mlp.fc1.bias is None and mlp.classifier.bias is None


def test_resnet20_steps_fast_on_digits():
    """Forward + backward on a 64-batch of 8x8 digits; best of 5 so a busy machine does not decide the test."""
    model = build_model(config("resnet20"), 10, 1, 8)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

    def seconds_per_step():
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - start

    assert min(seconds_per_step() for _ in range(5)) < 1.0


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="depth"):
        build_model(config("resnet20", depth=32), 10, 1, 8)
    with pytest.raises(UserError, match="_target_"):
        build_model({"width": 1}, 10, 1, 8)
    with pytest.raises(UserError, match="cannot find _target_ mergelab.models.resnet21"):
        build_model({"_target_": "mergelab.models.resnet21"}, 10, 1, 8)
    with pytest.raises(UserError, match="unknown timm model"):
        build_model(config("timm", name="no_such_net"), 10, 1, 8)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A 5-class resnet10t state dict saved as safetensors and as a torch file, and the model it came from."""
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=5).eval()
    folder = tmp_path_factory.mktemp("weights")
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    save_file(state, folder / "r10t.safetensors")
    torch.save(state, folder / "r10t.pth")
    return folder, source


@pytest.mark.parametrize("file", ["r10t.safetensors", "r10t.pth"])
def test_timm_local_weights_with_new_classes(timm_weights, file):
    folder, source = timm_weights
    model = build_model(config("timm", weights=str(folder / file)), 10, 3, 32).eval()
    assert model.skipped_keys == ("fc.weight", "fc.bias")
    assert model.get_classifier().weight.shape == (10, 512)
    theirs = source.state_dict()
    for key, value in model.net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, theirs[key]), key
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(x), source.forward_head(source.forward_features(x),
                                                                              pre_logits=True))


def test_timm_local_weights_same_classes_and_one_channel(timm_weights):
    folder, source = timm_weights
    same = build_model(config("timm", weights=str(folder / "r10t.safetensors")), 5, 3, 32).eval()
    assert same.skipped_keys == ()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same(x), source(x))
    gray = build_model(config("timm", weights=str(folder / "r10t.pth")), 5, 1, 8)
    torch.testing.assert_close(gray.net.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))


def test_timm_accepts_its_own_checkpoints(timm_weights, tmp_path):
    folder, _ = timm_weights
    trained = build_model(config("timm", weights=str(folder / "r10t.pth")), 10, 3, 32)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "ours.safetensors")
    again = build_model(config("timm", weights=str(tmp_path / "ours.safetensors")), 10, 3, 32)
    assert again.skipped_keys == ()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), trained.state_dict().values()))


def test_timm_bad_weights_are_user_errors(timm_weights, tmp_path):
    folder, _ = timm_weights
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(UserError, match=f"weights file {missing} not found"):
        build_model(config("timm", weights=str(missing)), 10, 3, 32)
    with pytest.raises(UserError, match=r"r10t\.pth does not fit"):
        build_model(config("timm", name="mobilenetv3_small_050", weights=str(folder / "r10t.pth")), 10, 3, 32)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        build_model(config("timm", weights=str(garbage)), 10, 3, 32)
    with pytest.raises(UserError, match="not both"):
        build_model(config("timm", pretrained=True, weights=str(folder / "r10t.pth")), 10, 3, 32)
