"""Collect the fuse.py runs under a folder into the markdown tables of docs/fusion.md.

    python bench/fusion_table.py outputs/fusion_digits/fuse

Layout (written by bench/fusion_digits.sh): ``<root>/<setting>/<method family>/<job>/results.json``. Per setting one
table (each model, the ensemble and the vanilla average once, then every method's rows: as fused, ``+recompute_bn``,
``+retrain``) and one barrier table (test loss along the line from the anchor to model 1, vanilla and after each
alignment: the height and the lowest accuracy on the path; two-model settings only, as the path from the anchor to
model 1 does not depend on the other models). The parents' rows must agree across the runs of a
setting (they were fused from the same checkpoints), else the collector stops.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FAMILIES = ("average", "permute", "ot")


def job_number(folder: Path) -> int:
    """Hydra multirun subfolders are ``<job number>_<overrides>``."""
    return int(folder.name.split("_", 1)[0])


def load_runs(setting: Path) -> list[dict]:
    """The setting's results in sweep order: families as in FAMILIES, jobs by number."""
    runs = []
    for family in FAMILIES:
        folder = setting / family
        if folder.is_dir():
            jobs = sorted((p for p in folder.iterdir() if (p / "results.json").is_file()), key=job_number)
            runs += [json.loads((p / "results.json").read_text()) for p in jobs]
    return runs


def short_name(method: str) -> str:
    """``model 0 (0_ema.decays-+model-mlpnet+seed-0+...)`` (a multirun folder name; ``seed=0`` in folders written
    before conf/common.yaml's separators changed) -> ``model 0 (seed 0)``."""
    seed = re.search(r"\bseed[=-](\d+)", method)
    return re.sub(r"\(.*\)", f"(seed {seed.group(1)})", method) if method.startswith("model ") and seed else method


def is_baseline(method: str) -> bool:
    return method.startswith("model ") or method == "ensemble" or method.split("+")[0] == "average"


def method_table(runs: list[dict]) -> list[str]:
    baseline = [r for r in runs[0]["table"] if is_baseline(r["method"])]
    for run in runs[1:]:
        other = [r for r in run["table"] if r["method"].startswith("model ") or r["method"] == "ensemble"]
        mine = [r for r in baseline if r["method"].startswith("model ") or r["method"] == "ensemble"]
        if [(r["method"], r["test_acc"]) for r in other] != [(r["method"], r["test_acc"]) for r in mine]:
            raise SystemExit(f"runs disagree on the parents: {run['models']} vs {runs[0]['models']}")
    rows = baseline + [r for run in runs for r in run["table"] if not is_baseline(r["method"])]
    lines = ["| method | val acc | test acc | val loss | test loss | time (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {short_name(r['method'])} | {r['val_acc']:.2f} | {r['test_acc']:.2f} | {r['val_loss']:.3f} | "
              f"{r['test_loss']:.3f} | {r['time_s']:.2f} |" for r in rows]
    return lines


def barrier_table(runs: list[dict]) -> list[str]:
    curves = [runs[0]["barrier"][0]] + [b for run in runs for b in run["barrier"][1:]]
    lines = ["| path (anchor - model 1) | barrier height (test loss) | lowest test acc on the path |", "|---|---|---|"]
    for curve in curves:
        label = curve["name"].rsplit("(", 1)[-1].rstrip(")")
        lines.append(f"| {label} | {curve['height']:.3f} | {min(curve['acc']):.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding one subfolder per setting")
    args = parser.parse_args()
    for setting in sorted(p for p in args.root.iterdir() if p.is_dir()):
        runs = load_runs(setting)
        if not runs:
            continue
        print(f"### {setting.name}: {len(runs[0]['models'])} models\n")
        print("\n".join(method_table(runs)) + "\n")
        if len(runs[0]["models"]) == 2:  # with more models the anchor - model 1 path is the same as with two
            print("\n".join(barrier_table(runs)) + "\n")


if __name__ == "__main__":
    main()
