"""Optuna studies through Hydra's Optuna sweeper, persistent and shared, with their results written out.

``hydra_plugins.mergelab_study_sweeper.StudySweeper`` (``hydra/sweeper=study``, conf/hydra/sweeper/study.yaml) is
hydra-optuna-sweeper's ``OptunaSweeper`` plus what a long-lived study on shared storage needs, implemented here:

- the folder of a ``sqlite:///`` storage is created before Optuna opens it;
- a study is continued, never restarted (the plugin loads it with ``load_if_exists``); a run that joins a study which
  already has trials draws its sampler seed from ``(sampler seed, number of trials so far)``, so a killed and
  restarted ``tune.py`` does not re-propose the first run's initial points while staying reproducible;
- after the sweep, the best trial is written out (``best.yaml``: value and overrides; ``best_config.yaml``: the
  full composed config, rerun with ``python train.py --config-path <folder> --config-name best_config``), and
  Optuna's plots (optimisation history, parameter importances, slices) are saved as PNG with matplotlib.

Failed trials: the runner re-raises a :class:`~mergelab.errors.UserError` (a diverged run included) in a multirun;
Hydra's launcher stores the exception in the job's return, and the plugin records that trial as ``FAIL`` and goes on
as long as the failure rate of a batch stays within ``max_failure_rate`` (1.0 in our preset: never stop).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from mergelab.checkpoints import write_json

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"
# The sections of a job's hydra config worth keeping in a rerunnable config (run folders and their naming).
HYDRA_KEYS = ("run", "sweep", "job")


def prepare_study(impl) -> None:
    """Before the plugin opens the study: create a SQLite folder, and reseed the sampler of a run that joins a
    study which already has trials (``impl`` is the plugin's ``OptunaSweeperImpl``, set up by Hydra)."""
    sqlite_folder(impl.storage)
    previous = trials_so_far(impl.storage, impl.study_name)
    sampler_cfg = impl.config.hydra.sweeper.sampler
    if previous and sampler_cfg.get("seed") is not None and not sampler_cfg.get("_partial_", False):
        seed = joined_seed(int(sampler_cfg.seed), previous)
        log.info(f"study {impl.study_name!r} has {previous} trials: continuing it with sampler seed {seed}")
        impl.sampler = instantiate(sampler_cfg, seed=seed)


def export_study(impl) -> Path | None:
    """After the sweep: the best trial (``best.yaml``, ``best_config.yaml``) and the study's plots, in the study's
    folder (returned; None while the study has no finished trial)."""
    study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        log.warning(f"study {impl.study_name!r} has no finished trial yet: nothing to write")
        return None
    folder = study_folder(impl.storage, impl.study_name, impl.config.hydra.sweep.dir)
    best = study.best_trial
    overrides = trial_overrides(best)
    job_cfg = impl.hydra_context.config_loader.load_sweep_config(impl.config, overrides)
    write_best(study, best, overrides, job_cfg, folder)
    save_study_plots(study, folder, seed=int(impl.config.seed))
    log.info(f"best trial {best.number} ({best.value}) written to {folder}")
    return folder


def sqlite_folder(storage: Any) -> None:
    """Create the folder of a ``sqlite:///<path>`` storage (SQLite creates the file, not its folder)."""
    if isinstance(storage, str) and storage.startswith(SQLITE):
        Path(storage[len(SQLITE):]).parent.mkdir(parents=True, exist_ok=True)


def trials_so_far(storage: Any, study_name: str | None) -> int:
    """The number of trials a study already holds in ``storage`` (0 when it does not exist yet)."""
    if storage is None or study_name is None:
        return 0
    summaries = optuna.get_all_study_summaries(storage)
    return next((s.n_trials for s in summaries if s.study_name == study_name), 0)


def joined_seed(seed: int, previous_trials: int) -> int:
    """A sampler seed for a run that joins a study after ``previous_trials`` trials: a pure function of both."""
    return int(np.random.SeedSequence([seed, previous_trials]).generate_state(1)[0])


def study_folder(storage: Any, study_name: str, sweep_dir: str) -> Path:
    """Where a study's results go: next to its SQLite file, else in the sweep folder; one sub-folder per study."""
    if isinstance(storage, str) and storage.startswith(SQLITE):
        return Path(storage[len(SQLITE):]).parent / study_name
    return Path(sweep_dir) / study_name


def trial_overrides(trial: optuna.trial.FrozenTrial) -> list[str]:
    """The command-line overrides a trial ran with: its sampled parameters and the sweep's fixed ones.

    The plugin stores the fixed overrides of the sweep command as user attributes of each trial.
    """
    values = {**trial.user_attrs, **trial.params}
    return [f"{key}={value}" for key, value in values.items()]


def write_best(study: optuna.Study, best: optuna.trial.FrozenTrial, overrides: list[str], job_cfg, folder: Path) -> None:
    """``best.yaml`` (the trial, its value and overrides) and ``best_config.yaml`` (the full config it ran)."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "study": study.study_name, "trial": best.number, "value": best.value,
        "objective": job_cfg.get("objective"), "params": dict(best.params), "overrides": overrides,
        "trials": {state.name: sum(t.state == state for t in study.trials) for state in optuna.trial.TrialState},
    }
    OmegaConf.save(OmegaConf.create(summary), folder / "best.yaml")
    write_json(folder / "best.json", summary)
    hydra_cfg = {key: job_cfg.hydra[key] for key in HYDRA_KEYS}
    with open_dict(job_cfg):
        del job_cfg["hydra"]
        job_cfg.hydra = {"run": hydra_cfg["run"], "sweep": hydra_cfg["sweep"],
                         "job": {"chdir": hydra_cfg["job"].chdir, "config": hydra_cfg["job"].config}}
    OmegaConf.save(job_cfg, folder / "best_config.yaml")


def save_study_plots(study: optuna.Study, folder: Path, seed: int = 0) -> list[Path]:
    """Optuna's optimisation history and slice plots, and the parameter importances, as PNG.

    Importances are the mean decrease in impurity of a seeded random forest, drawn here as bars: in optuna 2.10 the
    default fANOVA evaluator and the matplotlib importance plot both fail with current scikit-learn and matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"history": ovm.plot_optimization_history, "slices": ovm.plot_slice,
             "importances": lambda s: plot_importances(s, seed)}
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


def plot_importances(study: optuna.Study, seed: int):
    """Horizontal bars of each parameter's importance for the objective (fractions summing to 1)."""
    import matplotlib.pyplot as plt

    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=seed)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    figure, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance for the objective")
    ax.set_title(f"parameter importances: {study.study_name}")
    return ax
