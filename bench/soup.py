"""Greedy soup with a running sum against the naive greedy soup, and the streaming uniform soup's peak memory.

One run measures, on the same 16 checkpoints (an MLP on digits, ~34 MB each, written to a temporary folder):
- greedy soup (Wortsman et al. 2022, Algorithm 1) by ``mergelab.merging.soups.greedy_soup``: each checkpoint read
  once, the soup kept as a running sum, so a step costs one model's worth of additions;
- the naive greedy soup: at every step, reload every selected checkpoint and the candidate from disk and average
  them from scratch;
both scoring candidates by validation cross-entropy on digits (a real forward pass), and both must select the same
ingredients. Reported: the time ratio naive / running sum, in total and without the (identical) scoring time,
and the peak memory of each.
- the uniform soup streamed over 4 and over 16 checkpoints: peak memory of each and their ratio.

Peak memory is the largest growth of the resident set size during the job over its size at the start, sampled
every millisecond from /proc/self/statm by a thread, in a fresh subprocess per measurement (``ru_maxrss`` would be
useless: importing torch alone sets a higher high-water mark than a soup of small models).

    python bench/soup.py [--ingredients 16] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
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


def make_population(folder: Path, n: int, hidden: int) -> list[Path]:
    """``n`` checkpoints around one random MLP, like fine-tuned models around their shared start: averaging them
    cancels their independent noise, so the greedy soup keeps most of them (the regime where re-averaging the
    selection at every step costs quadratically)."""
    torch.manual_seed(0)
    base = MLPNet(num_classes=10, in_channels=1, image_size=8, hidden=[hidden] * 3).state_dict()
    paths = []
    for i in range(n):
        state = {k: v + 0.02 * torch.randn_like(v) for k, v in base.items()}
        paths.append(save_checkpoint(folder / f"ingredient{i:02d}.safetensors", state, {"index": i}))
    return paths


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


def naive_greedy(paths: list[Path], order: list[int], score) -> list[int]:
    """Algorithm 1 as often written: reload and re-average the whole selection at every step."""

    def average(indices):
        states = [load_checkpoint(paths[i])[0] for i in indices]
        return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}

    selected = [order[0]]
    best = score(average(selected))
    for i in order[1:]:
        value = score(average(selected + [i]))
        if value >= best:
            selected, best = selected + [i], value
    return selected


def running_greedy(paths: list[Path], order: list[int], score) -> list[int]:
    """mergelab's greedy soup: a running sum; one pass asks for each checkpoint once, so each is read once."""
    return soups.greedy_soup(lambda i: load_checkpoint(paths[i])[0], order, score).selected


def _measure(job: str, paths: list[str], hidden: int, queue) -> None:
    """In a fresh process: run one job, report (seconds, scoring seconds, peak-memory growth in MB, result)."""
    paths = [Path(p) for p in paths]
    if job == "uniform":
        start = time.perf_counter()
        with PeakRSS() as memory:
            soups.uniform_soup(load_checkpoint(p)[0] for p in paths)
        queue.put((time.perf_counter() - start, 0.0, memory.growth, []))
        return
    score = Scorer(hidden)
    score(MLPNet(num_classes=10, in_channels=1, image_size=8, hidden=[hidden] * 3).state_dict())  # warm up
    score.seconds = 0.0
    start = time.perf_counter()
    with PeakRSS() as memory:
        result = (naive_greedy if job == "naive" else running_greedy)(paths, list(range(len(paths))), score)
    queue.put((time.perf_counter() - start, score.seconds, memory.growth, result))


def measure(job: str, paths: list[Path], hidden: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_measure, args=(job, [str(p) for p in paths], hidden, queue))
    process.start()
    out = queue.get()
    process.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingredients", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_population(Path(tmp), args.ingredients, args.hidden)
        size_mb = paths[0].stat().st_size / 2**20
        naive_s, naive_score_s, naive_mb, naive_sel = measure("naive", paths, args.hidden)
        fast_s, fast_score_s, fast_mb, fast_sel = measure("running", paths, args.hidden)
        if naive_sel != fast_sel:
            raise SystemExit(f"the two greedy soups disagree: {naive_sel} vs {fast_sel}")
        _, _, few_mb, _ = measure("uniform", paths[:4], args.hidden)
        _, _, all_mb, _ = measure("uniform", paths, args.hidden)
    print(f"{args.ingredients} checkpoints of {size_mb:.1f} MB; greedy selects {len(fast_sel)}: {fast_sel}")
    for name, total, scoring, mb in (("naive (reload + re-average each step)", naive_s, naive_score_s, naive_mb),
                                     ("running sum (each file read once)    ", fast_s, fast_score_s, fast_mb)):
        print(f"greedy, {name}: {total:7.2f} s total, {total - scoring:7.2f} s without scoring, peak +{mb:7.1f} MB")
    print(f"speed-up naive / running sum: {naive_s / fast_s:.1f}x in total, "
          f"{(naive_s - naive_score_s) / (fast_s - fast_score_s):.1f}x without scoring (target >= 3x)")
    print(f"uniform soup peak: 4 ingredients +{few_mb:.1f} MB, {args.ingredients} ingredients +{all_mb:.1f} MB; "
          f"ratio {all_mb / max(few_mb, 1e-9):.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
