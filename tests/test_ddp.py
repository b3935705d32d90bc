"""torchrun: two CPU processes (gloo, one thread each) train as one process does with the same global batch and seed;
only rank 0 writes; a rank that dies ends the job non-zero with one line, its last checkpoint readable and resumable."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, make_cfg
from mergelab.checkpoints import load_checkpoint
from mergelab.runner import _run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# The MLP on digits: a global batch of 64 is two shards of 32; no BatchNorm, no dropout, so only float summation
# order separates two processes from one.
RUN = ["model=mlpnet", "train.batch_size=64", "train.log_every=5", "progress=false"]
TOLERANCE = 1e-5


def torchrun(script, *args, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    return subprocess.Popen([*TORCHRUN, str(ROOT / script), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def max_abs_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_two_processes_train_as_one(tmp_path):
    proc = torchrun("train.py", *RUN, "train.epochs=2", f"hydra.run.dir={tmp_path}/two")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    _run(make_cfg("train", [*RUN, "train.epochs=2"], tmp_path / "one"))
    two, one = tmp_path / "two", tmp_path / "one"
    for name in ("last", "ema0.999"):  # the weights, and the EMA rank 0 tracked
        assert max_abs_diff(two / "checkpoints" / f"{name}.safetensors",
                            one / "checkpoints" / f"{name}.safetensors") < TOLERANCE
    two_metrics, one_metrics = (json.loads((f / "results.json").read_text())["metrics"] for f in (two, one))
    assert two_metrics["raw/val_acc"] == pytest.approx(one_metrics["raw/val_acc"])
    # Rank 0 alone evaluated and wrote: one table, one results.json, one process's TensorBoard events.
    assert out.count("results: ") == 1
    assert len({p.name.split(".")[4] for p in two.glob("events.out.tfevents.*")}) == 1  # one writer pid


def rank_pid(torchrun_pid: int, local_rank: int) -> int | None:
    """The pid of the worker torchrun started for ``local_rank`` (its child with that LOCAL_RANK)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != torchrun_pid:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return int(stat.parent.name)
    return None


def test_a_dying_rank_ends_the_job_with_one_line_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    epochs = "train.epochs=12"
    proc = torchrun("train.py", *RUN, epochs, f"hydra.run.dir={run_dir}", start_new_session=True)
    state = run_dir / "checkpoints" / "state.safetensors"
    try:
        deadline = time.monotonic() + 240
        while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None, "training ended before a rank could be killed"
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if "error: " in line]
    assert len(ours) == 1 and "another rank of this job died" in ours[0] and "resume=" in ours[0], err[-3000:]
    assert "Traceback" not in "\n".join(l for l in err.splitlines() if l.startswith("[rank0]"))
    assert not (run_dir / "results.json").exists()
    # The last checkpoint is whole (written atomically) and the run resumes from it under torchrun...
    tensors, meta = load_checkpoint(state)
    stopped = meta["epoch"]
    assert 1 <= stopped < 12 and tensors
    resumed = torchrun("train.py", *RUN, epochs, f"resume={run_dir}", f"hydra.run.dir={tmp_path}/resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed {run_dir} at epoch" in out
    # ...to the weights one uninterrupted process trains.
    _run(make_cfg("train", [*RUN, epochs], tmp_path / "one"))
    assert max_abs_diff(run_dir / "checkpoints" / "last.safetensors",
                        tmp_path / "one" / "checkpoints" / "last.safetensors") < TOLERANCE
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
