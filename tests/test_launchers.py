"""Launchers: joblib runs a multirun's jobs in parallel processes, submitit_local stands in for SLURM (a job of two
tasks trains as one DDP run); the results equal a plain in-process run, and multirun folders are named by their
overrides."""

import json

import pytest
from safetensors.torch import load_file
from hydra import compose, initialize_config_dir

from conftest import CONF, make_cfg
from hydra_inprocess import hydra_main
from mergelab.runner import _run

JOB = ["experiment=ema_table2", "+debug=default", "model=mlpnet"]


def job_folders(sweep_dir):
    return sorted(p.parent for p in sweep_dir.glob("*/results.json"))


# joblib: two jobs in two worker processes at once. submitit_local: one job of two tasks, which train it together
# with DistributedDataParallel as two tasks of a SLURM job would (mergelab.distributed reads submitit's environment);
# each starts a fresh interpreter that imports torch, which costs more than the job itself here.
@pytest.mark.parametrize("launcher,lrs", [("joblib", "0.1,0.05"), ("submitit_local", "0.05")])
def test_multirun_through_launcher(tmp_path, launcher, lrs):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5",
                                                                      "hydra.launcher.tasks_per_node=2"]
    hydra_main("ema", "--multirun", f"hydra/launcher={launcher}", *extra, *JOB, f"optimizer.lr={lrs}",
               f"hydra.sweep.dir={tmp_path}/sweep")
    folders = job_folders(tmp_path / "sweep")
    assert [f.name for f in folders] == [f"{i}_+debug-default+model-mlpnet+optimizer.lr-{lr}"
                                         for i, lr in enumerate(lrs.split(","))]
    # A job launched elsewhere computes what the same run computes in this process: exactly in one process,
    # within float summation order across two.
    _run(make_cfg("ema", [*JOB, "optimizer.lr=0.05"], tmp_path / "inprocess"))
    launched = json.loads((folders[-1] / "results.json").read_text())
    local = json.loads((tmp_path / "inprocess" / "results.json").read_text())
    assert launched["config"]["optimizer"]["lr"] == 0.05
    if launcher == "joblib":
        assert launched["metrics"] == local["metrics"]
    else:
        weights = [load_file(folder / "checkpoints" / "last.safetensors")
                   for folder in (folders[-1], tmp_path / "inprocess")]
        assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[1]) < 1e-5
        logs = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_1_log.out"))
        assert logs and "results: " not in logs[0].read_text()  # rank 1 wrote no results


def test_slurm_preset_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("ema", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 16)
    assert launcher.timeout_min > 0
