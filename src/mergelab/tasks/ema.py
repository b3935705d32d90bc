"""ema.py: the EMA study in one run per setting.

The study (Adda, Mizrahi & Yüksel, "Studying weight averaging") trains one model per EMA decay; here one training
run tracks every decay at once (one fused update, :class:`mergelab.ema.EMA`) plus a uniform tail average as the
SWA-style baseline, and evaluates all of them after every epoch. With BatchNorm and ``ema.recompute_bn=true`` each
average is evaluated twice: with its averaged running statistics and with statistics recomputed for its weights.
"""

from __future__ import annotations

from mergelab.metrics import metric_key, methods_in, parse_column, row_from_metrics
from mergelab.runner import Context
from mergelab.tasks import train

METRICS = ("val_acc", "test_acc")
BN_SUFFIX = "+recompute_bn"


def run(ctx: Context) -> dict:
    results = train.run(ctx)
    final = results["history"][-1] if results["history"] else {}
    results["task"] = "ema"
    results["table"] = study_table(final)
    results["metrics"].update(best_ema(final))
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
