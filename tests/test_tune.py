"""tune.py through mergelab's Hydra sweeper on Optuna >= 4: a killed study continues and retries the killed trial,
pruned and failed trials, the best config reruns, a two-objective study's Pareto front, optuna-dashboard reads it."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import closing
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, ROOT, make_cfg
from hydra_inprocess import hydra_main
from mergelab.runner import _run
from mergelab.errors import UserError
from mergelab.tuning import HEARTBEAT_ATTR, RetryCallback, make_pruner, open_storage, search_space

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
COMPLETE, FAIL, PRUNED, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                   optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
TINY = ["model=mlpnet", "train.epochs=1", "progress=false"]


@pytest.fixture(scope="module")
def zip_task_models(tmp_path_factory):
    """Two small MLPs trained from different seeds on digits 0-4 and 5-9: a ZipIt! population."""
    root = tmp_path_factory.mktemp("tasks")
    for seed, classes in ((0, "[0,1,2,3,4]"), (1, "[5,6,7,8,9]")):
        _run(make_cfg("train", ["model=mlpnet", "model.hidden=[48,32,24]", "train.epochs=4", "train.batch_size=32",
                                f"dataset.classes={classes}", f"seed={seed}"], root / f"task{seed}"))
    return root


def study_args(tmp_path, name):
    return [f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", f"hydra.sweeper.study_name={name}",
            f"hydra.sweep.dir={tmp_path}/multirun", *TINY]


def storage_url(tmp_path, kind):
    return f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal:{tmp_path}/journal.log"


def load(tmp_path, name, kind="sqlite"):
    url = storage_url(tmp_path, kind)
    return optuna.load_study(study_name=name, storage=url if kind == "sqlite" else open_storage(url))


def progress(tmp_path, kind, name):
    """(finished trials, running trials with a heartbeat) so far, read while another process writes the study.

    SQLite is read without write access: opening it through Optuna while the other process creates it would race
    with its schema creation. A journal file is append-only and safe to read."""
    if kind == "sqlite":
        db = tmp_path / "optuna.db"
        queries = ("SELECT count(*) FROM trials WHERE state = 'COMPLETE'",
                   "SELECT count(*) FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                   "WHERE t.state = 'RUNNING'")
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                return tuple(con.execute(q).fetchone()[0] for q in queries)
        except sqlite3.OperationalError:  # no file or tables yet, or locked for a write
            return 0, 0
    if not (tmp_path / "journal.log").is_file():
        return 0, 0
    try:
        trials = load(tmp_path, name, kind).trials
    except KeyError:  # the study is not created yet
        return 0, 0
    return (sum(t.state == COMPLETE for t in trials),
            sum(t.state == RUNNING and HEARTBEAT_ATTR in t.system_attrs for t in trials))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_study_continues_and_retries_the_killed_trial(tmp_path, kind):
    args = ["--multirun", *study_args(tmp_path, "resume"), f"hydra.sweeper.storage={storage_url(tmp_path, kind)}",
            "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tune.py"), *args, "hydra.sweeper.n_trials=100"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while progress(tmp_path, kind, "resume") < (1, 1) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = load(tmp_path, "resume", kind).trials
    killed = [t for t in first if t.state == RUNNING]
    assert len(killed) == 1 and any(t.state == COMPLETE for t in first), [t.state for t in first]
    time.sleep(2.5)  # the killed trial's last heartbeat is now older than the grace period

    hydra_main("tune", *args, "hydra.sweeper.n_trials=2")

    trials = load(tmp_path, "resume", kind).trials
    assert len(trials) == len(first) + 2  # one study: the killed run's trials and the 2 of the rerun
    assert [t.params for t in trials[:len(first)]] == [t.params for t in first]
    assert trials[killed[0].number].state == FAIL  # stale heartbeat: failed by the rerun...
    retry, new = trials[len(first):]
    # ...and enqueued again with its parameters: the rerun's first trial.
    assert RetryCallback.retried_trial_number(retry) == killed[0].number and retry.params == killed[0].params
    assert retry.state == new.state == COMPLETE
    # The rerun was reseeded from (seed, trials so far): it does not re-draw the killed run's points.
    assert not any(new.params == f.params for f in first)
    folder = tmp_path / "resume"
    best = OmegaConf.load(folder / "best.yaml")
    assert best.value == max(t.value for t in trials if t.state == COMPLETE)
    assert best.trials.FAIL == 1 and best.trials.COMPLETE == sum(t.state == COMPLETE for t in trials)
    for plot in ("history", "importances", "slices"):
        assert (folder / f"{plot}.png").stat().st_size > 1000


def serve_dashboard(storage):
    """optuna-dashboard's WSGI app on 127.0.0.1 (a free port) in a thread; returns (base URL, server)."""
    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(storage), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def get_json(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_pruned_and_failed_trials_best_config_reruns_and_the_dashboard_reads_the_study(tmp_path):
    # Queued: a sane learning rate (completes, sets the median), a diverging one (FAIL), a too small one (pruned
    # after its first of 3 epochs, far below the median).
    study = optuna.create_study(study_name="grid", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    for lr in (0.05, 1e9, 1e-5):
        study.enqueue_trial({"optimizer.lr": lr})
    hydra_main("tune", "--multirun", *study_args(tmp_path, "grid"), "optimizer.lr=tag(log,interval(1e-5,1e9))",
               "train.epochs=3", "averaged.decay=0.9", "train.log_every=5", "hydra.sweeper.n_trials=3",
               "hydra.sweeper.pruner=median", "hydra.sweeper.pruner_options={n_startup_trials:1,n_warmup_steps:0}")
    trials = load(tmp_path, "grid").trials
    assert [t.state for t in trials] == [COMPLETE, FAIL, PRUNED]
    assert [t.params["optimizer.lr"] for t in trials] == [0.05, 1e9, 1e-5]
    assert "averaged.decay" not in trials[0].params  # fixed on the command line: not searched
    assert sorted(trials[0].intermediate_values) == [1, 2, 3]  # the objective after every epoch
    assert sorted(trials[2].intermediate_values) == [1]  # pruned: its training stopped after epoch 1
    pruned_run = next((tmp_path / "multirun").glob("2_*"))
    assert not (pruned_run / "results.json").exists()
    assert trials[2].intermediate_values[1] < trials[0].intermediate_values[1]

    folder = tmp_path / "grid"
    best = OmegaConf.load(folder / "best.yaml")
    assert best.trial == 0 and "optimizer.lr=0.05" in best.overrides and best.objective == "best_ema/val_acc"
    assert best.value == trials[0].values[0] == trials[0].intermediate_values[3]
    # The written config reruns the best trial with train.py and gives exactly its objective value.
    hydra_main("train", "--config-path", str(folder), "--config-name", "best_config", f"hydra.run.dir={tmp_path}/rerun")
    rerun = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert rerun["metrics"]["best_ema/val_acc"] == best.value

    # optuna-dashboard serves the study from the same storage.
    url, server = serve_dashboard(f"sqlite:///{tmp_path}/optuna.db")
    try:
        studies = get_json(f"{url}/api/studies")["study_summaries"]
        (entry,) = [s for s in studies if s["study_name"] == "grid"]
        detail = get_json(f"{url}/api/studies/{entry['study_id']}")
    finally:
        server.shutdown()
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Fail", "Pruned"]
    assert detail["trials"][0]["values"] == [best.value]
    assert [t["number"] for t in detail["best_trials"]] == [0]


def test_two_objective_zipit_study_on_a_journal_file_writes_its_pareto_front(zip_task_models, tmp_path):
    hydra_main("zip", "--multirun", "+hparams_search=zip_pareto", f"models={zip_task_models}/task*",
               "merge.num_samples=64", "progress=false", "hydra.sweeper.n_trials=4",
               f"hydra.sweeper.storage=journal:{tmp_path}/journal.log", f"hydra.sweep.dir={tmp_path}/multirun")
    study = optuna.load_study(study_name="zip_pareto", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))))
    done = [t for t in study.trials if t.state == COMPLETE]
    assert len(done) == 4 and [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    # The Pareto front by hand: a trial is on it iff no other has accuracy >= and MACs <=, one of them strictly.
    dominated = {a.number for a in done for b in done
                 if b.values[0] >= a.values[0] and b.values[1] <= a.values[1] and b.values != a.values}
    pareto = OmegaConf.load(tmp_path / "zip_pareto" / "pareto.yaml")
    assert sorted(p.trial for p in pareto.pareto) == sorted(t.number for t in done if t.number not in dominated)
    # The MACs objective is the zipped model's cost: it falls as the cut moves up (more of it shared by the tasks).
    macs = {t.params["merge.stop_at"]: t.values[1] for t in done}
    assert all(macs[a] > macs[b] for a in macs for b in macs if a < b)
    assert (tmp_path / "zip_pareto" / "pareto_front.png").stat().st_size > 1000
    # A Pareto-optimal trial's config reruns it with zip.py and gives its two objective values.
    first = pareto.pareto[0]
    hydra_main("zip", "--config-path", str(tmp_path / "zip_pareto"),
               "--config-name", first.config.removesuffix(".yaml"), f"hydra.run.dir={tmp_path}/rerun")
    rerun = json.loads((tmp_path / "rerun" / "results.json").read_text())["metrics"]
    assert [rerun["zipit+repair/val_joint_acc"], rerun["zipit+repair/macs"]] == list(first["values"])


def test_search_space_from_hydra_sweeps():
    space, fixed = search_space(["a=tag(log,interval(1e-3,1))", "b=choice(1,2.5,x)", "c=range(2,8,2)",
                                 "d=interval(0,1)", "e=null", "d=0.5", "f=false"])
    assert space["a"] == optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    assert space["b"] == optuna.distributions.CategoricalDistribution([1, 2.5, "x"])
    assert space["c"] == optuna.distributions.IntDistribution(2, 6, step=2)  # range's stop is excluded
    assert fixed == {"e": "null", "d": "0.5", "f": "false"}  # as typed; a later override replaces the sweep of d


def test_bad_sweeper_settings_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tune.py"), "--multirun", *study_args(tmp_path, "bad"),
                           "hydra.sweeper.direction=[maximize,minimize]"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: objective=best_ema/val_acc")
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) == 1
    with pytest.raises(UserError, match="median, hyperband, none"):
        make_pruner("nope")
    with pytest.raises(UserError, match="do not fit the median pruner"):
        make_pruner("median", {"n_startup": 1})


def test_search_spaces_compose():
    cfg = make_cfg("tune", ["hparams_search=train"])
    assert cfg.objective.startswith("best_ema/") and cfg.objective.split("/")[-1].startswith("val_")
    assert cfg.task == "ema"


@pytest.mark.parametrize("space,root,keys", [("zip", "zip", {"merge.alpha", "merge.beta"}),
                                             ("zip_pareto", "zip", {"merge.alpha", "merge.beta", "merge.stop_at"}),
                                             ("ot", "fuse", {"merge.reg"})])
def test_merge_search_spaces_compose_with_their_scripts(space, root, keys):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(root, overrides=[f"+hparams_search={space}"], return_hydra_config=True)
    objectives = [cfg.objective] if isinstance(cfg.objective, str) else list(cfg.objective)
    assert objectives[0].split("/")[-1].startswith("val_")  # selection on the validation split, never test
    assert cfg.hydra.sweeper._target_.endswith("StudySweeper") and cfg.hydra.sweeper.study_name == space
    assert set(cfg.hydra.sweeper.params) == keys
    for key in keys:  # the searched keys are real options of the merge method
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
