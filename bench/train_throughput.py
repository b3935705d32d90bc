"""Training throughput of the shared runner against a plain hand-written PyTorch loop, in one process.

Both loops train the same model on the same in-memory batches with the same optimizer and schedule; the runner's
epoch adds what it always does (tqdm, loss accumulation, divergence checks, TensorBoard-free logging hooks) and
0, 1 or 5 EMA decays. Epochs are interleaved (plain, runner, plain, runner...) so drift in machine speed hits both
alike; the figure reported is the median steps/s ratio runner / plain.

A second table times the EMA update alone against timm's ModelEmaV3 (one instance per decay, its
``torch._foreach_lerp_`` update) on the same model, interleaved, median of 5: for 1 and 5 decays, and with two
post-hoc EMA profiles (``ema.posthoc.sigma_rels=[0.05,0.1]``) riding in the same fused update.

    python bench/train_throughput.py [--model mlpnet] [--epochs 12] [--batch-size 64] [--ema-every 1] [--ema-only]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from pathlib import Path

from mergelab.data import build_data
from mergelab.ema import EMA
from mergelab.models import build_model
from mergelab.training import Trainer, build_optimizer, build_scheduler

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def plain_epoch(model, batches, optimizer, scheduler) -> int:
    """The textbook loop: nothing but forward, loss, backward, step."""
    model.train()
    steps = 0
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps += 1
    return steps


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlpnet")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ema-every", type=int, default=1, help="ema.every: fold the weights in every k steps")
    parser.add_argument("--ema-only", action="store_true", help="only the EMA update against timm's ModelEmaV3")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", f"dataset={args.dataset}", "progress=false",
                                          f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
                                          f"ema.every={args.ema_every}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(cfg.dataset, batch_size=args.batch_size, eval_batch_size=1024, seed=0, device=device)
    print(f"model={args.model} dataset={args.dataset} batch={args.batch_size} ema.every={args.ema_every} "
          f"steps/epoch={len(data.train)} "
          f"device={device} threads={torch.get_num_threads()}")

    def make_model():
        torch.manual_seed(0)
        return build_model(cfg.model, data.num_classes, data.in_channels, data.image_size).to(device)

    if args.ema_only:
        return ema_update_table(make_model)
    rows = []
    for decays in ([], [0.999], [0.9, 0.99, 0.999, 0.9995, 0.9997]):
        cfg.ema.decays = decays
        plain_model = make_model()
        opt = build_optimizer(cfg.optimizer, plain_model)
        sched = build_scheduler(cfg.scheduler, opt, args.epochs * len(data.train), len(data.train))
        trainer = Trainer(make_model(), data, cfg, ckpt_dir="/nonexistent-unused", logger=None)
        plain_t, runner_t = [], []
        for epoch in range(args.epochs):
            data.train.set_epoch(epoch)
            plain_t.append(timed(lambda: plain_epoch(plain_model, data.train, opt, sched)))
            runner_t.append(timed(lambda: trainer.train_epoch(epoch)))
        # The first epoch warms up allocators and caches for both; leave it out.
        plain_med, runner_med = statistics.median(plain_t[1:]), statistics.median(runner_t[1:])
        steps = len(data.train)
        rows.append((len(decays), steps / plain_med, steps / runner_med, plain_med / runner_med))

    print(f"{'EMA decays':>10} {'plain steps/s':>14} {'runner steps/s':>15} {'ratio':>6}")
    for n, plain, runner, ratio in rows:
        print(f"{n:>10} {plain:>14.1f} {runner:>15.1f} {ratio:>6.3f}")
    ema_update_table(make_model)


def ema_update_table(make_model, updates: int = 200, repeats: int = 5) -> None:
    """The EMA update alone: mergelab's fused update against timm ModelEmaV3, one instance per decay."""
    from timm.utils import ModelEmaV3

    def per_update(fn) -> float:
        start = time.perf_counter()
        for i in range(updates):
            fn(i)
        return (time.perf_counter() - start) / updates

    print(f"\n{'EMA update alone':<28} {'mergelab us':>12} {'timm us':>9} {'timm / mergelab':>16}")
    five = [0.9, 0.99, 0.999, 0.9995, 0.9997]
    for label, decays, sigma_rels in (("1 decay", [0.999], []), ("5 decays", five, []),
                                      ("5 decays + 2 post-hoc", five, [0.05, 0.1])):
        model = make_model()
        ours = EMA(model, decays, sigma_rels=sigma_rels)
        timm_emas = [ModelEmaV3(model, decay=d) for d in decays]  # timm has no power-function EMA
        ours_t, timm_t = [], []
        for _ in range(repeats):  # interleaved, so drift in machine speed hits both alike
            ours_t.append(per_update(lambda i: ours.update()))
            timm_t.append(per_update(lambda i: [e.update(model, step=i + 1) for e in timm_emas]))
        a, b = statistics.median(ours_t), statistics.median(timm_t)
        print(f"{label:<28} {a * 1e6:>12.0f} {b * 1e6:>9.0f} {b / a:>16.1f}")


if __name__ == "__main__":
    main()
