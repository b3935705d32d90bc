"""Post-hoc EMA: reconstruction error against snapshot spacing, the disk and memory cost of snapshots, and the time
to reconstruct a grid of 20 sigma_rel values, all from one dense ResNet-20 run on digits.

1. Trains ``ema.py experiment=ema_posthoc_digits`` (240 steps) tracking sigma_rel 0.05, 0.075 and 0.10 with a
   snapshot every ``--dense`` steps (or reads ``--run``, a run folder with such snapshots).
2. Error against spacing: keeps every k-th snapshot and rebuilds the profiles tracked in the run from the others,
   relative weight error ``||rebuilt - tracked|| / ||tracked||`` at the last step: 0.075 from 0.05 and 0.10 (the
   paper's setting, a width between two tracked ones) and 0.05 from 0.10 alone. The same-run baseline is the
   error of the nearest other tracked profile taken as is.
3. Cost: bytes of one snapshot file (measured), times profiles x snapshots; training memory: the EMA buffer with
   0, 1, 2, 4 profiles (measured), and the time of one EMA update and one snapshot write against one training step.
4. Reconstruction of 20 sigma_rel at the last step, from disk: least squares plus the streamed weighted sum, against
   the floor of only reading the same snapshot files; median of 3.

    python bench/posthoc_ema.py [--run <folder>] [--dense 2] [--figure docs/figures/posthoc_error_spacing.png]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from mergelab.checkpoints import load_checkpoint, save_checkpoint
from mergelab.data import build_data
from mergelab.ema import EMA
from mergelab.merging.posthoc import combine, sigma_rel_to_gamma, solve_coefficients
from mergelab.models import build_model
from mergelab.runner import _run
from mergelab.tasks.ema import list_snapshots, relative_error

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TRACKED = (0.05, 0.075, 0.1)
GRID = [0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22,
        0.25, 0.28]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("ema", overrides=["experiment=ema_posthoc_digits", "progress=false", *overrides])


def dense_run(folder: Path, every: int) -> None:
    _run(compose_cfg([f"out_dir={folder}", f"ema.posthoc.sigma_rels=[{','.join(map(str, TRACKED))}]",
                      f"ema.posthoc.every={every}", "posthoc.grid=[0.05]", "ema.decays=[]"]))


def rebuild(snaps, cache, target: float, basis: tuple[float, ...], spacing: int, last: int):
    use = [(p, m) for p, m in snaps if m["sigma_rel"] in basis and (m["step"] % spacing == 0 or m["step"] == last)]
    x = solve_coefficients([m["step"] for _, m in use], [m["gamma"] for _, m in use], [last],
                           [sigma_rel_to_gamma(target)])
    return combine((cache[p] for p, _ in use), x)[0], len({m["step"] for _, m in use})


def error_table(snaps, last: int, dense: int, figure: Path | None) -> None:
    cache = {p: load_checkpoint(p)[0] for p, _ in snaps}
    truth = {m["sigma_rel"]: cache[p] for p, m in snaps if m["step"] == last}
    print(f"\n## Relative weight error of the rebuilt average at step {last} against the tracked one")
    print("| spacing (steps) | snapshots per profile | 0.075 from 0.05 + 0.10 | 0.05 from 0.10 | 0.10 from 0.05 |")
    print("|---|---|---|---|---|")
    cases = ((0.075, (0.05, 0.1)), (0.05, (0.1,)), (0.1, (0.05,)))
    curves = {case: [] for case in cases}
    spacings = sorted({dense, *(dense * k for k in (2, 3, 5, 10, 20))})
    for spacing in spacings:
        cells, count = [], 0
        for target, basis in cases:
            state, count = rebuild(snaps, cache, target, basis, spacing, last)
            curves[(target, basis)].append(relative_error(state, truth[target]))
            cells.append(f"{curves[(target, basis)][-1]:.1e}")
        print(f"| {spacing} | {count} | " + " | ".join(cells) + " |")
    print(f"| baseline: nearest tracked profile as is | - | {relative_error(truth[0.05], truth[0.075]):.1e} | "
          f"{relative_error(truth[0.075], truth[0.05]):.1e} | {relative_error(truth[0.075], truth[0.1]):.1e} |")
    if figure:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.6, 3.6))
        for (target, basis), errors in curves.items():
            ax.loglog(spacings, errors, "-o", ms=3, label=f"{target:g} from {' + '.join(f'{b:g}' for b in basis)}")
        ax.axhline(1e-3, ls="--", color="gray", lw=1)
        ax.axvline(round(last / 50), ls=":", color="gray", lw=1)
        ax.set_xticks(spacings, [str(k) for k in spacings])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"steps between snapshots (run of {last} steps; dotted: the default, T/50)")
        ax.set_ylabel("relative weight error")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figure, dpi=130)
        print(f"figure: {figure}")


def cost_tables(snaps, last: int) -> None:
    cfg = compose_cfg([])
    device = torch.device("cpu")
    data = build_data(cfg.dataset, batch_size=cfg.train.batch_size, eval_batch_size=1024, seed=0, device=device)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    params = sum(p.numel() for p in model.parameters())
    size = snaps[0][0].stat().st_size + snaps[0][0].with_suffix(".json").stat().st_size
    print(f"\n## Disk: one snapshot of ResNet-20 ({params:,} parameters) is {size / 2**20:.2f} MiB "
          f"(safetensors + JSON sidecar); a run of {last} steps stores")
    print("| profiles | every T/25 | every T/50 (default) | every T/100 | every T/250 |")
    print("|---|---|---|---|---|")
    for profiles in (1, 2, 4):
        print(f"| {profiles} | " + " | ".join(f"{profiles * n * size / 2**20:.0f} MiB" for n in (25, 50, 100, 250))
              + " |")

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(x, y) for x, y in data.train]

    def train_step(i):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn, n):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - start) / n

    rows = []
    step_t = statistics.median(timed(train_step, 20) for _ in range(3))
    folder = Path(tempfile.mkdtemp())
    for profiles in (0, 1, 2, 4):
        ema = EMA(model, [0.999], sigma_rels=[0.05, 0.1, 0.075, 0.2][:profiles])
        update_t = statistics.median(timed(lambda i: ema.update(), 200) for _ in range(3))
        write_t = statistics.median(timed(lambda i: [save_checkpoint(folder / f"s{j}.safetensors",
                                                                     ema.state_dict_for(1 + j), {"step": i})
                                                     for j in range(profiles)], 5) for _ in range(3))
        rows.append((profiles, ema._flat.nbytes, update_t, write_t))
        del ema
    shutil.rmtree(folder)
    print(f"\n## Training memory and time (one CPU step of ResNet-20 at batch {cfg.train.batch_size}: "
          f"{step_t * 1e3:.1f} ms)")
    print("| profiles (+ one classic decay) | EMA buffer | EMA update / train step | snapshot write / train step |")
    print("|---|---|---|---|")
    for profiles, nbytes, update_t, write_t in rows:
        print(f"| {profiles} | {nbytes / 2**20:.2f} MiB | {update_t / step_t:.3f} | {write_t / step_t:.2f} |")


def reconstruction_time(snaps, last: int, dense: int) -> None:
    print("\n## Reconstructing 20 sigma_rel at the last step from disk (median of 3)")
    print("| snapshots | read only (floor) | solve + streamed sum | ratio |")
    print("|---|---|---|---|")
    for spacing in (dense, dense * 5):
        use = [(p, m) for p, m in snaps if m["sigma_rel"] in (0.05, 0.1)
               and (m["step"] % spacing == 0 or m["step"] == last)]

        def read():
            for p, _ in use:
                load_checkpoint(p)

        def reconstruct():
            x = solve_coefficients([m["step"] for _, m in use], [m["gamma"] for _, m in use], [last] * len(GRID),
                                   [sigma_rel_to_gamma(s) for s in GRID])
            combine((load_checkpoint(p)[0] for p, _ in use), x)

        floor = statistics.median(_seconds(read) for _ in range(3))
        full = statistics.median(_seconds(reconstruct) for _ in range(3))
        print(f"| {len(use)} | {floor:.2f} s | {full:.2f} s | {full / floor:.1f}x |")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder with dense snapshots of sigma_rel 0.05, 0.075, 0.1")
    parser.add_argument("--dense", type=int, default=2, help="steps between snapshots of the dense run")
    parser.add_argument("--figure", type=Path, help="also plot the error against the spacing into this PNG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scratch = None
    if args.run is None:
        scratch = Path(tempfile.mkdtemp(prefix="posthoc_bench_"))
        args.run = scratch / "run"
        start = time.perf_counter()
        dense_run(args.run, args.dense)
        print(f"dense run: {time.perf_counter() - start:.0f} s")
    snaps = list_snapshots(args.run)
    last = snaps[-1][1]["step"]
    try:
        error_table(snaps, last, args.dense, args.figure)
        cost_tables(snaps, last)
        reconstruction_time(snaps, last, args.dense)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch)
    print(f"\n(threads={torch.get_num_threads()}; CPU timings on a shared machine: compare ratios, not seconds)")


if __name__ == "__main__":
    main()
