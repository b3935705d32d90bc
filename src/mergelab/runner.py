"""The one entry point every script calls: compose -> build -> run a task -> evaluate -> log.

An entry script is ``@hydra.main(...) def main(cfg): return run(cfg)``, called as ``entry(main)``. The root config
names its task
(``task: train``), implemented by ``mergelab.tasks.<task>.run(ctx)``, which returns a results dict; the runner
owns everything around it: device, seeding, the run folder, TensorBoard, ``results.json``, the printed table, the
objective returned to a sweeper, and turning bad input into a one-line error.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torch import nn

from mergelab import distributed
from mergelab.checkpoints import write_json
from mergelab.config import whole  # importing config also registers the mergelab.dirname resolver
from mergelab.errors import UserError
from mergelab.reporting import RunLogger, format_table
from mergelab.training import STATE_FILE


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use device=auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    return device


def hydra_output_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def is_multirun() -> bool:
    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


@dataclass
class Context:
    """What a task gets: the config, the device, its run folder and logger, and builders that read the config."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    logger: RunLogger | None = None
    on_epoch_end: Callable | None = None  # passed to Trainer.fit: reports to an Optuna trial (mergelab.tuning)
    _data: dict = field(default_factory=dict)

    def open_logger(self, purge_step: int | None = None) -> RunLogger | None:
        """TensorBoard events in the run folder (``purge_step`` drops an interrupted run's later events); None on
        ranks other than 0 of a torchrun job."""
        if self.logger is None and distributed.is_main():
            self.logger = RunLogger(self.run_dir, purge_step=purge_step)
        return self.logger

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def data(self, dataset_cfg: DictConfig | None = None):
        """The data set of ``cfg.dataset`` (or ``dataset_cfg``), built once per config."""
        from mergelab.data import build_data

        dataset_cfg = dataset_cfg if dataset_cfg is not None else self.cfg.dataset
        key = OmegaConf.to_yaml(dataset_cfg)
        if key not in self._data:
            train = self.cfg.train
            whole(train.batch_size, "train.batch_size", 1, "e.g. train.batch_size=64")
            whole(train.eval_batch_size, "train.eval_batch_size", 1, "e.g. train.eval_batch_size=1024")
            self._data[key] = build_data(dataset_cfg, batch_size=train.batch_size,
                                         eval_batch_size=train.eval_batch_size, seed=self.seed, device=self.device)
        return self._data[key]

    def build_model(self, data, model_cfg: DictConfig | None = None) -> nn.Module:
        """A freshly initialised model for ``data``'s shape, on the device (weights drawn from the global seed)."""
        from mergelab.models import build_model

        model_cfg = model_cfg if model_cfg is not None else self.cfg.model
        return build_model(model_cfg, data.num_classes, data.in_channels, data.image_size).to(self.device)

    def model_meta(self, data, model_cfg: DictConfig | None = None) -> dict[str, Any]:
        """What a checkpoint needs to rebuild its model and to know what it was trained on."""
        model_cfg = model_cfg if model_cfg is not None else self.cfg.model
        return {
            "model": OmegaConf.to_container(model_cfg, resolve=True),
            "num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": data.image_size,
            "dataset": {"name": data.name, "classes": list(data.classes),
                        **({"domain": data.domain} if getattr(data, "domain", None) else {})},
            "task": self.cfg.task, "seed": self.seed,
        }


def resume_dir(cfg: DictConfig) -> Path | None:
    """``resume=<run folder>`` continues that run in its own folder; ``resume=true`` resumes in place."""
    resume = cfg.get("resume")
    if resume in (None, False, True):
        return None
    folder = Path(str(resume))
    if not (folder / "checkpoints" / STATE_FILE).is_file():
        raise UserError(f"invalid resume folder {folder}: no checkpoints/{STATE_FILE} in it; "
                        "pass the run folder of an interrupted run (the one holding .hydra/ and checkpoints/)")
    return folder


def run(cfg: DictConfig) -> float | list[float] | None:
    """Run ``cfg.task``; return the metric named by ``cfg.objective`` (for sweepers; a list of metrics gives a list
    of values), or None.

    A :class:`UserError` ends a single run with ``error: <message>`` and exit status 2. In a multirun it is
    re-raised so that the launcher or sweeper records that job as failed and goes on with the others.
    """
    try:
        try:
            return _run(cfg)
        except MissingMandatoryValue as exc:
            raise UserError(f"{exc.full_key} is required (??? in the config); pass {exc.full_key}=...") from None
    except UserError as exc:
        if is_multirun():
            raise
        fail(exc, quiet=not distributed.is_main())  # every rank of a torchrun job meets it: one line, from rank 0
    except Exception as exc:
        if not distributed.lost(exc):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's next SIGTERM must not interrupt the line below
        cause = str(exc).strip().splitlines()[0][:200]
        print(f"error: rank {distributed.rank()} stopped: another rank of this job died ({cause}); the checkpoints "
              "written so far are intact: rerun the command with resume=<run folder> to continue", file=sys.stderr)
        sys.exit(1)


