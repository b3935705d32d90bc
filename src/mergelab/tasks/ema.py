"""ema.py: the EMA study in one run per setting, and post-hoc EMA from a run's snapshots.

The study (Adda, Mizrahi & Yüksel, "Studying weight averaging") trains one model per EMA decay; here one training
run tracks every decay at once (one fused update, :class:`mergelab.ema.EMA`) plus a uniform tail average as the
SWA-style baseline, and evaluates all of them after every epoch. With BatchNorm and ``ema.recompute_bn=true`` each
average is evaluated twice: with its averaged running statistics and with statistics recomputed for its weights.

Post-hoc EMA (Karras et al. 2024, Sec. 3): a run that tracked power-function EMAs (``ema.posthoc.sigma_rels``)
left snapshots of them in ``checkpoints/posthoc/``. ``python ema.py posthoc.run=<run folder>`` (or the end of an
``ema.py`` run that tracked them) reconstructs the average at the last step for every ``sigma_rel`` of
``posthoc.grid`` (and every classic decay of ``posthoc.decays``) by least squares
(:mod:`mergelab.merging.posthoc`), evaluates each on val and test, keeps the best on validation as
``checkpoints/posthoc_best.safetensors`` and plots accuracy against sigma_rel.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mergelab.checkpoints import load_checkpoint, read_meta, save_checkpoint  # noqa: E402
from mergelab.data import build_data  # noqa: E402
from mergelab.errors import UserError  # noqa: E402
from mergelab.evaluation import evaluate, has_batchnorm, recompute_bn  # noqa: E402
from mergelab.metrics import metric_key, methods_in, parse_column, row_from_metrics  # noqa: E402
from mergelab.merging.posthoc import (SIGMA_REL_MAX, combine, decay_to_sigma_rel, sigma_rel_to_gamma,  # noqa: E402
                                      solve_coefficients)
from mergelab.plotting import read_results  # noqa: E402
from mergelab.population import model_from_meta  # noqa: E402
from mergelab.runner import Context  # noqa: E402
from mergelab.tasks import train  # noqa: E402
from mergelab.training import SNAPSHOT_DIR  # noqa: E402

METRICS = ("val_acc", "test_acc")
BN_SUFFIX = "+recompute_bn"
POSTHOC_PREFIX = "posthoc_"
FIGURE = "posthoc_ema.png"


def run(ctx: Context) -> dict:
    source = OmegaConf.select(ctx.cfg, "posthoc.run")
    if source:
        return posthoc_study(ctx, Path(str(source)), finished_run_config(Path(str(source))))
    results = train.run(ctx)
    final = results["history"][-1] if results["history"] else {}
    results["task"] = "ema"
    results["table"] = study_table(final)
    results["metrics"].update(best_ema(final))
    if OmegaConf.select(ctx.cfg, "ema.posthoc.sigma_rels"):
        posthoc = posthoc_study(ctx, ctx.run_dir, ctx.cfg)
        results["table"] += posthoc["table"]
        results["metrics"].update(posthoc["metrics"])
        results["posthoc"] = posthoc["posthoc"]
    return results


def averages_in(record: dict[str, float]) -> list[str]:
    """The averaged models of an evaluation record in order (``raw``, the decays, ``tail``), without
    ``+recompute_bn``."""
    return [name for name in methods_in(record) if not name.endswith(BN_SUFFIX)]


def study_table(record: dict[str, float]) -> list[dict]:
    """One row per model: no EMA, each decay, the tail average; val and test accuracy with averaged BatchNorm
    statistics and, where measured, with statistics recomputed for the averaged weights (``recompute_bn_*`` columns)."""
    rows = []
    for name in averages_in(record):
        row = {"method": name, **row_from_metrics(record, name, METRICS)}
        if metric_key(name + BN_SUFFIX, "val", "acc") in record:
            row.update({f"recompute_bn_{m}": v for m, v in row_from_metrics(record, name + BN_SUFFIX, METRICS).items()})
        rows.append(row)
    return rows


def best_ema(record: dict[str, float]) -> dict[str, float]:
    """The EMA decay with the best validation accuracy, and its test accuracy (selection never looks at test).

    These are the sweeper's default objective (``best_ema/val_acc``): with ``averaged.decay=<d>`` there is one decay
    and this is its accuracy, whatever ``d`` a trial picked.
    """
    decays = [name for name in averages_in(record) if name.startswith("ema")]
    if not decays:
        return {}
    best = max(decays, key=lambda name: record[metric_key(name, "val", "acc")])
    return {metric_key("best_ema", None, "decay"): float(best[len("ema"):]),
            **{metric_key("best_ema", *parse_column(m)): v for m, v in row_from_metrics(record, best, METRICS).items()}}


# ---------------------------------------------------------------------------------------------------- post-hoc EMA
def finished_run_config(run_dir: Path):
    """The config a finished run folder was trained with (from its ``results.json``)."""
    if not (run_dir / "results.json").is_file():
        raise UserError(f"posthoc.run={run_dir} is not a finished run folder (no results.json); pass the folder of "
                        "a train.py or ema.py run that tracked ema.posthoc.sigma_rels")
    return OmegaConf.create(read_results(run_dir)["config"])


def list_snapshots(run_dir: Path) -> list[tuple[Path, dict]]:
    """``(path, meta)`` of every snapshot of a run, ordered by step then sigma_rel."""
    paths = sorted((run_dir / "checkpoints" / SNAPSHOT_DIR).glob("*.safetensors"))
    if not paths:
        raise UserError(f"no post-hoc EMA snapshots in {run_dir / 'checkpoints' / SNAPSHOT_DIR}; train with "
                        "ema.posthoc.sigma_rels=[0.05,0.1] (and ema.posthoc.every=<steps>) to save them")
    snaps = [(p, read_meta(p)) for p in paths]
    return sorted(snaps, key=lambda s: (s[1]["step"], s[1]["sigma_rel"]))


def reconstruction_grid(cfg, steps: int) -> list[tuple[float, str]]:
    """``(sigma_rel, how it was asked)`` for ``posthoc.grid`` and ``posthoc.decays`` (a classic decay stands for
    the power-function EMA of the same width at the last step), sorted."""
    grid = {float(s): f"{float(s):g}" for s in OmegaConf.select(cfg, "posthoc.grid") or []}
    for decay in OmegaConf.select(cfg, "posthoc.decays") or []:
        grid.setdefault(decay_to_sigma_rel(float(decay), steps), f"decay {float(decay):g}")
    bad = [f"{how} (sigma_rel {s:.3g})" for s, how in grid.items() if not 0.0 < s < SIGMA_REL_MAX]
    if bad or not grid:
        raise UserError(f"posthoc.grid/posthoc.decays must give sigma_rel values in (0, {SIGMA_REL_MAX:.4f}) at "
                        f"step {steps}; not {bad or 'an empty grid'}: e.g. posthoc.grid=[0.02,0.05,0.1,0.2]")
    return sorted(grid.items())


def relative_error(state: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    """``||state - truth|| / ||truth||`` over every floating-point tensor, as one vector."""
    keys = [k for k, v in truth.items() if v.is_floating_point()]
    diff = sum(float((state[k].double() - truth[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(truth[k].double().pow(2).sum()) for k in keys)
    return math.sqrt(diff / norm)


def evaluate_state(model, state: dict[str, torch.Tensor], data) -> dict[str, float]:
    """``val_acc``, ``test_acc`` (and ``val_loss``, the tie-break of the selection) of ``state`` as it is and,
    with BatchNorm, ``recompute_bn_*`` with statistics recomputed on the training data (the model keeps those)."""
    def measure(prefix: str = "") -> dict[str, float]:
        val, test = evaluate(model, data.val), evaluate(model, data.test)
        return {f"{prefix}val_acc": val["acc"], f"{prefix}test_acc": test["acc"], f"{prefix}val_loss": val["loss"]}

    model.load_state_dict(state)
    row = measure()
    if has_batchnorm(model):
        recompute_bn(model, data.train_eval)
        row.update(measure("recompute_bn_"))
    return row


def posthoc_study(ctx: Context, run_dir: Path, run_cfg) -> dict:
    """Reconstruct, evaluate and select post-hoc EMAs of the run in ``run_dir``, trained with ``run_cfg`` (see the
    module doc); the outputs go to ``ctx.run_dir``."""
    snaps = list_snapshots(run_dir)
    start = time.perf_counter()
    last = snaps[-1][1]["step"]
    steps = [m["step"] for _, m in snaps]
    gammas = [m["gamma"] for _, m in snaps]
    tracked = sorted({m["sigma_rel"] for _, m in snaps})
    grid = reconstruction_grid(ctx.cfg, last)
    # One pass over the snapshots for every output: the grid, then each tracked profile rebuilt from the others'
    # snapshots alone (its own final average is the truth it must match).
    columns = [solve_coefficients(steps, gammas, [last] * len(grid), [sigma_rel_to_gamma(s) for s, _ in grid])]
    checks = tracked if len(tracked) > 1 else []
    for sigma in checks:
        others = [i for i, (_, m) in enumerate(snaps) if m["sigma_rel"] != sigma]
        coefs = np.zeros((len(snaps), 1))
        coefs[others] = solve_coefficients([steps[i] for i in others], [gammas[i] for i in others],
                                           [last], [sigma_rel_to_gamma(sigma)])
        columns.append(coefs)
    states = combine((load_checkpoint(p)[0] for p, _ in snaps), np.concatenate(columns, axis=1))
    reconstruct_s = time.perf_counter() - start
    truth = {m["sigma_rel"]: p for p, m in snaps if m["step"] == last}
    check_rows = [check_row(sigma, state, truth) for sigma, state in zip(checks, states[len(grid):])]

    data = build_data(run_cfg.dataset, batch_size=run_cfg.train.batch_size,
                      eval_batch_size=run_cfg.train.eval_batch_size, seed=int(run_cfg.seed), device=ctx.device)
    meta = snaps[-1][1]
    model = model_from_meta(meta, snaps[-1][0]).to(ctx.device)
    select = "recompute_bn_val_acc" if has_batchnorm(model) else "val_acc"
    loss = select.replace("acc", "loss")
    rows, best = [], None
    for (sigma, how), state in zip(grid, states):
        asked = "" if how.startswith("0") else f" ({how})"
        row = {"method": f"{POSTHOC_PREFIX}sigma_rel{sigma:.4g}{asked}", "sigma_rel": sigma,
               **evaluate_state(model, {k: v.to(ctx.device) for k, v in state.items()}, data)}
        rows.append(row)
        # Validation accuracy, ties (a small validation split) broken by the lower validation loss.
        if best is None or (row[select], -row[loss]) > (best[0][select], -best[0][loss]):
            best = (row, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    marks = tracked_marks(run_dir, last, model, data, ctx.device)

    row, state = best
    gamma = sigma_rel_to_gamma(row["sigma_rel"])
    best_path = ctx.run_dir / "checkpoints" / "posthoc_best.safetensors"
    save_checkpoint(best_path, state, {**{k: v for k, v in meta.items() if k not in ("sigma_rel", "gamma")},
                                       "sigma_rel": row["sigma_rel"], "gamma": gamma, "step": last,
                                       "recompute_bn": select != "val_acc", "posthoc_run": str(run_dir),
                                       "metrics": {k: row[k] for k in row if k.endswith("_acc")}})
    figure = ctx.run_dir / FIGURE
    plot_accuracy(rows, marks, select.replace("val", "{split}"), row["sigma_rel"], last, figure)
    metrics = {metric_key("posthoc", None, "sigma_rel"): row["sigma_rel"],
               metric_key("posthoc", "val", "acc"): row[select],
               metric_key("posthoc", "test", "acc"): row[select.replace("val", "test")]}
    if check_rows:
        metrics[metric_key("posthoc", None, "check_rel_err")] = max(c["rel_err"] for c in check_rows)
    info = {"run": str(run_dir), "step": last, "snapshots": len(snaps), "tracked": tracked,
            "every": steps[0],  # the first snapshot is at step `every`
            "selected_by": select, "check": check_rows, "marks": marks, "grid": rows,
            "checkpoint": str(best_path), "figure": str(figure), "reconstruct_s": reconstruct_s}
    for check in check_rows:
        print(f"check: sigma_rel {check['sigma_rel']:g} rebuilt from the other profiles' snapshots: relative weight "
              f"error {check['rel_err']:.2e} (its nearest tracked profile, {check['nearest_tracked']:g}, is "
              f"{check['nearest_rel_err']:.2e} away)")
    print(f"best on validation: sigma_rel {row['sigma_rel']:.4g} -> {best_path}\nfigure: {figure}")
    table = [{k: v for k, v in r.items() if k != "sigma_rel" and "loss" not in k} for r in rows + marks]
    return {"task": "ema", "metrics": metrics, "table": table, "posthoc": info}


def check_row(sigma: float, rebuilt: dict[str, torch.Tensor], truth: dict[float, Path]) -> dict:
    """How far ``rebuilt`` (profile ``sigma`` from the other profiles' snapshots) is from the tracked average, and,
    as the same-run baseline, how far the nearest other tracked profile is."""
    exact = load_checkpoint(truth[sigma])[0]
    nearest = min((s for s in truth if s != sigma), key=lambda s: abs(math.log(s / sigma)))
    return {"sigma_rel": sigma, "rel_err": relative_error(rebuilt, exact), "nearest_tracked": nearest,
            "nearest_rel_err": relative_error(load_checkpoint(truth[nearest])[0], exact)}


def tracked_marks(run_dir: Path, last: int, model, data, device) -> list[dict]:
    """The run's directly tracked averages (``ema<d>``, ``sigma_rel<s>``), evaluated like the reconstructions, each
    at its ``sigma_rel`` (a classic decay at the one of the same width)."""
    marks = []
    for path in sorted((run_dir / "checkpoints").glob("*.safetensors")):
        info = read_meta(path)
        if path.stem.startswith(("ema", "sigma_rel")) and ("ema_decay" in info or "sigma_rel" in info):
            state, _ = load_checkpoint(path, device=device)
            sigma = info.get("sigma_rel") or decay_to_sigma_rel(info["ema_decay"], last)
            marks.append({"method": path.stem, "sigma_rel": sigma, **evaluate_state(model, state, data)})
    return marks


def plot_accuracy(rows: list[dict], marks: list[dict], column: str, best: float, steps: int, path: Path) -> None:
    """Validation and test accuracy against sigma_rel (log axis): the reconstructed grid as lines, the run's
    directly tracked averages as points (classic decays at the sigma_rel of the same width; those wider than 1,
    more than the whole run, only in the table), the pick dashed."""
    marks = [m for m in marks if m["sigma_rel"] <= 1.0]
    figure, ax = plt.subplots(figsize=(6.4, 4.0))
    for split, color in (("val", "tab:blue"), ("test", "tab:orange")):
        key = column.format(split=split)
        ax.plot([r["sigma_rel"] for r in rows], [r[key] for r in rows], "-o", ms=3, color=color,
                label=f"post-hoc, {split}")
        ax.scatter([m["sigma_rel"] for m in marks], [m[key] for m in marks], marker="x" if split == "val" else "+",
                   s=60, color=color, zorder=3, label=f"tracked in the run, {split}")
    for i, mark in enumerate(m for m in marks if not m["method"].startswith("sigma_rel")):
        ax.annotate(mark["method"], (mark["sigma_rel"], mark[column.format(split="test")]), fontsize=7,
                    textcoords="offset points", xytext=(4, -12 if i % 2 else 6))
    ax.axvline(best, ls="--", color="gray", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(f"sigma_rel (at step {steps})")
    ax.set_ylabel("accuracy (%)" + (", BatchNorm recomputed" if column.startswith("recompute_bn_") else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
