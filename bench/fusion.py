"""Time and peak memory of alignment on resnet20 at several widths: permute (weights, activations) and OT (weights,
activations), each as a ratio to the vanilla average measured in the same run.

    python bench/fusion.py [--widths 1 2 4] [--samples 200] [--repeats 1]

Peak memory is the peak resident set size added while aligning (Linux: the process's high-water mark is reset
through ``/proc/self/clear_refs`` before each measurement and read from ``VmHWM`` after it; glibc is told to serve
every allocation above 64 KiB by mmap, so freed tensors go back to the system and cannot hide a later peak), which
counts tensors, NumPy/POT/SciPy buffers and Python objects alike; on CUDA ``torch.cuda.max_memory_allocated``.
The activation ground metric works from second moments accumulated per batch, so its memory is O((2n)^2) per group
and never O(samples x n x n); the table's memory column shows it.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import time
from pathlib import Path

import torch

from mergelab.merging import engine
from mergelab.merging.align import Permute
from mergelab.merging.average import Average
from mergelab.merging.otfusion import OTFusion
from mergelab.models import build_model, unit_graph


M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
STATUS = Path("/proc/self/status")


def memory_kib() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process in KiB."""
    return {k: int(v) for k, v in re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", STATUS.read_text())}


def reset_peak_rss() -> int:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0) and return that RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_kib()["VmRSS"]


def measure(method, graph, models, images, device) -> tuple[float, float]:
    """Seconds and peak MiB added by aligning model 1 to model 0 and averaging (features included)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss() * 1024
    start = time.perf_counter()
    transforms = engine.match(method, models, graph, [(x, None) for x in images.split(100)])
    engine.merge_states(graph, [m.state_dict() for m in models], transforms)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else memory_kib()["VmHWM"] * 1024
    return seconds, (peak - base) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=200, help="images for the activation methods")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)  # a fixed threshold: large frees are unmapped
    print(f"torch threads: {torch.get_num_threads()}")
    images = torch.randn(args.samples, 3, 32, 32, device=device)
    methods = {"average": Average(), "permute-weights": Permute("weights"),
               "permute-activations": Permute("activations", num_samples=args.samples),
               "ot-weights": OTFusion("weights"), "ot-activations": OTFusion("activations", num_samples=args.samples)}
    print(f"device: {device}; resnet20 on 3x32x32 inputs, {args.samples} images for activations")
    print(f"{'width':>5}  {'method':<20} {'time_s':>8} {'x average':>9} {'peak_MiB':>9}")
    for width in args.widths:
        torch.manual_seed(0)
        models = [build_model({"_target_": "mergelab.models.resnet20", "width": width}, 10, 3, 32).to(device).eval()
                  for _ in range(2)]
        graph = unit_graph(models[0])
        results = {}
        for name, method in methods.items():
            runs = [measure(method, graph, models, images, device) for _ in range(args.repeats)]
            results[name] = (min(t for t, _ in runs), max(m for _, m in runs))
        base_t = results["average"][0]
        for name, (seconds, peak) in results.items():
            print(f"{width:>5g}  {name:<20} {seconds:>8.3f} {seconds / base_t:>9.1f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
