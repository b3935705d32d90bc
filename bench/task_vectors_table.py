"""Prints docs/task_vectors.md's tables (markdown) from the run folders of bench/task_vectors_digits.sh: the first
run's per-task tables, then every run's average test accuracy side by side (one run per seed).

    python bench/task_vectors_table.py outputs/task_vectors_digits/seed0 outputs/task_vectors_digits/seed1 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"fine-tuned": "fine-tuned (each task its own model)", "pretrained": "pretrained backbone",
          "multi-task model": "multi-task model (trained on all tasks)", "ensemble": "ensemble (all models)",
          "uniform": "uniform soup", "greedy": "greedy soup", "task_arithmetic": "task arithmetic", "ties": "TIES",
          "dare": "DARE (linear)", "dare+ties": "DARE + TIES", "model_stock": "Model Stock", "slerp": "SLERP",
          "fisher": "Fisher merging", "regmean": "RegMean"}


def load(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def params(row: dict) -> str:
    chosen = row.get("params") or {}
    return ", ".join(f"{k}={v:g}" for k, v in chosen.items())


def cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def soup_table(rows: list[dict], tasks: list[str], joint: bool) -> list[str]:
    head = ["method", *tasks, "avg (test)", "avg (val)", *(["joint 0-9"] if joint else []), "chosen on val"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [LABELS.get(row["method"], row["method"]), *(cell(row.get(t)) for t in tasks), cell(row["test_acc"]),
                 cell(row["val_acc"]), *([cell(row.get("test_joint_acc"))] if joint else []), params(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def five_rows(root: Path) -> tuple[list[dict], list[str]]:
    """The five-task rows (soup.py, then DARE + TIES) and the task names of one run folder."""
    five = load(root / "soup")
    dare_ties = [dict(r, method="dare+ties") for r in load(root / "soup_dare_ties")["methods"] if r["method"] == "dare"]
    return five["methods"] + dare_ties, [t["name"] for t in five["tasks"]]


def pair_rows(root: Path) -> tuple[list[dict], list[str]]:
    """The pair's rows (soup.py, then zip.py's, minus its parent models) and the task names of one run folder."""
    pair = load(root / "soup_pair")
    tasks = [t["name"] for t in pair["tasks"]]
    rows = list(pair["methods"])
    for row in load(root / "zip_pair")["table"]:
        if row["method"].startswith("model"):
            continue
        rows.append({"method": f"zip.py: {row['method']}", tasks[0]: row["test_task0_acc"],
                     tasks[1]: row["test_task1_acc"], "test_acc": row["test_avg_task_acc"],
                     "val_acc": row["val_avg_task_acc"], "test_joint_acc": row["test_joint_acc"]})
    return rows, tasks


def seeds_table(runs: list[list[dict]], names: list[str]) -> list[str]:
    """Average test accuracy of every method in every run (one column per run folder) and their mean."""
    head = ["method", *names, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in runs[0]:
        scores = [next(r["test_acc"] for r in rows if r["method"] == row["method"]) for rows in runs]
        cells = [LABELS.get(row["method"], row["method"]), *map(cell, scores), cell(sum(scores) / len(scores))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    roots = [Path(p) for p in sys.argv[1:]] or [Path("outputs/task_vectors_digits/seed0")]
    names = [root.name for root in roots]
    five, tasks = five_rows(roots[0])
    print(f"{names[0]}: five tasks ({', '.join(tasks)}), test accuracy (%) per task with its own head:\n")
    print("\n".join(soup_table(five, tasks, True)))
    pair, pair_tasks = pair_rows(roots[0])
    print(f"\n{names[0]}: the pair {' / '.join(pair_tasks)}, soup.py and zip.py side by side, test accuracy (%):\n")
    print("\n".join(soup_table(pair, pair_tasks, True)))
    if len(roots) > 1:
        print("\nFive tasks, average test accuracy (%) per run:\n")
        print("\n".join(seeds_table([five_rows(root)[0] for root in roots], names)))
        print(f"\nThe pair {' / '.join(pair_tasks)}, average test accuracy (%) per run:\n")
        print("\n".join(seeds_table([pair_rows(root)[0] for root in roots], names)))


if __name__ == "__main__":
    main()
