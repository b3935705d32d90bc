"""Prints docs/task_vectors.md's tables (markdown) from the run folders of bench/task_vectors_digits.sh.

    python bench/task_vectors_table.py outputs/task_vectors_digits
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


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/task_vectors_digits")
    five = load(root / "soup")
    dare_ties = [dict(r, method="dare+ties") for r in load(root / "soup_dare_ties")["methods"] if r["method"] == "dare"]
    tasks = [t["name"] for t in five["tasks"]]
    print(f"Five tasks ({', '.join(tasks)}), test accuracy (%) per task with its own head:\n")
    print("\n".join(soup_table(five["methods"] + dare_ties, tasks, True)))
    pair = load(root / "soup_pair")
    zipped = load(root / "zip_pair")
    pair_tasks = [t["name"] for t in pair["tasks"]]
    print(f"\nThe pair {' / '.join(pair_tasks)}: soup.py and zip.py side by side, test accuracy (%):\n")
    rows = list(pair["methods"])
    for row in zipped["table"]:
        if row["method"].startswith("model"):
            continue
        rows.append({"method": f"zip.py: {row['method']}", pair_tasks[0]: row["test_task0_acc"],
                     pair_tasks[1]: row["test_task1_acc"], "test_acc": row["test_avg_task_acc"],
                     "val_acc": row["val_avg_task_acc"], "test_joint_acc": row["test_joint_acc"]})
    print("\n".join(soup_table(rows, pair_tasks, True)))


if __name__ == "__main__":
    main()
