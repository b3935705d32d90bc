"""Shared fixtures: composing the real configs and running tasks in-process on digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# The suite runs as two pytest-xdist workers on two cores: one thread each, in-process and in subprocesses, avoids
# oversubscription (the tiny models here are dominated by per-op overhead, not by arithmetic).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_cfg(config_name: str, overrides: list[str] = (), out_dir: Path | None = None):
    """Compose ``conf/<config_name>.yaml`` exactly as the entry script would, plus overrides."""
    extra = [f"out_dir={out_dir}", "progress=false"] if out_dir is not None else ["progress=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name, overrides=[*overrides, *extra])


def run_script(script: str, *args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run an entry script in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda name, overrides=(): make_cfg(name, list(overrides), tmp_path)


def run_interrupted_then_resumed(overrides: list[str], run_dir: Path) -> None:
    """Train ``overrides`` in ``run_dir``, killed (KeyboardInterrupt) right after epoch 1's checkpoint, then resumed
    in a process-like fresh RNG state: what an exact resume must turn into the uninterrupted run."""
    import mergelab.training as training
    from mergelab.runner import _run

    original = training.Trainer._save_epoch

    def crash_after_first_epoch(self, record):
        original(self, record)
        if self.epoch == 1:
            raise KeyboardInterrupt

    training.Trainer._save_epoch = crash_after_first_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(make_cfg("train", overrides, run_dir))
    finally:
        training.Trainer._save_epoch = original
    torch.manual_seed(12345)  # a resumed process starts with another RNG state; the checkpoint must restore it
    _run(make_cfg("train", [*overrides, "resume=true"], run_dir))
