"""Bad input ends in one line ``error: ...`` and exit status 2, whichever layer meets it: the command line Hydra
composes, an object built from config, a training setting, or a path copied from a multirun folder."""

from __future__ import annotations

import json
import logging

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException

from conftest import make_cfg
from hydra_inprocess import hydra_main
from mergelab.config import check_training, instantiate, safe_dirname
from mergelab.errors import UserError
from mergelab.runner import _run


@pytest.fixture
def cli(capsys, monkeypatch):
    """``python <script>.py <argv>`` in this process; returns (exit status, stderr)."""

    def call(script: str, *argv: str) -> tuple[int, str]:
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        handlers, level = logging.root.handlers[:], logging.root.level  # Hydra configures logging for its job
        capsys.readouterr()
        try:
            hydra_main(script, *argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            GlobalHydra.instance().clear()
            logging.root.handlers[:], logging.root.level = handlers, level
        return code, capsys.readouterr().err.strip()

    return call


def one_line_exit_2(result: tuple[int, str], match: str) -> None:
    code, err = result
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and match in err, (code, err)


# ------------------------------------------------------------------------------------------- training settings
@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed=abc must be a whole number"),
    ("train.batch_size=abc", "train.batch_size=abc must be a whole number >= 1"),
    ("train.epochs=-1", "train.epochs=-1 must be a whole number >= 1"),
    ("model.hidden=[8,0]", "MLPNet gives fc2.weight no units"),
    ("train.epochs=0", "train.epochs=0 must be a whole number >= 1"),
    ("train.epochs=1.5", "train.epochs=1.5 must be a whole number"),
    ("train.log_every=0", "train.log_every=0 must be a whole number >= 1"),
    ("train.label_smoothing=1.5", "train.label_smoothing=1.5 must be in [0, 1)"),
    ("train.grad_clip=-1", "train.grad_clip=-1 must be a positive norm"),
    ("train.precision=fp8", "train.precision=fp8 is not one of fp32 | bf16"),
    ("optimizer.lr=0", "optimizer.lr=0 must be positive"),
    ("optimizer.lr=nan", "optimizer.lr=nan must be positive"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1 must be >= 0"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5 must be in [0, 1)"),
    ("scheduler.warmup=-1", "scheduler.warmup=-1 must be >= 0"),
    ("ema.decays=[0.9,1.5]", "ema.decays=1.5 must be each in [0, 1)"),
    ("averaged.decay=1", "averaged.decay=1 must be in [0, 1)"),
    ("ema.every=0", "ema.every=0 must be a whole number >= 1"),
    ("ema.buffers=foo", "ema.buffers=foo is not one of average | copy"),
])
def test_training_settings_are_refused_before_training(override, message, tmp_path):
    with pytest.raises(UserError) as info:
        _run(make_cfg("train", ["model.hidden=[8]", override], tmp_path))
    assert message in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


def test_every_shipped_training_config_passes_the_checks():
    for name in ("train", "ema", "finetune"):
        check_training(make_cfg(name))
    for experiment in ("ema_figure1", "ema_table2"):
        check_training(make_cfg("ema", [f"experiment={experiment}"]))


# ------------------------------------------------------------------------------------------- instantiate
class Refuses:
    def __init__(self, reg: float = 1.0):
        if reg <= 0:
            raise UserError(f"merge.reg must be positive for the Sinkhorn solver, got {reg}")


class Buggy:
    def __init__(self):
        raise ZeroDivisionError("a bug")


def test_instantiate_turns_bad_config_into_user_errors_and_keeps_bugs():
    with pytest.raises(UserError, match="^merge.reg must be positive"):
        instantiate({"_target_": f"{__name__}.Refuses", "reg": 0}, key="merge")
    with pytest.raises(UserError, match="^merge.regg is not an option of .*Refuses"):
        instantiate({"_target_": f"{__name__}.Refuses", "regg": 1}, key="merge")
    with pytest.raises(UserError, match="^merge: cannot find _target_ mergelab.nothing.Here"):
        instantiate({"_target_": "mergelab.nothing.Here"}, key="merge")
    with pytest.raises(InstantiationException, match="a bug"):
        instantiate({"_target_": f"{__name__}.Buggy"})
    # Options the caller reads itself never reach the target.
    assert isinstance(instantiate({"_target_": f"{__name__}.Refuses", "correction": "none"}, exclude=["correction"]),
                      Refuses)


