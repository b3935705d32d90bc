"""Study wall time with and without pruning: the same small sweep through tune.py, pruner=none against median.

Each repeat runs both sweeps (alternating which goes first, so drift in machine speed hits both alike) on fresh
SQLite studies with the same sampler seed: ``--trials`` trials of MLPNet on digits for ``--epochs`` epochs, the search
space of conf/hparams_search/train.yaml with ``averaged.decay`` fixed. Reported: median wall time of each, their
ratio, trials pruned, epochs trained over all trials (the work, which load does not blur) and the best objective
(``best_ema/val_acc``) each study found (the studies are deterministic: these are the same in every repeat).

    python bench/tune_pruning.py [--trials 12] [--epochs 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
PRUNERS = {"none": [], "median": ["hydra.sweeper.pruner=median",
                                  "hydra.sweeper.pruner_options={n_startup_trials:3,n_warmup_steps:1}"]}


def sweep(folder: Path, pruner: str, trials: int, epochs: int) -> tuple[float, dict]:
    storage = f"sqlite:///{folder}/{pruner}.db"
    command = [sys.executable, str(ROOT / "tune.py"), "--multirun", f"hydra.sweeper.storage={storage}",
               f"hydra.sweep.dir={folder}/{pruner}", f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.sampler.seed=0",
               "model=mlpnet", f"train.epochs={epochs}", "averaged.decay=0.9", "progress=false", *PRUNERS[pruner]]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="train", storage=storage)
    return seconds, {"pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
                     "trials": len(study.trials), "best": study.best_value,
                     "epochs": sum(len(t.intermediate_values) for t in study.trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {name: [] for name in PRUNERS}
    studies = {}
    for repeat in range(args.repeats):
        order = list(PRUNERS) if repeat % 2 == 0 else list(PRUNERS)[::-1]
        for name in order:
            with tempfile.TemporaryDirectory() as folder:
                seconds, study = sweep(Path(folder), name, args.trials, args.epochs)
            times[name].append(seconds)
            studies[name] = study
            print(f"repeat {repeat} pruner={name}: {seconds:.1f} s", flush=True)
    print(f"\n{args.trials} trials x {args.epochs} epochs, MLPNet on digits, median of {args.repeats} repeats\n")
    print("| pruner | wall time (s) | ratio to none | trials pruned | epochs trained | best best_ema/val_acc |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(times["none"])
    for name, study in studies.items():
        wall = statistics.median(times[name])
        print(f"| {name} | {wall:.1f} | {wall / base:.2f} | {study['pruned']}/{study['trials']} | {study['epochs']} | "
              f"{study['best']:.2f} |")


if __name__ == "__main__":
    main()
