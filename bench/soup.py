"""Greedy soup with a running sum against the naive greedy soup, and the streaming uniform soup's peak memory.

One run measures, on the same 16 checkpoints (an MLP on digits, ~34 MB each, written to a temporary folder):
- greedy soup (Wortsman et al. 2022, Algorithm 1) by ``mergelab.merging.soups.greedy_soup``: each checkpoint read
  once, the soup kept as a running sum, so a step costs one model's worth of additions;
- the naive greedy soup: at every step, reload every selected checkpoint and the candidate from disk and average
  them from scratch;
both scoring candidates by validation cross-entropy on digits (a real forward pass), and both must select the same
ingredients. Reported: the time ratio naive / running sum, and the peak memory of each.
- the uniform soup streamed over 4 and over 16 checkpoints: peak memory of each and their ratio.

Peak memory is the growth of the resident set's high-water mark (``ru_maxrss``) in a fresh subprocess per
measurement, over its value once torch, the data and the model are loaded.

    python bench/soup.py [--ingredients 16] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mergelab.checkpoints import load_checkpoint, save_checkpoint
from mergelab.data import build_data
from mergelab.merging import soups
from mergelab.models import MLPNet

DIGITS = {"name": "digits", "val_fraction": 0.1}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def scorer(hidden: int):
    """Negative validation cross-entropy of a state: the score both greedy soups select on."""
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
    """In a fresh process: run one job, report (seconds, peak-memory growth in MB, result)."""
    paths = [Path(p) for p in paths]
    score = scorer(hidden)
    order = list(range(len(paths)))
    score(load_checkpoint(paths[0])[0])  # warm up: model, data and allocator are in the baseline
    baseline = peak_mb()
    start = time.perf_counter()
    if job == "uniform":
        soups.uniform_soup(load_checkpoint(p)[0] for p in paths)
        result = []
    else:
        result = (naive_greedy if job == "naive" else running_greedy)(paths, order, score)
    queue.put((time.perf_counter() - start, peak_mb() - baseline, result))


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
        naive_s, naive_mb, naive_sel = measure("naive", paths, args.hidden)
        fast_s, fast_mb, fast_sel = measure("running", paths, args.hidden)
        if naive_sel != fast_sel:
            raise SystemExit(f"the two greedy soups disagree: {naive_sel} vs {fast_sel}")
        _, few_mb, _ = measure("uniform", paths[:4], args.hidden)
        _, all_mb, _ = measure("uniform", paths, args.hidden)
    print(f"{args.ingredients} checkpoints of {size_mb:.1f} MB; greedy selects {len(fast_sel)}: {fast_sel}")
    print(f"greedy, naive (reload + re-average each step): {naive_s:7.2f} s  peak +{naive_mb:7.1f} MB")
    print(f"greedy, running sum (each file read once):     {fast_s:7.2f} s  peak +{fast_mb:7.1f} MB")
    print(f"speed-up naive / running sum: {naive_s / fast_s:.1f}x (target >= 3x)")
    print(f"uniform soup peak: 4 ingredients +{few_mb:.1f} MB, {args.ingredients} ingredients +{all_mb:.1f} MB; "
          f"ratio {all_mb / max(few_mb, 1e-9):.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