# ------------------------------------------------------------------------------------------- multirun paths
def test_multirun_folder_names_are_read_literally():
    for overrides in ("ema.decays-[0.9,0.99]+seed-1", "dataset.classes-[0,1]+name-'a b'+x-{a:1}+path-a/b=c"):
        name = safe_dirname(overrides)
        assert all(ch.isalnum() or ch in "_.+@%-" for ch in name), name
        parsed = OverridesParser.create().parse_overrides([f"models=[outputs/x/0_{name},outputs/y/1_{name}]"])
        assert parsed[0].value() == [f"outputs/x/0_{name}", f"outputs/y/1_{name}"]
    assert safe_dirname("ema.decays-[0.9,0.99]+seed-1") == "ema.decays-0.9_0.99+seed-1"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-job multirun of train.py, as a user would start it."""
    folder = tmp_path_factory.mktemp("multirun")
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        hydra_main("train", "--multirun", "seed=0,1", "train.epochs=1", "model.hidden=[16]", "ema.decays=[0.9]",
                   "progress=false", f"hydra.sweep.dir={folder}")
    finally:
        GlobalHydra.instance().clear()
        logging.root.handlers[:], logging.root.level = handlers, level
    return folder


def test_paths_copied_from_a_multirun_work_unquoted(sweep, cli, tmp_path):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == [f"{i}_ema.decays-0.9+model.hidden-16+progress-False+seed-{i}+train.epochs-1"
                                      for i in range(2)]
    code, err = cli("fuse", f"models=[{jobs[0]},{jobs[1]}]", "merge=permute", f"out_dir={tmp_path}")
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["models"] == [str(p / "checkpoints" / "last.safetensors") for p in jobs]


def test_command_line_errors_are_one_line_with_exit_2(sweep, cli, tmp_path):
    models = f"models={sweep}/*"
    out = f"out_dir={tmp_path}"
    # A UserError raised inside Hydra's instantiate (the OT constructor refuses reg=0).
    one_line_exit_2(cli("fuse", models, "merge=ot", "merge.solver=sinkhorn", "merge.reg=0", out),
                    "merge.reg must be positive for the Sinkhorn solver")
    one_line_exit_2(cli("fuse", models, "+merge.bogus=1", out), "merge.bogus is not an option of")
    one_line_exit_2(cli("fuse", models, "merge.correction=[none,fix]", out), "merge.correction=['none', 'fix']")
    one_line_exit_2(cli("fuse", models, "retrain.epochs=-1", out), "retrain.epochs=-1 must be a whole number >= 0")
    # What Hydra itself refuses while composing the command line.
    one_line_exit_2(cli("fuse", models, "merge=nope", out),
                    "Could not find 'merge/nope'; choose one of: average, dare, ensemble")
    one_line_exit_2(cli("fuse", models, "merge.nope=1", out), "Could not override 'merge.nope'")
    one_line_exit_2(cli("fuse", "models=[a=b]", out), "cannot parse the command line")
    one_line_exit_2(cli("fuse", out), "models is required")
    one_line_exit_2(cli("train", "+optimizer.bogus=1", out), "optimizer.bogus is not an option of torch.optim.SGD")
    one_line_exit_2(cli("train", "+scheduler.bogus=1", out), "scheduler.bogus is not an option of mergelab.schedules")
    # A UserError of a multirun job ends the sweep the same way, after Hydra's line naming the failed job.
    code, err = cli("train", "--multirun", "train.epochs=-1", f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 2 and err.splitlines() == [
        "Error executing job with overrides: ['train.epochs=-1']",
        "error: train.epochs=-1 must be a whole number >= 1; e.g. train.epochs=10"]
