"""DDP equivalence: ``torchrun --nproc_per_node=N train.py`` against one process, same global batch and seed.

Trains MLPNet on digits once in one process and once with N CPU processes (gloo, one thread each), then reports the
largest absolute difference between their final weights (``last``) and EMA weights, their validation accuracies,
and both wall times (with the start-up of N Python processes included; on a machine with fewer cores than ranks the
N-process run is slower, which says nothing about throughput on real hardware).

    python bench/ddp_equivalence.py [--nproc 2] [--epochs 10] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def train(command: list[str], folder: Path) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([*command, f"hydra.run.dir={folder}"], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def max_abs_diff(a: Path, b: Path) -> float:
    x, y = load_file(a), load_file(b)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    run = [str(ROOT / "train.py"), "model=mlpnet", f"train.epochs={args.epochs}",
           f"train.batch_size={args.batch_size}", "progress=false"]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        t_one = train([sys.executable, *run], one)
        t_many = train([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={args.nproc}", *run], many)
        diffs = {name: max_abs_diff(one / "checkpoints" / f"{name}.safetensors",
                                    many / "checkpoints" / f"{name}.safetensors") for name in ("last", "ema0.999")}
        acc = [json.loads((f / "results.json").read_text())["metrics"]["raw/val_acc"] for f in (one, many)]
    print(f"MLPNet on digits, {args.epochs} epochs, global batch {args.batch_size}: 1 process vs {args.nproc} (gloo)\n")
    print("| max abs diff, weights | max abs diff, EMA 0.999 | val acc, 1 process | val acc, "
          f"{args.nproc} processes | wall 1 process (s) | wall {args.nproc} processes (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| {diffs['last']:.2e} | {diffs['ema0.999']:.2e} | {acc[0]:.2f} | {acc[1]:.2f} | {t_one:.1f} "
          f"| {t_many:.1f} |")


if __name__ == "__main__":
    main()
