"""Figures from finished runs: reads ``results.json`` and TensorBoard events of run folders, never re-trains.

Each ``figures_<kind>(runs, ...)`` returns ``({name: matplotlib Figure}, table rows)``; :mod:`mergelab.tasks.plots`
finds the runs, saves the figures as PNG and into TensorBoard, and prints the rows. Runs that differ in more than
their seed are grouped by the settings that differ (``scheduler=cosine``, ``optimizer.lr=0.1``); within a group,
curves and bars show the mean over seeds and the spread (standard deviation) around it.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import statistics
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mergelab.errors import UserError  # noqa: E402
from mergelab.metrics import is_metric_key, metric_key, methods_in, parse_metric_key  # noqa: E402

RESULTS = "results.json"
# Settings that tell repetitions of one experiment apart, or that do not change its outcome: never a group.
NOT_A_SETTING = ("seed", "global_seed", "out_dir", "resume", "progress", "device", "runs", "ingredients", "models",
                 "pretrained_from", "index", "objective")
SPLITS = ("val", "test")


@dataclass
class Run:
    """One finished run folder: its ``results.json`` and, on demand, its TensorBoard scalars."""

    folder: Path
    results: dict

    @property
    def config(self) -> dict:
        return self.results.get("config", {})

    @cached_property
    def scalars(self) -> dict[str, tuple[list[int], list[float]]]:
        """``{tag: (steps, values)}`` from the run's TensorBoard event files (only those directly in its folder)."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it reports every file it reads at INFO
        events = EventAccumulator(str(self.folder), size_guidance={"scalars": 0})
        events.Reload()
        return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
                for tag in events.Tags()["scalars"]}


