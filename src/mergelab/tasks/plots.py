"""plots.py: figures from finished run folders (results.json and TensorBoard events), as PNG and into TensorBoard."""

from __future__ import annotations

import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from mergelab.errors import UserError
from mergelab.plotting import find_runs, make_figures
from mergelab.runner import Context


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    if OmegaConf.is_missing(cfg, "runs"):
        raise UserError("plots.py needs runs=<glob of run folders>, e.g. runs='outputs/ema-multirun/*'")
    patterns = OmegaConf.to_container(cfg.runs) if OmegaConf.is_list(cfg.runs) else str(cfg.runs)
    runs = find_runs(patterns)
    metrics = list(cfg.metrics) if cfg.get("metrics") else None
    figures, table = make_figures(cfg.kind, runs, split=cfg.split, metrics=metrics)
    logger = ctx.open_logger()
    saved = []
    for name, figure in figures.items():
        path = ctx.run_dir / f"{name}.png"
        figure.savefig(path, dpi=int(cfg.dpi), bbox_inches="tight")
        logger.writer.add_figure(f"plots/{name}", figure, close=True)
        plt.close(figure)
        saved.append(str(path))
        print(f"figure: {path}")
    return {"task": "plots", "kind": cfg.kind, "runs": [str(r.folder) for r in runs], "figures": saved,
            "metrics": {}, "table": table}
