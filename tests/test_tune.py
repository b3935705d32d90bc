"""tune.py through the real Hydra Optuna sweeper on SQLite: kill and resume, failed trials, the best config."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, ROOT, make_cfg
from hydra_inprocess import hydra_main

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
TINY = ["model=mlpnet", "train.epochs=1", "progress=false"]


def study_args(tmp_path, name):
    return [f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", f"hydra.sweeper.study_name={name}",
            f"hydra.sweep.dir={tmp_path}/multirun", *TINY]


def load(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def count_complete(tmp_path):
    """Finished trials so far, read without write access: opening the database through Optuna while the other
    process creates it would race with its schema creation."""
    db = tmp_path / "optuna.db"
    if not db.is_file():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a write
        return 0


def test_killed_study_continues_with_the_trials_of_both_runs(tmp_path):
    args = ["--multirun", *study_args(tmp_path, "resume")]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tune.py"), *args, "hydra.sweeper.n_trials=100"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while count_complete(tmp_path) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = load(tmp_path, "resume").trials
    assert sum(t.state == COMPLETE for t in first) >= 2, "the first run was killed before it finished two trials"

    hydra_main("tune", *args, "hydra.sweeper.n_trials=2")

    trials = load(tmp_path, "resume").trials
    assert len(trials) == len(first) + 2  # one study: the killed run's trials (a RUNNING orphan too) and 2 new ones
    assert [t.params for t in trials[:len(first)]] == [t.params for t in first]
    resumed = trials[len(first):]
    assert all(t.state == COMPLETE for t in resumed)
    # The resumed run was reseeded from (seed, trials so far): it does not re-draw the killed run's first points.
    assert not any(t.params == f.params for t in resumed for f in first)
    folder = tmp_path / "resume"
    best = OmegaConf.load(folder / "best.yaml")
    assert best.value == max(t.value for t in trials if t.state == COMPLETE)
    for plot in ("history", "importances", "slices"):
        assert (folder / f"{plot}.png").stat().st_size > 1000


def test_failed_trial_is_recorded_and_the_study_goes_on_and_best_config_reruns(tmp_path):
    # Queue a diverging learning rate, then a sane one: the first trial must fail, the second complete.
    study = optuna.create_study(study_name="grid", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    study.enqueue_trial({"optimizer.lr": 1e9})
    study.enqueue_trial({"optimizer.lr": 0.05})
    hydra_main("tune", "--multirun", *study_args(tmp_path, "grid"), "optimizer.lr=tag(log,interval(0.01,1e9))",
               "train.log_every=5", "hydra.sweeper.n_trials=2")
    trials = load(tmp_path, "grid").trials
    assert [t.state for t in trials] == [FAIL, COMPLETE]
    assert [t.params["optimizer.lr"] for t in trials] == [1e9, 0.05]

    folder = tmp_path / "grid"
    best = OmegaConf.load(folder / "best.yaml")
    assert "optimizer.lr=0.05" in best.overrides and best.objective == "best_ema/val_acc"
    # The written config reruns the best trial with train.py and gives exactly its objective value.
    hydra_main("train", "--config-path", str(folder), "--config-name", "best_config", f"hydra.run.dir={tmp_path}/rerun")
    rerun = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert rerun["metrics"]["best_ema/val_acc"] == best.value


def test_search_spaces_compose():
    cfg = make_cfg("tune", ["hparams_search=train"])
    assert cfg.objective.startswith("best_ema/") and cfg.objective.split("/")[-1].startswith("val_")
    assert cfg.task == "ema"


@pytest.mark.parametrize("space,root,keys", [("zip", "zip", {"merge.alpha", "merge.beta"}),
                                             ("ot", "fuse", {"merge.reg"})])
def test_merge_search_spaces_compose_with_their_scripts(space, root, keys):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(root, overrides=[f"+hparams_search={space}"], return_hydra_config=True)
    assert cfg.objective.split("/")[-1].startswith("val_")  # selection on the validation split, never test
    assert cfg.hydra.sweeper._target_.endswith("StudySweeper") and cfg.hydra.sweeper.study_name == space
    assert set(cfg.hydra.sweeper.params) == keys
    for key in keys:  # the searched keys are real options of the merge method
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
