"""The training runner end to end on digits: every model family, resume equality, errors."""

import json

import pytest
import torch

from conftest import make_cfg, run_interrupted_then_resumed, run_script
from mergelab.checkpoints import load_checkpoint
from mergelab.errors import UserError
from mergelab.runner import _run
from mergelab.training import TrainingDiverged

FAST = ["train.epochs=2", "train.batch_size=128", "dataset.max_train_samples=400"]


@pytest.mark.parametrize("model", [
    "mlpnet", "vgg11", "resnet20", "resnet18",
    "timm"])
def test_every_model_family_trains_on_digits(tmp_path, model):
    overrides = [f"model={model}", *FAST]
    if model in ("vgg11", "resnet18"):
        overrides.append("model.width=0.125")
    if model == "timm":
        overrides += ["model.name=resnet10t", "train.epochs=1"]
    cfg = make_cfg("train", overrides, tmp_path)
    _run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["history"]) == cfg.train.epochs
    assert 0 <= results["metrics"]["raw/test_acc"] <= 100
    for name in ("last", "best", "ema0.999"):
        tensors, meta = load_checkpoint(tmp_path / "checkpoints" / f"{name}.safetensors")
        assert meta["num_classes"] == 10 and tensors
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_mlp_learns_digits(tmp_path):
    cfg = make_cfg("train", ["train.epochs=8"], tmp_path)
    _run(cfg)
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert metrics["raw/test_acc"] > 90 and metrics["ema0.999/test_acc"] > 50


def test_resumed_training_equals_uninterrupted(tmp_path):
    overrides = ["model=resnet20", "train.epochs=3", "train.batch_size=64", "ema.decays=[0.9,0.99]",
                 "dataset.augment=true", "dataset.crop_padding=1", "dataset.max_train_samples=300"]
    straight = tmp_path / "straight"
    _run(make_cfg("train", overrides, straight))

    interrupted = tmp_path / "interrupted"
    run_interrupted_then_resumed(overrides, interrupted)

    for name in ("last", "ema0.9", "ema0.99"):
        a, _ = load_checkpoint(straight / "checkpoints" / f"{name}.safetensors")
        b, _ = load_checkpoint(interrupted / "checkpoints" / f"{name}.safetensors")
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((interrupted / "results.json").read_text())
    assert ra["history"] == rb["history"]


def test_rerun_in_used_folder_without_resume_refuses(tmp_path):
    _run(make_cfg("train", ["train.epochs=1"], tmp_path))
    with pytest.raises(UserError, match="resume=true"):
        _run(make_cfg("train", ["train.epochs=1"], tmp_path))


def test_resume_with_other_config_refuses(tmp_path):
    _run(make_cfg("train", ["train.epochs=1"], tmp_path))
    with pytest.raises(UserError, match="optimizer.lr"):
        _run(make_cfg("train", ["train.epochs=2", "optimizer.lr=0.3", "resume=true"], tmp_path))


def test_divergence_stops_with_clear_error(tmp_path):
    cfg = make_cfg("train", ["train.epochs=3", "optimizer.lr=1e6", "optimizer.nesterov=false", "train.log_every=5"], tmp_path)
    with pytest.raises(TrainingDiverged, match="lower optimizer.lr"):
        _run(cfg)


@pytest.mark.slow
def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path):
    missing = run_script("train.py", f"resume={tmp_path}/nothing", f"hydra.run.dir={tmp_path}/run", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: invalid resume folder") and len(missing.stderr.strip().splitlines()) == 1
    nodata = run_script("train.py", "dataset=cifar10", f"dataset.root={tmp_path}/none", f"hydra.run.dir={tmp_path}/run", check=False)
    assert nodata.returncode == 2 and "download=true" in nodata.stderr and len(nodata.stderr.strip().splitlines()) == 1
    unknown = run_script("train.py", "model=nope", check=False)
    assert unknown.returncode != 0 and "nope" in unknown.stderr


@pytest.mark.slow
def test_help_lists_groups():
    out = run_script("train.py", "--help").stdout
    for group in ("dataset", "model", "optimizer", "scheduler"):
        assert f"{group}:" in out
    assert "multistep_he" in out and "resnet20" in out