def fail(message: Any, quiet: bool = False) -> NoReturn:
    """The end of a run on bad input: ``error: <message>`` as one line on stderr (unless ``quiet``), exit status 2."""
    if not quiet:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def entry(hydra_main: Callable[[], Any]) -> None:
    """Call an entry script's ``@hydra.main`` function (its ``__main__`` block: ``entry(main)``).

    A command line Hydra cannot compose (an unknown config group option such as ``model=nope``, a key that does not
    exist, an override it cannot parse) and a failed multirun job's :class:`UserError` end like any bad input: one
    line, exit status 2. Hydra would print them over several lines and exit with 1; with ``HYDRA_FULL_ERROR=1`` it
    raises them instead, so they can be caught here. Anything else is a bug and keeps its full traceback.
    """
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = before or "1"  # launched jobs inherit it: their errors reach the sweep intact
    try:
        hydra_main()
    except UserError as exc:
        fail(exc)
    except OverrideParseException as exc:
        fail(f"cannot parse the command line: {exc}")
    except ConfigCompositionException as exc:
        fail(composition_error(exc))
    finally:
        if before is None:
            del os.environ["HYDRA_FULL_ERROR"]


def composition_error(exc: ConfigCompositionException) -> str:
    """Hydra's composition error on one line: its message, the first line of its cause, a group's options."""
    lines = [line.strip().rstrip(".") for line in str(exc).split("Config search path:")[0].splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Available options"):  # then one option per line
            return "; ".join(lines[:i]) + f"; choose one of: {', '.join(lines[i + 1:])}"
    cause = str(exc.__cause__ or "").strip().splitlines()
    return "; ".join(lines) + (f" ({cause[0]})" if cause else "")


def _run(cfg: DictConfig) -> float | list[float] | None:
    start = time.perf_counter()
    run_dir = resume_dir(cfg) or (Path(cfg.out_dir) if cfg.get("out_dir") else hydra_output_dir())
    if run_dir is None:
        raise UserError("no run folder: call through a Hydra entry script or set out_dir=<folder>")
    device = distributed.setup(resolve_device(cfg.device))  # under torchrun: this rank's device
    own_folder = hydra_output_dir()
    # Rank 0's run folder on every rank, whatever second each rank's Hydra named its own by.
    run_dir, main_folder = distributed.agree((run_dir, own_folder))
    if own_folder is not None and own_folder != main_folder:
        distributed.discard_folder(own_folder)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed} must be a whole number, e.g. seed=0")
    torch.manual_seed(cfg.seed)
    try:
        task = importlib.import_module(f"mergelab.tasks.{cfg.task}")
    except ModuleNotFoundError:
        raise UserError(f"unknown task {cfg.task!r}; see src/mergelab/tasks/ for the tasks") from None
    ctx = Context(cfg=cfg, run_dir=run_dir, device=device)
    if is_multirun():
        from mergelab.tuning import trial_reporter

        ctx.on_epoch_end = trial_reporter(cfg)
    results = task.run(ctx)
    if ctx.logger:
        ctx.logger.close()
    main = distributed.is_main()
    distributed.teardown()  # every rank is past its last collective; torch warns about a group left open
    if not main:
        return None  # results.json, the table and the objective are rank 0's
    results["time_s"] = time.perf_counter() - start
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    write_json(ctx.run_dir / "results.json", results)
    if results.get("table"):
        print(format_table(results["table"]))
    print(f"results: {ctx.run_dir / 'results.json'}")
    return objective_values(cfg.get("objective"), results.get("metrics", {}))


def objective_values(objective: str | list[str] | None, metrics: dict) -> float | list[float] | None:
    """The metric ``objective`` names (a float), or every metric of a list (a list), or None without objective."""
    if not objective:
        return None
    names = [objective] if isinstance(objective, str) else list(objective)
    for name in names:
        if name not in metrics:
            raise UserError(f"objective {name!r} is not a metric of this run; choose one of {sorted(metrics)}")
    values = [float(metrics[name]) for name in names]
    return values[0] if isinstance(objective, str) else values
