"""mergelab's Hydra sweeper plugin: Optuna on a persistent, shared study (the logic is in mergelab.tuning).

Hydra only instantiates plugins from the ``hydra_plugins`` namespace package, so the class lives here; Hydra imports
this module when it scans for plugins, so it imports nothing heavy until a sweep starts.
"""

from hydra_plugins.hydra_optuna_sweeper import optuna_sweeper


class StudySweeper(optuna_sweeper.OptunaSweeper):
    """``OptunaSweeper`` that prepares a persistent study first and writes its best trial and plots afterwards."""

    def sweep(self, arguments):
        from mergelab.tuning import export_study, prepare_study

        prepare_study(self.sweeper)
        super().sweep(arguments)
        export_study(self.sweeper)
