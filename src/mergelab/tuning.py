"""Optuna (>= 4) studies run from Hydra's command line: ``python tune.py --multirun [overrides]``.

The sweeper plugin (``hydra_plugins.mergelab_study_sweeper.StudySweeper``, conf/hydra/sweeper/study.yaml) hands
its options and the command line to :func:`sweep`, which

- reads the search space from ``hydra.sweeper.params`` and the command line (Hydra's sweep syntax: ``interval``,
  ``tag(log, interval(...))``, ``choice``, ``range``; plain ``key=value`` overrides are fixed for every trial);
- opens the study on its storage (:func:`open_storage`: SQLite, any SQL URL, or ``journal:<file>``) and continues
  it if it exists; a run that joins a study that already has trials draws its sampler seed from
  ``(sampler seed, trials so far)``, so a restarted worker does not re-propose the first run's points;
- asks ``n_jobs`` trials at a time and launches them as ordinary Hydra jobs (their run folders, TensorBoard events,
  results.json) through whatever launcher is configured, while a thread keeps the trials' heartbeats; each job's
  config names its trial (``hydra.sweeper.trial_id``), so a training job reports its objective after every epoch and
  stops when the pruner says so (:func:`trial_reporter`);
- tells the study each outcome: COMPLETE with the job's return (one value per objective), PRUNED, or FAIL for a
  job that raised (a diverged run included). On SQL storages, a trial whose process died (killed, preempted) stops
  beating; the next sweep on the study marks it FAIL and enqueues it again (``max_retry``) through Optuna's
  ``fail_stale_trials`` and its retry callback (on journal storages, which have no heartbeats in Optuna, through the
  same rule on a heartbeat kept in the trial's system attributes);
- writes the results (:func:`export_study`): ``best.yaml`` and ``best_config.yaml`` (rerun it with
  ``python train.py --config-path <folder> --config-name best_config``), or for several objectives
  ``pareto.yaml`` and one config per Pareto-optimal trial; and the plots.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mergelab.checkpoints import write_json
from mergelab.config import instantiate
from mergelab.errors import UserError
from mergelab.metrics import metric_key

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"
JOURNAL = "journal:"
PRUNERS = ("median", "hyperband", "none")
# The sections of a job's hydra config worth keeping in a rerunnable config (run folders and their naming).
HYDRA_KEYS = ("run", "sweep", "job")
State = optuna.trial.TrialState
# Optuna 4.9 renamed the retry callback (the old name is deprecated there and removed in 6).
HEARTBEAT_ATTR = "mergelab:heartbeat"  # a journal-stored trial's last beat (seconds since the epoch)
RetryCallback = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                 or optuna.storages.RetryFailedTrialCallback)


# ------------------------------------------------------------------------------------------------------ storage
def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None) -> optuna.storages.BaseStorage:
    """The study's storage: ``journal:<file>`` is Optuna's JournalStorage on a (shared) file, anything else an SQL
    URL (``sqlite:///<file>``, ``postgresql://...``, ``mysql+pymysql://...``). SQL storages get Optuna's heartbeats
    and a callback that enqueues a stale trial again, at most ``max_retry`` times (journal storages: see
    :func:`heartbeats` and :func:`retry_stale_trials`)."""
    if not isinstance(url, str) or not url:
        raise UserError(f"hydra.sweeper.storage={url!r} must be sqlite:///<file>, a database URL or journal:<file>")
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):].removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open(2)-based lock works on NFSv3 and later, the shared file systems of clusters.
        backend = optuna.storages.journal.JournalFileBackend(
            str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    if url.startswith(SQLITE):
        Path(url[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    beats = {}
    if heartbeat_interval:
        beats = {"heartbeat_interval": int(heartbeat_interval), "grace_period": grace_period,
                 _stale_callback_keyword(): RetryCallback(max_retry=max_retry)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **beats)
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open the study storage {url}: {exc}; check hydra.sweeper.storage") from exc


def retry_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, interval: int | None,
                      grace_period: int | None, max_retry: int | None) -> None:
    """Mark the running trials of dead workers FAIL and enqueue them again (at most ``max_retry`` times).

    SQL storages: Optuna's ``fail_stale_trials`` with the retry callback given to the storage. Journal storages:
    the same rule on :data:`HEARTBEAT_ATTR` (a trial that has beaten and not for ``grace_period`` seconds, default
    twice the interval; the clocks of the machines sharing the journal must agree to within the grace period).
    """
    if not interval:
        return
    if not isinstance(storage, optuna.storages.JournalStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    grace = grace_period or 2 * interval
    retry = RetryCallback(max_retry=max_retry)
    for trial in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        last = trial.system_attrs.get(HEARTBEAT_ATTR)
        if last is None or time.time() - last <= grace:
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=State.FAIL):
                retry(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first


def _stale_callback_keyword() -> str:
    import inspect

    keywords = inspect.signature(optuna.storages.RDBStorage).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in keywords else "failed_trial_callback"


@contextmanager
def heartbeats(storage: optuna.storages.BaseStorage, trial_ids: list[int], interval: int | None):
    """Record the heartbeat of every trial in ``trial_ids`` every ``interval`` seconds while the block runs.

    SQL storages keep Optuna's own heartbeats. Optuna's JournalStorage has none, so there the beat is the time in a
    system attribute of the trial (:data:`HEARTBEAT_ATTR`), read back by :func:`retry_stale_trials`.
    """
    if not interval:
        yield
        return
    journal = isinstance(storage, optuna.storages.JournalStorage)
    stop = threading.Event()

    def beat():
        while True:
            for trial_id in trial_ids:
                if journal:
                    storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
                else:
                    storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------------ search space
def search_space(arguments: list[str]) -> tuple[dict[str, optuna.distributions.BaseDistribution], dict[str, str]]:
    """``({key: distribution}, {key: fixed value})`` from Hydra override strings (``key=<sweep or value>``); a later
    override of a key replaces an earlier one (the command line after the config's ``params``)."""
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line.split("=", 1)[1]  # as typed: null stays null, false stays false
    return space, fixed


def distribution(override: Override) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one Hydra sweep: ``choice(...)`` is categorical, ``range(a, b[, step])`` the
    integers (or a float grid) from a below b, ``interval(a, b)`` uniform on [a, b] (ints if both are ints), and
    ``tag(log, interval(a, b))`` log-uniform."""
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if isinstance(value, RangeSweep):
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            count = int(round((value.stop - value.start) / value.step))
            return optuna.distributions.FloatDistribution(value.start, value.start + (count - 1) * value.step,
                                                          step=value.step)
        return optuna.distributions.IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(f"{override.input_line}: the study sweeper takes interval, tag(log, interval), choice or range")


# ------------------------------------------------------------------------------------------------------ pruning
def make_pruner(name: str, options: Any = None) -> optuna.pruners.BasePruner:
    """``median`` (Optuna's MedianPruner), ``hyperband`` (successive halving over brackets, Li et al. 2018) or
    ``none``; ``options`` are the pruner's keyword arguments."""
    options = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options or {})
    classes = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "none": optuna.pruners.NopPruner}
    if name not in classes:
        raise UserError(f"hydra.sweeper.pruner={name} is not one of {', '.join(PRUNERS)}")
    try:
        return classes[name](**options)
    except TypeError as exc:
        raise UserError(f"hydra.sweeper.pruner_options={options} do not fit the {name} pruner: {exc}") from None


def epoch_values(trainer) -> dict[str, float]:
    """The metrics a trial can report after an epoch: the evaluation record, the best raw validation accuracy so
    far (``best/val_acc``) and the best EMA (``best_ema/*``), computed as the tasks compute them at the end."""
    from mergelab.tasks.ema import best_ema

    record = trainer.history[-1] if trainer.history else {}
    return {**record, metric_key("best", "val", "acc"): trainer.best_val, **best_ema(record)}


def trial_reporter(cfg: DictConfig) -> Callable | None:
    """In a job the study sweeper launched: a Trainer ``on_epoch_end`` callback that reports the objective to the
    job's trial after every epoch and raises ``optuna.TrialPruned`` when the study's pruner says stop. None outside
    such a job, and for several objectives (Optuna cannot prune those)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    if sweeper.get("trial_id") is None or not isinstance(cfg.get("objective"), str):
        return None
    objective = cfg.objective
    study = optuna.load_study(study_name=sweeper.study_name, storage=open_storage(sweeper.storage),
                              pruner=make_pruner(sweeper.pruner, sweeper.pruner_options))
    trial = optuna.trial.Trial(study, int(sweeper.trial_id))

    def report(trainer) -> None:
        values = epoch_values(trainer)
        if objective not in values:
            return  # an objective only known at the end of the run (e.g. of a merge): nothing to prune on
        trial.report(float(values[objective]), trainer.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {trial.number} pruned after epoch {trainer.epoch}: "
                                     f"{objective}={values[objective]:.4g}")

    return report


# ------------------------------------------------------------------------------------------------------ the loop
def directions_of(direction: Any) -> list[str]:
    directions = list(direction) if isinstance(direction, (list, tuple, ListConfig)) else [direction]
    for d in directions:
        if d not in ("maximize", "minimize"):
            raise UserError(f"hydra.sweeper.direction={direction} must be maximize, minimize or a list of them")
    return [str(d) for d in directions]


def sweep(sweeper, arguments: list[str]) -> optuna.Study:
    """Run ``n_trials`` trials of the study (see the module docstring); returns the study."""
    opts, config = sweeper.options, sweeper.config
    params = OmegaConf.to_container(opts["params"], resolve=True) if opts["params"] else {}
    space, fixed = search_space([f"{k}={v}" for k, v in params.items()] + list(arguments))
    if not space:
        raise UserError("nothing to search: declare hydra.sweeper.params (conf/hparams_search/*) "
                        "or pass a sweep such as 'optimizer.lr=tag(log,interval(1e-3,1))'")
    directions = directions_of(opts["direction"])
    objective = config.get("objective")
    if not objective:
        raise UserError("a study needs objective=<validation metric of the run> (e.g. raw/val_acc), "
                        "or a list of them with one hydra.sweeper.direction each")
    n_objectives = 1 if isinstance(objective, str) else len(objective)
    if n_objectives != len(directions):
        raise UserError(f"objective={objective} names {n_objectives} metric(s) but hydra.sweeper.direction has "
                        f"{len(directions)}; give one direction per objective")
    beats = opts["heartbeat_interval"], opts["grace_period"], opts["max_retry"]
    storage = open_storage(opts["storage"], heartbeat_interval=beats[0], grace_period=beats[1], max_retry=beats[2])
    study_name = opts["study_name"]
    previous = trials_so_far(storage, study_name)
    sampler = make_sampler(opts["sampler"], previous)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, directions=directions,
                                pruner=make_pruner(opts["pruner"], opts["pruner_options"]), load_if_exists=True)
    existing = [d.name.lower() for d in study.directions]
    if existing != directions:
        raise UserError(f"study {study_name!r} in {opts['storage']} optimises {existing}, not {directions}; "
                        "choose another hydra.sweeper.study_name")
    log.info(f"study {study_name!r} ({opts['storage']}): {previous} trials so far, sampler "
             f"{type(sampler).__name__}, pruner {opts['pruner']}, {len(directions)} objective(s)")
    job_idx, remaining = 0, int(opts["n_trials"])
    while remaining > 0:
        with warnings.catch_warnings():
            # fail_stale_trials is marked experimental; and Optuna warns that heartbeats are meant for
            # Study.optimize, whose loop this is (the heartbeats are recorded by `heartbeats` below).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            retry_stale_trials(study, storage, *beats)  # a dead worker's trials: FAIL, then enqueued again
            batch = [study.ask(space) for _ in range(min(remaining, int(opts["n_jobs"])))]
        # Trial ids have no public accessor; the heartbeats and the job (to report to its trial) need them.
        with heartbeats(storage, [trial._trial_id for trial in batch], beats[0]):
            overrides = []
            for trial in batch:
                for key, value in fixed.items():
                    trial.set_user_attr(key, value)
                values = {**trial.params, **fixed, "hydra.sweeper.trial_id": trial._trial_id}
                overrides.append([f"{k}={v}" for k, v in values.items()])
            returns = sweeper.launcher.launch(overrides, initial_job_idx=job_idx)
        job_idx += len(returns)
        for trial, ret in zip(batch, returns):
            state, values = outcome(ret, len(directions), trial.number)
            study.tell(trial, values=values, state=state)
        remaining -= len(batch)
    export_study(study, sweeper)
    return study


def outcome(ret, n_objectives: int, number: int) -> tuple[State, list[float] | None]:
    """A launched job's trial state and values: COMPLETE with its return, PRUNED, or FAIL if it raised."""
    if ret.status == JobStatus.FAILED:
        # What the job raised (Hydra's `return_value` would re-raise it and print an error for a pruned trial too).
        exc = ret._return_value
        if isinstance(exc, optuna.TrialPruned):
            log.info(str(exc))
            return State.PRUNED, None
        log.warning(f"trial {number} failed: {exc}")
        return State.FAIL, None
    value = ret.return_value
    values = [value] if n_objectives == 1 and not isinstance(value, (list, tuple)) else list(value or [])
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if len(values) != n_objectives:
        log.warning(f"trial {number} failed: the job returned {value!r}, not {n_objectives} number(s); set objective")
        return State.FAIL, None
    return State.COMPLETE, values


def make_sampler(sampler_cfg: Any, previous_trials: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; one that joins a study with trials is reseeded from ``(seed, trials so far)``."""
    seed = sampler_cfg.get("seed")
    if previous_trials and seed is not None:
        seed = joined_seed(int(seed), previous_trials)
        log.info(f"continuing a study of {previous_trials} trials with sampler seed {seed}")
        return instantiate(sampler_cfg, key="hydra.sweeper.sampler", seed=seed)
    return instantiate(sampler_cfg, key="hydra.sweeper.sampler")


def trials_so_far(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """The number of trials a study already holds in ``storage`` (0 when it does not exist yet)."""
    summaries = optuna.get_all_study_summaries(storage)
    return next((s.n_trials for s in summaries if s.study_name == study_name), 0)


def joined_seed(seed: int, previous_trials: int) -> int:
    """A sampler seed for a run that joins a study after ``previous_trials`` trials: a pure function of both."""
    return int(np.random.SeedSequence([seed, previous_trials]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------------ results
def export_study(study: optuna.Study, sweeper) -> Path | None:
    """The best trial (or the Pareto front) and the plots, in the study's folder (returned; None while the study has
    no finished trial)."""
    if not any(t.state == State.COMPLETE for t in study.trials):
        log.warning(f"study {study.study_name!r} has no finished trial yet: nothing to write")
        return None
    config = sweeper.config
    folder = study_folder(sweeper.options["storage"], study.study_name, config.hydra.sweep.dir)
    folder.mkdir(parents=True, exist_ok=True)
    load = sweeper.hydra_context.config_loader.load_sweep_config
    counts = {state.name: sum(t.state == state for t in study.trials) for state in State}
    if len(study.directions) == 1:
        best = study.best_trial
        overrides = trial_overrides(best)
        summary = {"study": study.study_name, "trial": best.number, "value": best.value,
                   "objective": config.get("objective"), "params": dict(best.params), "overrides": overrides,
                   "trials": counts}
        OmegaConf.save(OmegaConf.create(summary), folder / "best.yaml")
        write_json(folder / "best.json", summary)
        save_config(load(config, overrides), folder / "best_config.yaml")
        log.info(f"best trial {best.number} ({best.value}) written to {folder}")
    else:
        front = sorted(study.best_trials, key=lambda t: t.number)
        summary = {"study": study.study_name, "objective": list(config.objective), "trials": counts,
                   "pareto": [{"trial": t.number, "values": list(t.values), "params": dict(t.params),
                               "overrides": trial_overrides(t), "config": f"pareto_{t.number}_config.yaml"}
                              for t in front]}
        OmegaConf.save(OmegaConf.create(summary), folder / "pareto.yaml")
        write_json(folder / "pareto.json", summary)
        for trial in front:
            save_config(load(config, trial_overrides(trial)), folder / f"pareto_{trial.number}_config.yaml")
        log.info(f"{len(front)} Pareto-optimal trials written to {folder}")
    objective = config.get("objective")
    names = [objective] if isinstance(objective, str) else list(objective or [])
    save_study_plots(study, folder, seed=int(config.seed), names=names)
    return folder


def study_folder(storage: str, study_name: str, sweep_dir: str) -> Path:
    """Where a study's results go: next to its SQLite or journal file, else in the sweep folder; one sub-folder per
    study."""
    for prefix in (SQLITE, JOURNAL):
        if storage.startswith(prefix):
            return Path(storage[len(prefix):].removeprefix("//")).parent / study_name
    return Path(sweep_dir) / study_name


def trial_overrides(trial: optuna.trial.FrozenTrial) -> list[str]:
    """The command-line overrides a trial ran with: its sampled parameters and the sweep's fixed ones (stored by
    :func:`sweep` as user attributes of each trial)."""
    values = {**trial.user_attrs, **trial.params}
    return [f"{key}={value}" for key, value in values.items()]


def save_config(job_cfg: DictConfig, path: Path) -> None:
    """A job's full config, rerunnable with ``--config-path <folder> --config-name <file stem>``: the hydra section
    is cut down to the run folders and their naming."""
    hydra_cfg = {key: job_cfg.hydra[key] for key in HYDRA_KEYS}
    with open_dict(job_cfg):
        del job_cfg["hydra"]
        job_cfg.hydra = {"run": hydra_cfg["run"], "sweep": hydra_cfg["sweep"],
                         "job": {"chdir": hydra_cfg["job"].chdir, "config": hydra_cfg["job"].config}}
    OmegaConf.save(job_cfg, path)


def save_study_plots(study: optuna.Study, folder: Path, seed: int = 0, names: list[str] | None = None) -> list[Path]:
    """Optuna's matplotlib plots as PNG: optimisation history, parameter importances (fANOVA, seeded) and slices for
    one objective; the Pareto front for several (axes labelled with the objectives' ``names``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    if len(study.directions) == 1:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        plots = {"history": ovm.plot_optimization_history, "slices": ovm.plot_slice,
                 "importances": lambda s: ovm.plot_param_importances(s, evaluator=evaluator)}
    else:
        objective_names = names if names and len(names) == len(study.directions) else None
        plots = {"pareto_front": lambda s: ovm.plot_pareto_front(s, target_names=objective_names)}
    saved = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need two finished trials
                log.warning(f"no {name} plot for study {study.study_name!r}: {exc}")
                continue
        figure = np.ravel(axes)[0].figure
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        saved.append(path)
    return saved
