"""What a run leaves behind: TensorBoard events, ``results.json`` and the printed table.

(Named ``reporting`` rather than ``logging`` so it never shadows the standard library module.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """A thin TensorBoard writer for one run folder.

    ``purge_step`` drops events at or after that step that an interrupted run had written, so a resumed run's
    curves continue without duplicates.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}" if prefix else name, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record a run's hyperparameters with its final metrics, for TensorBoard's HParams tab."""
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        finite = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.writer.add_hparams(plain, finite, run_name=".")

    def close(self) -> None:
        self.writer.close()


def format_table(rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A plain-text table: one row per dict, columns in first-seen order, floats with two decimals."""
    if not rows:
        return ""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = list(columns)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "-" if v is None else str(v)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in body)])
