"""Greedy soup with a running sum against the naive greedy soup.

One run measures, on the same 16 checkpoints (MLPs fine-tuned on digits from one shared start, ~34 MB each,
written to a temporary folder):
- greedy soup (Wortsman et al. 2022, Algorithm 1) by ``mergelab.merging.soups.greedy_soup``: each checkpoint read
  once, the soup kept as a running sum, so a step costs one model's worth of additions;
- the naive greedy soup: at every step, reload every selected checkpoint and the candidate from disk and average
  them from scratch;
both scoring candidates by validation cross-entropy on digits (a real forward pass), both reading files with
``load_checkpoint`` (from the page cache: the files were just written), and both must select the same ingredients.
Reported: the median over ``--repeats`` fresh processes of the time ratio naive / running sum, in total and without
the (identical) scoring time, the number of file reads, and the peak memory of each.
The streamed merges' memory for 4 vs 16 ingredients is bench/stream_memory.py's.

Peak memory is the largest growth of the resident set size during the job over its size at the start, sampled
every millisecond from /proc/self/statm by a thread, in a fresh subprocess per measurement (``ru_maxrss`` would be
useless: importing torch alone sets a higher high-water mark than a soup of small models).

    python bench/soup.py [--ingredients 16] [--hidden 2048] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mergelab.checkpoints import load_checkpoint, save_checkpoint
from mergelab.data import build_data
from mergelab.merging import soups
from mergelab.models import MLPNet

DIGITS = {"name": "digits", "val_fraction": 0.1}


class PeakRSS:
    """The peak growth of this process's resident set while the ``with`` block runs, in MB."""

    PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.PAGE_MB

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.start


def make_population(folder: Path, n: int, hidden: int, steps: int) -> list[Path]:
    """A real fine-tuned population: one MLP trained for ``steps`` SGD steps on digits (the shared start), then
    ``n`` ingredients fine-tuned from it for ``steps`` more, each with its own seed (batch order) and a learning
    rate log-uniform in [0.01, 0.1], as the model-soups random search does. Which ingredients the greedy soup keeps
    is whatever these models give; the same for both greedy soups."""
    data = build_data(DIGITS, batch_size=64, eval_batch_size=512, seed=0, device=torch.device("cpu"))
    x, y = map(torch.cat, zip(*data.train))
    torch.manual_seed(0)
    model = MLPNet(num_classes=10, in_channels=1, image_size=8, hidden=[hidden] * 3)
    sgd_steps(model, x, y, steps, lr=0.05, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n):
        model.load_state_dict(base)
        lr = 0.01 * 10 ** torch.rand(1, generator=torch.Generator().manual_seed(i)).item()
        sgd_steps(model, x, y, steps, lr=lr, seed=i + 1)
        paths.append(save_checkpoint(folder / f"ingredient{i:02d}.safetensors", model.state_dict(), {"index": i}))
    return paths


def sgd_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    """``steps`` plain SGD steps (momentum 0.9) on random mini-batches of 64 drawn with ``seed``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(x), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()


class Scorer:
    """Negative validation cross-entropy of a state: the score both greedy soups select on; times itself."""

    def __init__(self, hidden: int):
        self.score = scorer(hidden)
        self.seconds = 0.0

    def __call__(self, state) -> float:
        start = time.perf_counter()
        value = self.score(state)
        self.seconds += time.perf_counter() - start
        return value


def scorer(hidden: int):
    """Negative validation cross-entropy of a state on digits."""
    data = build_data(DIGITS, batch_size=512, eval_batch_size=512, seed=0, device=torch.device("cpu"))
    x, y = map(torch.cat, zip(*data.val))
    model = MLPNet(num_classes=10, in_channels=1, image_size=8, hidden=[hidden] * 3).eval()

    @torch.no_grad()
    def score(state) -> float:
        model.load_state_dict(state)
        return -F.cross_entropy(model(x), y).item()

    return score


class Reader:
    """``load_checkpoint`` that counts the files it reads (the same reader for both greedy soups)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.reads = paths, 0

    def __call__(self, index: int) -> dict:
        self.reads += 1
        return load_checkpoint(self.paths[index])[0]


def naive_greedy(read: Reader, order: list[int], score) -> list[int]:
    """Algorithm 1 as often written: reload and re-average the whole selection at every step."""

    def average(indices):
        states = [read(i) for i in indices]
        return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}

    selected = [order[0]]
    best = score(average(selected))
    for i in order[1:]:
        value = score(average(selected + [i]))
        if value >= best:
            selected, best = selected + [i], value
    return selected


def running_greedy(read: Reader, order: list[int], score) -> list[int]:
    """mergelab's greedy soup: a running sum; one pass asks for each checkpoint once, so each is read once."""
    return soups.greedy_soup(read, order, score).selected


def _measure(job: str, paths: list[str], hidden: int, queue) -> None:
    """In a fresh process: run one job, report (seconds, scoring seconds, peak-memory growth in MB, result)."""
    paths = [Path(p) for p in paths]
    score = Scorer(hidden)
    score(MLPNet(num_classes=10, in_channels=1, image_size=8, hidden=[hidden] * 3).state_dict())  # warm up
    score.seconds = 0.0
    read = Reader(paths)
    start = time.perf_counter()
    with PeakRSS() as memory:
        result = (naive_greedy if job == "naive" else running_greedy)(read, list(range(len(paths))), score)
    queue.put((time.perf_counter() - start, score.seconds, memory.growth, result, read.reads))


def measure(job: str, paths: list[Path], hidden: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_measure, args=(job, [str(p) for p in paths], hidden, queue))
    process.start()
    out = queue.get()
    process.join()
    return out


def repeated(job: str, paths: list[Path], hidden: int, repeats: int) -> dict:
    """``repeats`` fresh-process runs of a greedy job: the median time and merge-only time (total minus scoring),
    the largest peak, and the selection (every run must select the same)."""
    runs = [measure(job, paths, hidden) for _ in range(repeats)]
    if any(r[3] != runs[0][3] for r in runs):
        raise SystemExit(f"{job} greedy soup selected differently between repeats")
    return {"total": statistics.median(r[0] for r in runs), "merge": statistics.median(r[0] - r[1] for r in runs),
            "scoring": statistics.median(r[1] for r in runs), "peak": max(r[2] for r in runs),
            "selected": runs[0][3], "reads": runs[0][4]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingredients", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="SGD steps of pretraining and of each fine-tuning")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs of each greedy soup (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_population(Path(tmp), args.ingredients, args.hidden, args.steps)
        size_mb = paths[0].stat().st_size / 2**20
        naive = repeated("naive", paths, args.hidden, args.repeats)
        fast = repeated("running", paths, args.hidden, args.repeats)
        if naive["selected"] != fast["selected"]:
            raise SystemExit(f"the two greedy soups disagree: {naive['selected']} vs {fast['selected']}")
    print(f"{args.ingredients} checkpoints of {size_mb:.1f} MB; greedy selects {len(fast['selected'])}: "
          f"{fast['selected']}; median of {args.repeats} runs each")
    for name, run in (("naive (reload + re-average each step)", naive), ("running sum (each file read once)    ", fast)):
        print(f"greedy, {name}: {run['total']:7.2f} s total, {run['merge']:7.2f} s without scoring "
              f"({run['scoring']:.2f} s scoring), {run['reads']:3d} file reads, peak +{run['peak']:7.1f} MB")
    print(f"speed-up naive / running sum: {naive['total'] / fast['total']:.1f}x in total, "
          f"{naive['merge'] / fast['merge']:.1f}x without scoring (target >= 3x)")


if __name__ == "__main__":
    main()
