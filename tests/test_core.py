"""EMA, schedules, checkpoints and metric keys: the pieces of the training loop that have an exact specification."""

import math
import os

import pytest
import torch
from torch import nn

from mergelab import schedules
from mergelab.checkpoints import (
    atomic_write, flatten_state, load_checkpoint, read_meta, save_checkpoint, unflatten_state,
)
from mergelab.ema import EMA
from mergelab.errors import UserError
from mergelab.evaluation import recompute_bn
from mergelab.metrics import (
    MetricKey, metric_key, methods_in, parse_metric_key, row_from_metrics, table_metrics,
)


def small_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_ema_matches_reference_recursion(warmup, buffers):
    model = small_bn_net()
    decays = [0.5, 0.9, 0.99]
    ema = EMA(model, decays, warmup=warmup, buffers=buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = [{k: v.clone() for k, v in model.state_dict().items()} for _ in decays]
    for step in range(7):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        live = model.state_dict()
        for ref, decay in zip(reference, decays):
            d = min(decay, (1 + step) / (10 + step)) if warmup else decay
            for k, v in live.items():
                averaged = v.is_floating_point() and (buffers == "average" or "running" not in k)
                ref[k] = d * ref[k] + (1 - d) * v if averaged else v.clone()
    for i, ref in enumerate(reference):
        got = ema.state_dict_for(i)
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], msg=k)
    # The averages really moved away from the live weights (the test would catch a no-op copy).
    assert not torch.allclose(ema.state_dict_for(2)["0.weight"], model.state_dict()["0.weight"])


def test_ema_round_trips_through_checkpoint_tensors(tmp_path):
    model = small_bn_net()
    ema = EMA(model, [0.9, 0.99])
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    other = EMA(small_bn_net(), [0.9, 0.99])
    other.load_tensors(ema.tensors(), ema.step)
    for i in range(2):
        for k, v in ema.state_dict_for(i).items():
            assert torch.equal(other.state_dict_for(i)[k], v)


def lr_curve(name, total=100, steps_per_epoch=10, **kwargs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = getattr(schedules, name)(opt, total_steps=total, steps_per_epoch=steps_per_epoch, **kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_warmup_is_linear_then_hands_over():
    lrs = lr_curve("constant", warmup=0.1)
    assert lrs[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert lrs[10:] == pytest.approx([1.0] * 90)
    assert lr_curve("constant", warmup=5)[:5] == pytest.approx([i / 6 for i in range(1, 6)])


def test_cosine_and_linear_decay_to_min_factor():
    cos = lr_curve("cosine")
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.5) and cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    lin = lr_curve("linear", min_factor=0.1)
    assert lin[0] == 1.0 and lin[50] == pytest.approx(1 - 0.9 * 0.5)
    assert all(a >= b for a, b in zip(lin, lin[1:]))


def test_multistep_he_divides_by_ten_at_half_and_three_quarters():
    lrs = lr_curve("multistep_he")
    assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1) and lrs[74] == pytest.approx(0.1)
    assert lrs[75] == pytest.approx(0.01)


def test_step_effnet_multiplies_by_097_every_two_epochs():
    lrs = lr_curve("step_effnet", total=100, steps_per_epoch=10)
    assert lrs[19] == 1.0 and lrs[20] == pytest.approx(0.97) and lrs[40] == pytest.approx(0.97**2)


def test_checkpoint_round_trip_keeps_tensors_and_meta(tmp_path):
    model = small_bn_net()
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), {"epoch": 3, "model": {"name": "x"}})
    tensors, meta = load_checkpoint(path)
    assert meta == {"epoch": 3, "model": {"name": "x"}} and read_meta(path) == meta
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v)
    assert (tmp_path / "m.json").is_file()


def test_interrupted_write_leaves_previous_checkpoint_readable(tmp_path):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"epoch": 1})

    def crash(tmp):
        tmp.write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.json", "last.safetensors"]  # no temporary file left behind


