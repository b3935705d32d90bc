"""Checkpoints from anywhere: every accepted format, written here, loads through soup.py (and the population
loader that fuse.py and zip.py share); what does not fit the named model is refused in one line."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_cfg, run_script
from mergelab.checkpoints import load_checkpoint, read_weights
from mergelab.errors import UserError
from mergelab.models import build_model
from mergelab.population import match_prefixes, open_population
from mergelab.runner import _run

MODEL = ["model=mlpnet", "model.hidden=[16]"]


def mlp_states(n, hidden=(16,)):
    """n random MLPNets shaped for digits (1 x 8 x 8 inputs, 10 classes)."""
    states = []
    for seed in range(n):
        torch.manual_seed(seed)
        states.append(build_model({"_target_": "mergelab.models.MLPNet", "hidden": list(hidden)}, 10, 1, 8)
                      .state_dict())
    return states


def mean(states):
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def write_sharded(folder, state):
    """Hugging Face's layout: shards plus model.safetensors.index.json whose weight_map names each tensor's shard."""
    folder.mkdir(parents=True)
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def soup(tmp_path, ingredients, *overrides, name="run"):
    cfg = make_cfg("soup", [f"ingredients={ingredients}", "merge=uniform", *MODEL, *overrides], tmp_path / name)
    _run(cfg)
    results = json.loads((tmp_path / name / "results.json").read_text())
    return results, load_checkpoint(tmp_path / name / "checkpoints" / "uniform.safetensors")[0]


def assert_state(actual, expected):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], msg=k)


def test_every_format_loads_and_soups_to_the_mean(tmp_path):
    states = mlp_states(5)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_file(states[0], str(folder / "a.safetensors"))  # no mergelab metadata
    torch.save(states[1], folder / "b.pt")  # a plain state dict
    torch.save({"state_dict": {f"module.{k}": v for k, v in states[2].items()}, "epoch": 3}, folder / "c.pth")
    torch.save({"model": {f"model.{k}": v for k, v in states[3].items()}}, folder / "d.bin")
    write_sharded(folder / "e", {f"net.{k}": v for k, v in states[4].items()})  # a prefix the model lacks
    members = open_population(f"{folder}/*", make_cfg("soup", MODEL))
    assert [m.name for m in members] == ["a.safetensors", "b.pt", "c.pth", "d.bin", "e"]
    for member, state in zip(members, states):
        assert member.foreign and member.meta["num_classes"] == 10
        assert_state(member.state(), state)
    results, uniform = soup(tmp_path, f"{folder}/*")
    assert_state(uniform, mean(states))
    assert len(results["ingredients"]) == 5


def test_foreign_checkpoints_need_the_architecture_on_the_command_line(tmp_path):
    states = mlp_states(2)
    for i, state in enumerate(states):
        torch.save(state, tmp_path / f"{i}.pt")
    with pytest.raises(UserError, match="no mergelab metadata.*model=<name>"):
        _run(make_cfg("soup", [f"ingredients={tmp_path}/*.pt", "merge=uniform"], tmp_path / "run"))


def test_pickled_objects_are_not_loaded(tmp_path):
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a whole module: needs unpickling code
    with pytest.raises(UserError, match="holds objects other than tensors, so it was not loaded") as info:
        read_weights(tmp_path / "module.pt")
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read weights file .*garbage.pt \(Unsupported operand") as info:
        read_weights(tmp_path / "garbage.pt")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    torch.save({"lr": 0.1, "steps": [1, 2]}, tmp_path / "numbers.pt")  # weights-only, but no tensors
    with pytest.raises(UserError, match="does not hold a state dict"):
        read_weights(tmp_path / "numbers.pt")


def test_prefixes_are_stripped_or_added_to_fit_the_model():
    expected = ["fc1.weight", "classifier.bias"]
    assert match_prefixes(["module.model.fc1.weight", "module.model.classifier.bias"], expected) == {
        "fc1.weight": "module.model.fc1.weight", "classifier.bias": "module.model.classifier.bias"}
    assert match_prefixes(["conv.weight"], ["net.conv.weight"]) == {"net.conv.weight": "conv.weight"}
    assert match_prefixes(expected, expected) == {}


@pytest.mark.slow
def test_checkpoints_that_do_not_fit_the_named_model_are_one_line_and_exit_2(tmp_path):
    wide = mlp_states(2, hidden=(16, 8))  # a second hidden layer the named model lacks
    for i, state in enumerate(wide):
        save_file(state, str(tmp_path / f"{i}.safetensors"))
    proc = run_script("soup.py", f"ingredients={tmp_path}/*.safetensors", *MODEL, "merge=uniform",
                      f"hydra.run.dir={tmp_path}/run", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "does not fit the model MLPNet" in lines[0]
    assert "0 missing keys" in lines[0] and "2 unexpected keys (first: ['fc2.bias', 'fc2.weight'])" in lines[0]
    assert not any(line.startswith("Traceback") for line in proc.stderr.splitlines())
    # The same checkpoints with their architecture named load and soup, through the command line.
    proc = run_script("soup.py", f"ingredients={tmp_path}/*.safetensors", "model=mlpnet", "model.hidden=[16,8]",
                      "merge=uniform", f"hydra.run.dir={tmp_path}/ok")
    assert_state(load_checkpoint(tmp_path / "ok" / "checkpoints" / "uniform.safetensors")[0], mean(wide))


def test_a_timm_state_dict_loads_as_model_timm(tmp_path):
    import timm

    net = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "timm.pth")
    (member,) = open_population(str(tmp_path / "timm.pth"),
                                make_cfg("soup", ["model=timm", "model.name=test_resnet"]))
    model = member.model()
    assert model.arch == "timm:test_resnet"
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model.eval()(x), net.eval()(x))
