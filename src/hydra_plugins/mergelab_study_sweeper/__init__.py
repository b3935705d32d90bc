"""mergelab's Hydra sweeper plugin: an Optuna (>= 4) study driven from ``python <script>.py --multirun``.

Hydra only instantiates plugins from the ``hydra_plugins`` namespace package, so the class lives here; Hydra imports
this module whenever it scans for plugins, so it imports nothing heavy: the study loop is
:func:`mergelab.tuning.sweep`. Configured by conf/hydra/sweeper/study.yaml (``hydra/sweeper=study``).
"""

from __future__ import annotations

from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper


class StudySweeper(Sweeper):
    """Asks an Optuna study for trials, launches each as a Hydra job through the configured launcher, and tells the
    study each job's outcome (COMPLETE, PRUNED or FAIL); see :mod:`mergelab.tuning`.

    Every keyword is a key of conf/hydra/sweeper/study.yaml. ``trial_id`` is not a user setting: the sweeper sets it
    in each job's config (``hydra.sweeper.trial_id=<id>``) so that the job can report to, and be pruned by, its trial.
    """

    def __init__(self, *, storage: str, study_name: str, direction: Any, n_trials: int, n_jobs: int, sampler: Any,
                 pruner: str, pruner_options: Any, heartbeat_interval: int | None, grace_period: int | None,
                 max_retry: int | None, params: Any = None, trial_id: int | None = None) -> None:
        self.options = dict(storage=storage, study_name=study_name, direction=direction, n_trials=n_trials,
                            n_jobs=n_jobs, sampler=sampler, pruner=pruner, pruner_options=pruner_options,
                            heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry,
                            params=params)
        self.config = self.hydra_context = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> None:
        import sys

        from mergelab.errors import UserError
        from mergelab.tuning import sweep

        try:
            sweep(self, arguments)
        except UserError as exc:  # bad sweeper settings: one line and exit 2, as the runner does for a job
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
