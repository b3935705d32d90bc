"""Collect the runs of bench/graph_digits.sh into the markdown tables of docs/graphs.md.

    python bench/graph_table.py outputs/graph_digits

Per architecture: one fusion table (each model, the ensemble, the plain average, then permutation matching and OT
fusion by weights and by activations; test accuracy as fused and with BatchNorm statistics recomputed) from
``<root>/fuse/<arch>/<family>/<job>/results.json``, and one ZipIt! table (joint accuracy over the ten digits of
the task models on 0-4 / 5-9) from ``<root>/zip/<arch>/results.json`` where it exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fusion_rows(folder: Path) -> list[dict]:
    rows, seen = [], set()
    for results in sorted(folder.glob("*/*/results.json")):
        for row in json.loads(results.read_text())["table"]:
            if row["method"] not in seen:
                seen.add(row["method"])
                rows.append(row)
    return rows


def fusion_table(rows: list[dict]) -> list[str]:
    lines = ["| method | test acc | +recompute BN | time (s) |", "|---|---|---|---|"]
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        if row["method"].endswith("+recompute_bn"):
            continue
        reset = by_name.get(f"{row['method']}+recompute_bn")
        name = row["method"].split(" (")[0] if row["method"].startswith("model ") else row["method"]
        lines.append(f"| {name} | {row['test_acc']:.2f} | {reset['test_acc']:.2f} |" if reset else
                     f"| {name} | {row['test_acc']:.2f} | |")
        lines[-1] += f" {row['time_s']:.2f} |"
    return lines


def zip_table(results: dict) -> list[str]:
    lines = ["| method | joint test acc | task test acc (avg) |", "|---|---|---|"]
    for row in results["table"]:
        joint = row["test_joint_acc"]
        task = row.get("test_avg_task_acc")
        lines.append(f"| {row['method']} | {joint:.2f} | {task:.2f} |" if task is not None else
                     f"| {row['method']} | {joint:.2f} | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    root = parser.parse_args().root
    for arch in sorted(p.name for p in (root / "fuse").iterdir() if p.is_dir()):
        print(f"\n### {arch}: two models from different seeds, all ten digits\n")
        print("\n".join(fusion_table(fusion_rows(root / "fuse" / arch))))
        zipped = root / "zip" / arch / "results.json"
        if zipped.is_file():
            print(f"\n### {arch}: ZipIt! of digits 0-4 and 5-9\n")
            print("\n".join(zip_table(json.loads(zipped.read_text()))))


if __name__ == "__main__":
    main()