def find_runs(patterns: str | Iterable[str]) -> list[Run]:
    """The finished runs under some globs: a run folder holds ``results.json``; a matched folder without one stands
    for the run folders directly inside it (a multirun folder)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    folders: list[Path] = []
    for pattern in patterns:
        matches = [Path(m) for m in sorted(glob.glob(str(pattern)))]
        if not matches:
            raise UserError(f"no run folder matches runs={pattern!r}; check the path or glob (quote it in the shell)")
        for match in matches:
            if match.name == RESULTS:
                match = match.parent
            if (match / RESULTS).is_file():
                folders.append(match)
            elif match.is_dir():
                folders += sorted(p.parent for p in match.glob(f"*/{RESULTS}"))
    if not folders:
        raise UserError(f"no {RESULTS} in the folders matching runs={patterns}; did the runs finish?")
    return [Run(folder, read_results(folder)) for folder in dict.fromkeys(folders)]


def read_results(folder: Path) -> dict:
    try:
        return json.loads((folder / RESULTS).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / RESULTS} is not valid JSON ({exc}); rerun that run or leave it out") from None


def require(runs: list[Run], key: str, kind: str) -> list[Run]:
    """The runs whose results have ``key``; an error naming the producer when none has it."""
    having = [run for run in runs if run.results.get(key)]
    if not having:
        raise UserError(f"kind={kind} needs runs whose {RESULTS} has {key!r}; none of {len(runs)} runs "
                        f"(first: {runs[0].folder}) has it. Pick the runs of the right script or another kind=")
    return having


# ------------------------------------------------------------------------------------------------------- grouping
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for a nested dict; lists become strings so that they compare and print."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, list) else tree}


def setting_label(key: str, value: Any) -> str:
    """``scheduler._target_=mergelab.schedules.cosine`` reads as ``scheduler=cosine``."""
    if key.endswith("._target_") and isinstance(value, str):
        return f"{key[:-len('._target_')]}={value.rsplit('.', 1)[-1]}"
    return f"{key}={value}"


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by the settings in which they differ, seeds aside; one group ``all`` if only seeds differ."""
    configs = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*configs))
    varying = [k for k in keys if k.split(".")[0] not in NOT_A_SETTING
               and len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    # A group config file changes every key under it: name it once, by its _target_, when there is one.
    targets = {k[:-len("._target_")] for k in varying if k.endswith("._target_")}
    shown = [k for k in varying if k.endswith("._target_") or not any(k.startswith(t + ".") for t in targets)]
    groups: dict[str, list[Run]] = {}
    for run, config in zip(runs, configs):
        label = ",".join(setting_label(k, config.get(k)) for k in shown) or "all"
        groups.setdefault(label, []).append(run)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------- EMA
def averaged_models(run: Run) -> list[str]:
    """The models a train/ema run evaluated (``raw``, each ``ema<decay>``, ``tail``), without ``+recompute_bn``
    variants."""
    names = methods_in(run.results.get("metrics", {}), split="test", name="acc")
    return [n for n in names if n == "raw" or n.startswith("ema") or n == "tail"]


def mean_curve(runs: list[Run], tag: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and standard deviation over runs of a TensorBoard scalar, on the steps every run logged."""
    curves = [run.scalars[tag] for run in runs if tag in run.scalars]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s, _ in curves)))
    per_step = [[dict(zip(s, v))[step] for s, v in curves] for step in steps]
    stats = [mean_std(values) for values in per_step]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def figures_ema(runs: list[Run], split: str = "val") -> tuple[dict[str, Figure], list[dict]]:
    """The EMA study's Figure 1 (accuracy over training of the raw model and each average, one panel per setting)
    and its Table 1 (final test accuracy, setting x average, mean and spread over seeds)."""
    runs = [run for run in runs if averaged_models(run)]
    if not runs:
        raise UserError(f"kind=ema needs train.py or ema.py runs (their {RESULTS} has raw/... metrics)")
    groups = group_runs(runs)
    names = list(dict.fromkeys(n for run in runs for n in averaged_models(run)))
    cols = min(len(groups), 3)
    rows_n = math.ceil(len(groups) / cols)
    curves, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False, sharey=True)
    for ax, (label, members) in zip(axes.flat, groups.items()):
        for name in names:
            steps, mean, std = mean_curve(members, metric_key(name, split, "acc"))
            if steps:
                [line] = ax.plot(steps, mean, label=name, lw=1.2 if name != "raw" else 2.0,
                                 color="black" if name == "raw" else None)
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2)
        ax.set_title(f"{label} ({len(members)} runs)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    curves.tight_layout()

    table = []
    for label, members in groups.items():
        for name in names:
            val = mean_std([run.results["metrics"].get(metric_key(name, "val", "acc")) for run in members])
            test = mean_std([run.results["metrics"].get(metric_key(name, "test", "acc")) for run in members])
            table.append({"group": label, "method": name, "val_acc": val[0], "test_acc": test[0],
                          "test_acc_std": test[1], "runs": len(members)})
    return {"ema_curves": curves, "ema_table": table_figure(table, names, "test_acc")}, table


def table_figure(rows: list[dict], columns: list[str], value: str) -> Figure:
    """A group x method grid of ``value`` (mean ± std) drawn as a table."""
    groups = list(dict.fromkeys(row["group"] for row in rows))
    cells = {(row["group"], row["method"]): row for row in rows}

    def cell(group: str, column: str) -> str:
        row = cells.get((group, column))
        if row is None or not math.isfinite(row[value]):
            return "-"
        return f"{row[value]:.2f} ± {row[value + '_std']:.2f}"

    figure, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.6 + 0.35 * len(groups)))
    ax.axis("off")
    grid = ax.table(cellText=[[cell(g, c) for c in columns] for g in groups], rowLabels=groups, colLabels=columns,
                    loc="center", cellLoc="center")
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    ax.set_title(f"final {value.replace('_', ' ')} (%), mean ± std over seeds", fontsize=9)
    figure.tight_layout()
    return figure


# -------------------------------------------------------------------------------------------------------- soups
def figures_soup(runs: list[Run]) -> tuple[dict[str, Figure], list[dict]]:
    """The model-soups scatter (each ingredient's validation vs test accuracy, every soup and ensemble marked) and
    greedy-soup accuracy against the number of ingredients, one pair per soup run."""
    figures, table = {}, []
    for i, run in enumerate(require(runs, "ingredients", "soup")):
        suffix = f"_{i}" if len(runs) > 1 else ""
        figure, ax = plt.subplots(figsize=(5.5, 4.5))
        ingredients = run.results["ingredients"]
        ax.scatter([g["val_acc"] for g in ingredients], [g["test_acc"] for g in ingredients], c="0.6", s=18,
                   label="ingredients")
        markers = iter("*DsP^vX<>ph" * 3)
        for method in run.results.get("methods", []):
            if method["method"].startswith("ingredient"):
                continue
            ax.scatter(method["val_acc"], method["test_acc"], marker=next(markers), s=70, label=method["method"])
            table.append({"run": run.folder.name, **{k: method.get(k) for k in ("method", "n_ingredients", "val_acc",
                                                                                 "test_acc")}})
        ax.set_xlabel("validation accuracy (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"soups: {run.folder.name}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        figure.tight_layout()
        figures[f"soup_scatter{suffix}"] = figure
        curve = run.results.get("greedy_curve") or []
        if curve:
            figure, ax = plt.subplots(figsize=(5, 3.6))
            for split in SPLITS:
                ax.plot([p["n"] for p in curve], [p[f"{split}_acc"] for p in curve], marker="o", label=split)
            ax.set_xlabel("ingredients in the greedy soup")
            ax.set_ylabel("accuracy (%)")
            ax.legend()
            ax.grid(alpha=0.3)
            figure.tight_layout()
            figures[f"greedy_curve{suffix}"] = figure
    return figures, table


# ----------------------------------------------------------------------------------------------- fusion, ZipIt!
def figures_methods(runs: list[Run], kind: str) -> tuple[dict[str, Figure], list[dict]]:
    """Grouped bars: validation and test accuracy of every method and baseline of the runs' tables (mean over
    runs, standard deviation as error bars), one panel per group of settings."""
    runs = require(runs, "table", kind)
    groups = group_runs(runs)
    figure, axes = plt.subplots(len(groups), 1, figsize=(8, 3.6 * len(groups)), squeeze=False)
    table = []
    for ax, (label, members) in zip(axes.flat, groups.items()):
        methods = list(dict.fromkeys(row["method"] for run in members for row in run.results["table"]))
        width = 0.4
        for j, split in enumerate(SPLITS):
            stats = [mean_std([row.get(f"{split}_acc") for run in members for row in run.results["table"]
                               if row["method"] == method]) for method in methods]
            ax.bar([i + (j - 0.5) * width for i in range(len(methods))], [m for m, _ in stats], width,
                   yerr=[s for _, s in stats], label=split, capsize=2)
            for method, (mean, std) in zip(methods, stats):
                row = next((r for r in table if r["group"] == label and r["method"] == method), None)
                if row is None:
                    row = {"group": label, "method": method, "runs": len(members)}
                    table.append(row)
                row.update({f"{split}_acc": mean, f"{split}_acc_std": std})
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{kind}: {label} ({len(members)} runs)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return {f"{kind}_methods": figure}, table


def figures_barrier(runs: list[Run]) -> tuple[dict[str, Figure], list[dict]]:
    """Loss and accuracy along the straight line between two models (vanilla and after alignment)."""
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    table = []
    for run in require(runs, "barrier", "barrier"):
        for curve in run.results["barrier"]:
            name = f"{curve['name']} [{run.folder.name}]" if len(runs) > 1 else curve["name"]
            loss_ax.plot(curve["alphas"], curve["loss"], marker=".", label=f"{name}: height {curve['height']:.3f}")
            acc_ax.plot(curve["alphas"], curve["acc"], marker=".", label=name)
            table.append({"method": name, "height": curve["height"], "acc_at_0.5": _at_half(curve)})
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy (%)")):
        ax.set_xlabel("alpha (0 = first model, 1 = second)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    figure.tight_layout()
    return {"barrier": figure}, table


def _at_half(curve: dict) -> float:
    """Accuracy at the midpoint, or at the alpha nearest to it."""
    i = min(range(len(curve["alphas"])), key=lambda k: abs(curve["alphas"][k] - 0.5))
    return curve["acc"][i]


def figures_sharpness(runs: list[Run]) -> tuple[dict[str, Figure], list[dict]]:
    """Hessian eigenvalue density (stochastic Lanczos quadrature) and loss along the top eigenvector, per model."""
    figure, (density_ax, perturb_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    table = []
    for run in require(runs, "sharpness", "sharpness"):
        for model, stats in run.results["sharpness"].items():
            name = f"{model} [{run.folder.name}]" if len(runs) > 1 else model
            density_ax.semilogy(stats["density"]["grid"], [max(v, 1e-12) for v in stats["density"]["values"]],
                                label=name)
            perturb_ax.plot(stats["perturbation"]["alphas"], stats["perturbation"]["loss"], marker=".", label=name)
            table.append({"method": name, "top_eigenvalue": stats["top_eigenvalues"][0], "trace": stats["trace"]})
    density_ax.set_xlabel("Hessian eigenvalue")
    density_ax.set_ylabel("density")
    perturb_ax.set_xlabel("step along the top eigenvector")
    perturb_ax.set_ylabel("loss")
    for ax in (density_ax, perturb_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return {"sharpness": figure}, table


# ------------------------------------------------------------------------------------------------------ multirun
def figures_multirun(runs: list[Run], metrics: list[str] | None = None) -> tuple[dict[str, Figure], list[dict]]:
    """Mean and spread over seeds of each group of a multirun, for ``metrics`` (default: every test accuracy that
    all runs report)."""
    if metrics is None:
        shared = set.intersection(*(set(run.results.get("metrics", {})) for run in runs))
        metrics = sorted(m for m in shared if is_metric_key(m) and parse_metric_key(m).column == "test_acc")
    if not metrics:
        raise UserError("kind=multirun found no test accuracy that every run reports; name some with metrics=[...]")
    groups = group_runs(runs)
    table = []
    for label, members in groups.items():
        row: dict[str, Any] = {"group": label, "runs": len(members)}
        for metric in metrics:
            row[metric], row[f"{metric}_std"] = mean_std([run.results.get("metrics", {}).get(metric) for run in members])
        table.append(row)
    figure, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * len(metrics)), 4))
    width = 0.8 / len(metrics)
    for j, metric in enumerate(metrics):
        ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(groups))], [r[metric] for r in table],
               width, yerr=[r[f"{metric}_std"] for r in table], capsize=2, label=metric)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean ± std over seeds")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return {"multirun": figure}, table


def make_figures(kind: str, runs: list[Run], *, split: str = "val",
                 metrics: list[str] | None = None) -> tuple[dict[str, Figure], list[dict]]:
    """The figures and table of one ``kind``: ema | soup | fusion | zip | barrier | sharpness | multirun."""
    makers = {
        "ema": lambda: figures_ema(runs, split),
        "soup": lambda: figures_soup(runs),
        "fusion": lambda: figures_methods(runs, "fusion"),
        "zip": lambda: figures_methods(runs, "zip"),
        "barrier": lambda: figures_barrier(runs),
        "sharpness": lambda: figures_sharpness(runs),
        "multirun": lambda: figures_multirun(runs, metrics),
    }
    if kind not in makers:
        raise UserError(f"unknown plot kind={kind!r}; choose one of {', '.join(makers)}")
    return makers[kind]()