def test_corrupt_and_missing_checkpoints_are_user_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(UserError, match="corrupt checkpoint .*bad.safetensors"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_optimizer_state_flattens_to_safetensors_and_back(tmp_path):
    model = small_bn_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    tensors, skeleton = flatten_state(opt.state_dict(), "optimizer")
    save_checkpoint(tmp_path / "s.safetensors", tensors, {"optimizer": skeleton})
    loaded, meta = load_checkpoint(tmp_path / "s.safetensors")
    restored = torch.optim.Adam(small_bn_net().parameters(), lr=0.5)
    restored.load_state_dict(unflatten_state(loaded, meta["optimizer"]))
    assert restored.param_groups[0]["lr"] == 0.01
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(restored.state_dict()["state"][0][k], v)


def test_recompute_bn_matches_torch_update_bn():
    from torch.optim.swa_utils import update_bn

    batches = [(torch.randn(32, 4) * 3 + 1, torch.zeros(32, dtype=torch.long)) for _ in range(5)]
    ours, theirs = small_bn_net(), small_bn_net()
    recompute_bn(ours, batches)
    update_bn([x for x, _ in batches], theirs)
    bn_ours, bn_theirs = ours[1], theirs[1]
    assert not torch.allclose(bn_ours.running_mean, torch.zeros(8))
    torch.testing.assert_close(bn_ours.running_mean, bn_theirs.running_mean)
    torch.testing.assert_close(bn_ours.running_var, bn_theirs.running_var)
    assert bn_ours.momentum == 0.1


def test_ema_every_k_steps_folds_with_decay_to_the_k():
    model = small_bn_net()
    ema = EMA(model, [0.9], every=3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 10):
        with torch.no_grad():
            model[0].weight.add_(0.1 * step)
        ema.update()
        if step % 3 == 0:
            w = model.state_dict()["0.weight"]
            reference["0.weight"] = 0.9**3 * reference["0.weight"] + (1 - 0.9**3) * w
        torch.testing.assert_close(ema.state_dict_for(0)["0.weight"], reference["0.weight"])


@pytest.mark.parametrize("method, split, name, key", [
    ("raw", "val", "acc", "raw/val_acc"),
    ("ema0.999+recompute_bn", "test", "loss", "ema0.999+recompute_bn/test_loss"),
    ("zipit@7+repair", "val", "joint_acc", "zipit@7+repair/val_joint_acc"),
    ("zipit", None, "params", "zipit/params"),
    ("best_ema", None, "decay", "best_ema/decay"),
    ("soup/uniform", "test", "acc", "soup/uniform/test_acc"),  # a method holding "/": the column is after the last
])
def test_metric_keys_round_trip(method, split, name, key):
    assert metric_key(method, split, name) == key
    assert parse_metric_key(key) == MetricKey(method, split, name)


def test_metric_keys_refuse_what_they_cannot_name():
    for bad in ("val_acc", "/val_acc", "raw/"):
        with pytest.raises(ValueError, match="not a metric key"):
            parse_metric_key(bad)
    with pytest.raises(ValueError, match="unknown split"):
        metric_key("raw", "holdout", "acc")


def test_table_rows_and_metrics_convert_into_each_other():
    table = [{"method": "zipit", "depth": "19/20", "params": 10, "val_joint_acc": 90.0, "test_joint_acc": None},
             {"method": "zipit+repair", "depth": "19/20", "params": 10, "val_joint_acc": 91.0, "test_joint_acc": 92.0}]
    metrics = table_metrics(table, skip=["depth"])
    assert metrics == {"zipit/params": 10, "zipit/val_joint_acc": 90.0, "zipit+repair/params": 10,
                       "zipit+repair/val_joint_acc": 91.0, "zipit+repair/test_joint_acc": 92.0}
    assert table_metrics(table, columns=["val_joint_acc"]) == {"zipit/val_joint_acc": 90.0,
                                                               "zipit+repair/val_joint_acc": 91.0}
    assert methods_in(metrics) == ["zipit", "zipit+repair"]
    assert methods_in(metrics, split="test", name="joint_acc") == ["zipit+repair"]
    columns = ("params", "val_joint_acc", "test_joint_acc")
    assert [row_from_metrics(metrics, r["method"], columns) for r in table] == [
        {c: r[c] for c in columns} for r in table]
