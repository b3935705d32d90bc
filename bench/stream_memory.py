"""Peak memory and time of streamed merges for 4 vs 16 ingredients of a model of >= 300 MB.

The bench writes its own population: an MLPNet (digits-shaped, ``--layers`` hidden layers of ``--hidden`` units,
about 336 MB in float32 by default) as a pretrained checkpoint and ``--ingredients`` fine-tuned copies (pretrained
plus seeded noise), every file a mergelab safetensors checkpoint. Then, for 4 and for all ingredients, it runs the
uniform soup, task arithmetic and TIES exactly as soup.py does (``open_population`` + ``merge_state``, reading one
tensor at a time from the memory-mapped files), each in a fresh process (``spawn``), ``--repeats`` times.

Reported per case: the child's peak resident set (sampled every millisecond from /proc/self/statm; it includes
importing torch, about 0.5 GB here), its growth during the merge alone, and the median time; then the ratio 16 / 4
of the peak resident set (target <= 1.1) and of the merge's growth. The population is written by another child so
that the measuring processes start from a small parent (``ru_maxrss`` of a forked child starts at its parent's
resident set, which is why it is not used).

    python bench/stream_memory.py [--ingredients 16] [--hidden 2048] [--layers 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mergelab.checkpoints import save_checkpoint
from mergelab.merging import soups
from mergelab.merging import task_vectors as tv
from mergelab.models import MLPNet
from mergelab.population import open_population

_spec = importlib.util.spec_from_file_location("bench_soup", Path(__file__).with_name("soup.py"))
_bench_soup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_soup)
PeakRSS = _bench_soup.PeakRSS  # the /proc/self/statm sampler of bench/soup.py

METHODS = {"uniform": {}, "task_arithmetic": {"lam": 0.3}, "ties": {"k": 0.2, "lam": 1.0}}


def write_population(folder: Path, n: int, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    """A pretrained MLPNet and ``n`` perturbed copies, as mergelab checkpoints (metadata = its architecture)."""
    torch.manual_seed(0)
    model_cfg = {"_target_": "mergelab.models.MLPNet", "hidden": [hidden] * layers}
    model = MLPNet(num_classes=10, in_channels=1, image_size=8, hidden=[hidden] * layers)
    meta = {"model": model_cfg, "num_classes": 10, "in_channels": 1, "image_size": 8,
            "dataset": {"name": "digits", "classes": list(range(10))}}
    base = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    pretrained = save_checkpoint(folder / "pretrained.safetensors", base, meta)
    paths = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i + 1)
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        paths.append(save_checkpoint(folder / "ingredients" / f"{i:02d}.safetensors", tuned, meta))
        del tuned
    return pretrained, paths


def _child(method: str, paths: list[str], pretrained: str, queue) -> None:
    """In a fresh process: open the population as soup.py does, merge by streaming, report time and memory."""
    members = open_population(paths, None, what="bench")
    base = open_population(pretrained, None)[0]
    keys = members[0].keys()

    def read(i: int, key: str) -> torch.Tensor:
        return members[i].tensor(key)

    start = time.perf_counter()
    with PeakRSS() as memory:
        if method == "uniform":
            merged = soups.streamed_uniform_soup(keys, read, len(members))
        else:
            merged = tv.merge_state(keys, read, len(members),
                                    tv.key_merger(method, METHODS[method], base=base.tensor))
    seconds = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for t in merged.values()) / 2**20
    queue.put({"seconds": seconds, "growth_mb": memory.growth, "peak_mb": memory.peak, "model_mb": size})


def _write(folder: str, n: int, hidden: int, layers: int, queue) -> None:
    pretrained, paths = write_population(Path(folder), n, hidden, layers)
    queue.put((str(pretrained), [str(p) for p in paths]))


def in_child(target, *args):
    """``target(*args, queue)`` in a fresh process; returns what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    out = queue.get()
    process.join()
    return out


def measure(method: str, paths: list[Path], pretrained: Path) -> dict:
    return in_child(_child, method, [str(p) for p in paths], str(pretrained))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingredients", type=int, default=16)
    parser.add_argument("--few", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pretrained, paths = in_child(_write, tmp, args.ingredients, args.hidden, args.layers)
        pretrained, paths = Path(pretrained), [Path(p) for p in paths]
        size_mb = pretrained.stat().st_size / 2**20
        print(f"model: {size_mb:.0f} MB per checkpoint ({args.layers} x {args.hidden} MLPNet, float32); "
              f"median time / largest peak of {args.repeats} fresh processes per case; machine shared (2 cores)")
        print(f"{'method':16s} {'N':>3s} {'peak RSS MB':>12s} {'merge growth MB':>16s} {'time s':>8s}")
        for method in METHODS:
            rows = {}
            for n in (args.few, args.ingredients):
                runs = [measure(method, paths[:n], pretrained) for _ in range(args.repeats)]
                rows[n] = {"maxrss": max(r["peak_mb"] for r in runs), "growth": max(r["growth_mb"] for r in runs),
                           "seconds": statistics.median(r["seconds"] for r in runs)}
                print(f"{method:16s} {n:3d} {rows[n]['maxrss']:12.0f} {rows[n]['growth']:16.0f} "
                      f"{rows[n]['seconds']:8.2f}")
            few, many = rows[args.few], rows[args.ingredients]
            print(f"{method:16s} ratio {args.ingredients}/{args.few}: peak RSS {many['maxrss'] / few['maxrss']:.3f} "
                  f"(target <= 1.1), merge growth {many['growth'] / few['growth']:.3f}, "
                  f"time {many['seconds'] / few['seconds']:.2f}")


if __name__ == "__main__":
    main()
