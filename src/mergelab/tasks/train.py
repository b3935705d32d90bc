"""train.py: train one model, tracking EMA weights alongside, with exact resume."""

from __future__ import annotations

from mergelab.errors import UserError
from mergelab.metrics import is_metric_key, metric_key, methods_in, row_from_metrics
from mergelab.runner import Context
from mergelab.training import STATE_FILE, Trainer


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    data = ctx.data()
    model = ctx.build_model(data)
    trainer = Trainer(model, data, cfg, ctx.run_dir / "checkpoints", logger=None, meta=ctx.model_meta(data))
    state = ctx.run_dir / "checkpoints" / STATE_FILE
    if state.is_file() and not cfg.resume:
        raise UserError(f"{ctx.run_dir} already holds a training run; pass resume=true to continue it "
                        "or choose another run folder")
    if cfg.resume and state.is_file():
        trainer.load_state(state)
        print(f"resumed {ctx.run_dir} at epoch {trainer.epoch}/{cfg.train.epochs}")
    trainer.logger = ctx.open_logger(purge_step=trainer.step or None)
    out = trainer.fit(on_epoch_end=ctx.on_epoch_end)
    return summarize(trainer, out)


def summarize(trainer: Trainer, out: dict) -> dict:
    """results.json content: final metrics of every averaged model, the history, and a table per model."""
    final = out["final"]
    table = [{"model": n, **row_from_metrics(final, n, ("val_acc", "test_acc", "val_loss", "test_loss"))}
             for n in methods_in(final)]
    metrics = {k: v for k, v in final.items() if is_metric_key(k)}
    metrics[metric_key("best", "val", "acc")] = out["best_val_acc"]
    if trainer.logger:
        hparams = {"lr": trainer.cfg.optimizer.lr, "epochs": trainer.cfg.train.epochs,
                   "batch_size": trainer.cfg.train.batch_size, "scheduler": trainer.cfg.scheduler._target_.split(".")[-1],
                   "model": trainer.cfg.model._target_.split(".")[-1], "seed": trainer.cfg.seed}
        trainer.logger.hparams(hparams, metrics)
    return {"task": "train", "metrics": metrics, "table": table, "history": out["history"], "steps": out["steps"]}
