"""Time and peak memory of ZipIt!'s two phases for ResNet-20 at several widths, and how they grow with width.

- features: one streaming pass of two models over the batches, accumulating every group's moments
  (:func:`mergelab.merging.features.feature_stats`);
- matching: ZipIt!'s greedy matching of every group (:func:`mergelab.merging.zipit.zip_groups`).

Each (width, phase) runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) minus the resident
memory just before the phase is that phase's own peak; the matching process loads the statistics the features
process saved, so it starts without the features' peak. Growth is reported as the ratio to the first width,
measured in the same run. Models are freshly initialised (timing does not depend on training).

    python bench/zipit.py [--widths 1 4 8] [--batch-size 256] [--batches 2] [--image-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergelab.merging.features import FeatureStats, feature_stats
from mergelab.merging.zipit import zip_groups
from mergelab.models import build_model, unit_graph


def resident_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def models(width: float, image_size: int):
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(build_model({"_target_": "mergelab.models.resnet20", "width": width}, 10, 3, image_size).eval())
    return pair


def phase_features(args, stats_file: str) -> dict:
    pair = models(args.width, args.image_size)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator), None)
               for _ in range(args.batches)]
    graph = unit_graph(pair[0])
    before = resident_mib()
    start = time.perf_counter()
    stats = feature_stats(pair, graph, batches)
    seconds = time.perf_counter() - start
    peak = peak_mib() - before
    tensors = {f"{g}/{k}": getattr(s, k) for g, s in stats.items() for k in ("sum", "outer")}
    save_file(tensors, stats_file, metadata={"counts": json.dumps({g: [s.count, s.units] for g, s in stats.items()})})
    largest = max(s.units for s in stats.values())
    return {"seconds": seconds, "peak_mib": peak, "largest_group": largest}


def phase_matching(args, stats_file: str) -> dict:
    tensors = load_file(stats_file)
    with safe_open(stats_file, "pt") as f:
        counts = json.loads(f.metadata()["counts"])
    stats = {g: FeatureStats(2, units, count, tensors[f"{g}/sum"], tensors[f"{g}/outer"])
             for g, (count, units) in counts.items()}
    before = resident_mib()
    start = time.perf_counter()
    zip_groups(stats, alpha=0.5, beta=0.5)
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_mib() - before}


def measure(args, width: float, stats_file: str) -> dict:
    row = {"width": width}
    for phase in ("features", "matching"):
        out = subprocess.run([sys.executable, __file__, "--phase", phase, "--width", str(width),
                              "--stats-file", stats_file, "--batch-size", str(args.batch_size),
                              "--batches", str(args.batches), "--image-size", str(args.image_size)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        row.update({f"{phase}_{k}": v for k, v in result.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--phase", choices=["features", "matching"], help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run = phase_features if args.phase == "features" else phase_matching
        print(json.dumps(run(args, args.stats_file)))
        return
    print(f"resnet20, 2 models, {args.batches} batches of {args.batch_size} random 3x{args.image_size}x"
          f"{args.image_size} images, torch threads={torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(args, w, str(Path(folder) / f"stats{w}.safetensors")) for w in args.widths]
    base = rows[0]
    header = (f"{'width':>5} {'largest group':>13} {'features s':>10} {'x':>6} {'features MiB':>12} {'x':>6} "
              f"{'matching s':>10} {'x':>6} {'matching MiB':>12} {'x':>6}")
    print(header)
    for r in rows:
        ratio = lambda key: r[key] / base[key] if base[key] > 0 else float("nan")  # noqa: E731
        print(f"{r['width']:>5g} {r['features_largest_group']:>13} {r['features_seconds']:>10.2f} "
              f"{ratio('features_seconds'):>6.1f} {r['features_peak_mib']:>12.1f} {ratio('features_peak_mib'):>6.1f} "
              f"{r['matching_seconds']:>10.2f} {ratio('matching_seconds'):>6.1f} {r['matching_peak_mib']:>12.1f} "
              f"{ratio('matching_peak_mib'):>6.1f}")


if __name__ == "__main__":
    main()
