"""The EMA study: a tail average that is exactly a running mean, one run equal to one run per decay, the table."""

import json

import pytest
import torch
from torch import nn

from conftest import make_cfg
from mergelab.checkpoints import load_checkpoint
from mergelab.ema import EMA
from mergelab.runner import _run

SMALL = ["train.epochs=2", "train.batch_size=256"]


def test_tail_average_is_the_mean_of_the_weights_after_each_step_from_its_start():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with_tail = EMA(model, [0.9, 0.99], tail_start=3)
    without = EMA(model, [0.9, 0.99])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    after_start = []
    for step in range(9):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with_tail.update()
        without.update()
        if step >= 3:
            after_start.append({k: v.clone() for k, v in model.state_dict().items()})
    assert with_tail.labels == ["ema0.9", "ema0.99", "tail"]
    tail = with_tail.state_dict_for(2)
    for k, v in tail.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, torch.stack([s[k] for s in after_start]).mean(0), msg=k)
        else:  # integer buffers are copied from the live model
            assert torch.equal(v, model.state_dict()[k])
    # Adding the tail to the fused update leaves every EMA exactly as it was.
    for i in range(2):
        for k, v in without.state_dict_for(i).items():
            assert torch.equal(with_tail.state_dict_for(i)[k], v), k


def test_one_run_tracks_every_decay_exactly_as_one_run_per_decay(tmp_path):
    """The study trains one model per decay; tracking all in one run must give the same averaged weights."""
    all_at_once, single = tmp_path / "all", tmp_path / "single"
    _run(make_cfg("ema", ["model=mlpnet", *SMALL], all_at_once))
    _run(make_cfg("ema", ["model=mlpnet", *SMALL, "averaged.decay=0.999", "ema.tail=null"], single))
    for name in ("last", "ema0.999"):
        a, _ = load_checkpoint(all_at_once / "checkpoints" / f"{name}.safetensors")
        b, _ = load_checkpoint(single / "checkpoints" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    results = json.loads((all_at_once / "results.json").read_text())
    assert results["task"] == "ema"
    methods = [row["method"] for row in results["table"]]
    assert methods == ["raw", "ema0.9", "ema0.99", "ema0.999", "ema0.9995", "ema0.9997", "tail"]
    assert all("recompute_bn_val_acc" not in row for row in results["table"])  # no BatchNorm in an MLP
    # Every average was evaluated after every epoch, on val and test.
    assert all(f"{m}/{s}_acc" in record for record in results["history"] for m in methods for s in ("val", "test"))
    best = max(methods[1:-1], key=lambda m: results["metrics"][f"{m}/val_acc"])
    assert results["metrics"]["best_ema/decay"] == float(best[3:])
    assert results["metrics"]["best_ema/test_acc"] == results["metrics"][f"{best}/test_acc"]
    single_results = json.loads((single / "results.json").read_text())
    assert single_results["metrics"]["best_ema/decay"] == 0.999
    tail, meta = load_checkpoint(all_at_once / "checkpoints" / "tail.safetensors")
    assert meta["tail_start"] == round(0.75 * results["steps"])


def test_batchnorm_is_reported_with_averaged_and_recomputed_statistics(tmp_path):
    _run(make_cfg("ema", ["model=resnet20", "model.width=0.25", "train.epochs=1", "ema.decays=[0.9,0.999]"],
                  tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["method"]: row for row in results["table"]}
    assert list(rows) == ["raw", "ema0.9", "ema0.999", "tail"]
    for name in ("ema0.9", "ema0.999", "tail"):
        assert {"val_acc", "test_acc", "recompute_bn_val_acc", "recompute_bn_test_acc"} <= rows[name].keys()
    # After a short run the 0.999 average still holds its initial BatchNorm statistics; recomputing them for its
    # weights changes what it predicts, so the two columns must come from different models.
    assert (rows["ema0.999"]["val_acc"], rows["ema0.999"]["test_acc"]) != \
        (rows["ema0.999"]["recompute_bn_val_acc"], rows["ema0.999"]["recompute_bn_test_acc"])


@pytest.mark.parametrize("override", [
    "averaged.decay=0.9995", "global_seed=1234", "optimizer.lr=0.02", "model=resnet20",
    *(f"scheduler={s}" for s in ("multistep_he", "step_effnet", "constant", "cosine", "linear")),
])
def test_the_study_override_names_compose(override):
    cfg = make_cfg("ema", [override])
    key, value = override.split("=")
    if key == "scheduler":
        assert cfg.scheduler._target_ == f"mergelab.schedules.{value}"
    elif key == "model":
        assert cfg.model._target_ == "mergelab.models.resnet20"
    else:
        assert str(cfg[key.split(".")[0]] if "." not in key else cfg[key.split(".")[0]][key.split(".")[1]]) == value
    if key == "global_seed":
        assert cfg.seed == 1234


def _reference_lerp(before, live, decay):
    return {k: decay * before[k] + (1 - decay) * live[k] for k in before}


@pytest.mark.parametrize("move", ["assign", "data", "to"])
def test_ema_follows_tensors_moved_after_it_was_built(move):
    """The EMA reads the live weights as views of its flat buffer; replacing or re-pointing any of them (not only
    the first) must not leave it averaging stale storage."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    ema = EMA(model, [0.5])
    before = {k: v.clone() for k, v in ema.state_dict_for(0).items()}
    new = {k: torch.randn_like(v) if v.is_floating_point() else v + 7 for k, v in model.state_dict().items()}
    if move == "assign":
        model.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
    elif move == "data":  # the last layer's weight only: the first tensor stays where it was
        model[3].weight.data = new["3.weight"].clone()
        new = {k: new[k] if k == "3.weight" else v.detach().clone() for k, v in model.state_dict().items()}
    else:  # a round trip through float64: every tensor keeps its object but gets new storage
        model.double().float()
        new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema.update()
    expected = _reference_lerp({k: v.float() for k, v in before.items() if v.is_floating_point()},
                               {k: new[k].float() for k in before if before[k].is_floating_point()}, 0.5)
    got = ema.state_dict_for(0)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, msg=k)
    assert torch.equal(got["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])
    # ...and keeps following them: a second step after an in-place change of the new tensors.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    for k, v in model.named_parameters():
        torch.testing.assert_close(got[k], 0.5 * expected[k] + 0.5 * v.detach(), msg=k)


def test_warmup_names_tensorflow_and_matches_timm_model_ema_v3():
    """``warmup=true`` is TensorFlow's ``(1 + t) / (10 + t)``; ``warmup="timm"`` is timm ModelEmaV3's schedule,
    checked against timm itself, weights included."""
    from timm.utils import ModelEmaV3

    assert "TensorFlow" in EMA.__doc__ and "timm schedule" not in EMA.__doc__
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tf = EMA(model, [0.99], warmup=True)
    assert [tf.decay_at(0.99, t) for t in (0, 5, 1000)] == [1 / 10, 6 / 15, 0.99]
    reference = ModelEmaV3(model, decay=0.99, use_warmup=True)
    ours = EMA(model, [0.99], warmup="timm")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(30):
        assert ours.decay_at(0.99, step) == pytest.approx(reference.get_decay(step + 1))
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        tf.update()
        ours.update()
        reference.update(model, step=step + 1)  # timm's training loop passes the count of steps done
    for k, v in reference.module.state_dict().items():
        torch.testing.assert_close(ours.state_dict_for(0)[k], v, msg=k)
    with pytest.raises(ValueError, match="warmup"):
        EMA(model, [0.9], warmup="cosine")
