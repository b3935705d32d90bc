"""Metric keys, built and parsed here only.

A metric key names one number of a run: ``<method>/<split>_<name>`` (``raw/val_acc``, ``ema0.999+recompute_bn/
test_loss``, ``zipit+repair/val_joint_acc``) or, for a number that belongs to no split, ``<method>/<name>``
(``zipit/params``, ``best_ema/decay``). The part after the last ``/`` is a table column (``val_acc``), so a row of
a printed table and the metrics of ``results.json`` convert into each other. The same keys are the TensorBoard tags,
the sweepers' ``objective`` and what plots and tuning read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MetricKey:
    method: str         # the model or row: raw, ema0.999, average+recompute_bn, zipit@7+repair, best_ema...
    split: str | None   # train | val | test, or None for numbers of no split (params, macs, decay)
    name: str           # acc, loss, joint_acc, task0_acc, params...

    @property
    def column(self) -> str:
        return column(self.split, self.name)


def column(split: str | None, name: str) -> str:
    """A table column: ``val_acc``; ``params`` without a split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return f"{split}_{name}" if split else name


def parse_column(text: str) -> tuple[str | None, str]:
    """``val_acc`` -> ``("val", "acc")``; ``params`` -> ``(None, "params")``."""
    split, sep, name = text.partition("_")
    return (split, name) if sep and split in SPLITS and name else (None, text)


def metric_key(method: str, split: str | None, name: str) -> str:
    """``metric_key("raw", "val", "acc") == "raw/val_acc"``; ``metric_key("zipit", None, "params") ==
    "zipit/params"``."""
    if not method or not name:
        raise ValueError(f"a metric key needs a method and a name, got {method!r}, {name!r}")
    return f"{method}/{column(split, name)}"


def parse_metric_key(key: str) -> MetricKey:
    """The inverse of :func:`metric_key` (methods may hold ``/``: the column is after the last one)."""
    method, sep, rest = key.rpartition("/")
    if not sep or not method or not rest:
        raise ValueError(f"{key!r} is not a metric key <method>/<split>_<name>, e.g. raw/val_acc")
    return MetricKey(method, *parse_column(rest))


def is_metric_key(key: str) -> bool:
    return "/" in key


def methods_in(keys: Iterable[str], split: str | None = None, name: str | None = None) -> list[str]:
    """The methods of ``keys`` in first-seen order (those with a key of this split and name, when given)."""
    found = (parse_metric_key(k) for k in keys if is_metric_key(k))
    return list(dict.fromkeys(k.method for k in found
                              if (split is None or k.split == split) and (name is None or k.name == name)))


def table_metrics(rows: Iterable[Mapping[str, Any]], *, label: str = "method", columns: Iterable[str] | None = None,
                  skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{metric_key(row[label], split, name): value}`` for each row's columns (only ``columns`` when given, never
    those in ``skip``), leaving out empty (None) cells."""
    wanted, skip = (set(columns) if columns is not None else None), {label, *skip}
    return {metric_key(row[label], *parse_column(col)): value for row in rows for col, value in row.items()
            if col not in skip and (wanted is None or col in wanted) and value is not None}


def row_from_metrics(metrics: Mapping[str, Any], method: str, columns: Iterable[str]) -> dict[str, Any]:
    """The table cells of ``method``: ``{column: metrics[<method>/<column>]}`` (None where absent)."""
    return {col: metrics.get(metric_key(method, *parse_column(col))) for col in columns}
