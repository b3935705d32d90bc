"""fuse.py: align two or more trained models to an anchor and average them (``merge=average|permute|ot``).

Reports, on validation and test, each model alone, the prediction ensemble (mean logits), the vanilla average and the
method (each with the corrections of ``merge.correction``: ``none``, ``recompute_bn``), optionally after
retraining; the loss barrier between the anchor and the second model before and after alignment; optionally the
Hessian sharpness of the models. Parents can be pruned (and retrained) first.
"""

from __future__ import annotations

import copy
import time

import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.barrier import interpolation_curve
from mergelab.checkpoints import save_checkpoint
from mergelab.config import corrections, instantiate
from mergelab.errors import UserError
from mergelab.evaluation import evaluate, has_batchnorm, metrics_from_logits, predict, recompute_bn
from mergelab.merging.average import fusion_weights, weighted_average
from mergelab.merging.features import feature_stats
from mergelab.merging.soups import logit_ensemble
from mergelab.metrics import column, metric_key, table_metrics
from mergelab.models import check_compatible, unit_graph
from mergelab.population import check_same_architecture, load_model, resolve_checkpoints
from mergelab.pruning import apply_masks, freeze_pruned, l1_masks, prunable_weights, sparsity
from mergelab.runner import Context
from mergelab.sharpness import sharpness_report
from mergelab.training import Trainer

SPLITS = ("val", "test")


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    paths = resolve_checkpoints(cfg.models, which=cfg.checkpoint)
    if len(paths) < 2:
        raise UserError(f"fusion needs at least 2 models, models={cfg.models} matches {len(paths)}; "
                        "pass a glob matching several checkpoints or run folders")
    metas = check_same_architecture(paths)
    models = [load_model(p, ctx.device)[0] for p in paths]
    names = [f"model {i} ({p.parent.parent.name if p.parent.name == 'checkpoints' else p.stem})"
             for i, p in enumerate(paths)]
    check_compatible([m.state_dict() for m in models], names)
    graph = unit_graph(models[0])
    data = ctx.data()
    if data.num_classes != metas[0]["num_classes"]:
        raise UserError(f"{paths[0]} was trained for {metas[0]['num_classes']} classes but dataset="
                        f"{data.name} has {data.num_classes}; pick the dataset the models were trained on")
    anchor = int(cfg.anchor)
    if not 0 <= anchor < len(models):
        raise UserError(f"anchor={anchor} is not a model index; choose 0..{len(models) - 1}")
    try:
        weights = fusion_weights(cfg.weights, len(models))
    except ValueError as exc:
        raise UserError(f"weights={cfg.weights}: {exc}") from None
    merge = instantiate(cfg.merge, key="merge", exclude=["correction"])
    # REPAIR is zip.py's (merge.correction=repair there); the merge engine brings it here.
    fixes = corrections(cfg.merge.correction, ("none", "recompute_bn"))
    recompute = "recompute_bn" in fixes and has_batchnorm(models[0])

    table, extra = [], {}
    if cfg.prune.fraction > 0:
        extra["pruning"] = prune_parents(ctx, models, names, graph, data, table, metas[0])

    for name, model in zip(names, models):
        table.append(row(name, model, data, 0.0))
    table.append(ensemble_row(models, data))

    states = [m.state_dict() for m in models]
    fused_models = {}
    start = time.perf_counter()
    average = build(models[0], weighted_average(states, weights))
    table += bn_rows("average", average, data, time.perf_counter() - start, fixes, recompute)
    fused_models["average"] = average

    aligned = states
    if merge.name != "average":
        start = time.perf_counter()
        aligned = align_all(merge, graph, models, states, anchor, data, cfg.seed)
        fused = build(models[0], weighted_average(aligned, weights))
        label = method_label(merge)
        table += bn_rows(label, fused, data, time.perf_counter() - start, fixes, recompute)
        fused_models[label] = fused
    label, fused = list(fused_models.items())[-1]
    save_checkpoint(ctx.run_dir / "checkpoints" / "fused.safetensors", fused.state_dict(),
                    {**metas[0], "task": "fuse", "method": label, "parents": [str(p) for p in paths],
                     "fusion_weights": weights, "seed": ctx.seed})

    if cfg.retrain.epochs > 0:
        retrained = copy.deepcopy(fused)
        seconds = retrain(ctx, retrained, data, cfg.retrain.epochs, f"retrain_{label}", metas[0])
        table.append(row(f"{label} +retrain", retrained, data, seconds))

    other = 1 if anchor != 1 else 0
    extra["barrier"] = [
        {"name": f"{names[anchor]} - {names[other]} (vanilla)",
         **barrier(models[0], states[anchor], states[other], data, cfg.barrier, recompute)}]
    if merge.name != "average":
        extra["barrier"].append({"name": f"{names[anchor]} - {names[other]} ({method_label(merge)})",
                                 **barrier(models[0], states[anchor], aligned[other], data, cfg.barrier, recompute)})
    if cfg.sharpness.enabled:
        subjects = {names[anchor]: models[anchor], **fused_models}
        extra["sharpness"] = {name: sharpness(model, data, cfg.sharpness, ctx.seed)
                              for name, model in subjects.items()}

    metrics = table_metrics(table, columns=[column(split, m) for split in SPLITS for m in ("acc", "loss")])
    metrics.update({metric_key("barrier", None, b["name"]): b["height"] for b in extra["barrier"]})
    return {"task": "fuse", "metrics": metrics, "table": table, "models": [str(p) for p in paths],
            "fusion_weights": weights, **extra}


# ------------------------------------------------------------------------------------------------------ pieces


def method_label(merge) -> str:
    """``permute-weights``, ``ot-activations-sinkhorn``..."""
    parts = [merge.name, merge.alignment]
    if merge.name == "ot":
        parts.append(merge.options["solver"])
    return "-".join(p for p in parts if p)


def build(template: nn.Module, state: dict) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def row(method: str, model: nn.Module, data, time_s: float) -> dict:
    out = {"method": method}
    for split in SPLITS:
        out.update({f"{split}_{k}": v for k, v in evaluate(model, getattr(data, split)).items()})
    return {**out, "time_s": time_s}


def ensemble_row(models: list[nn.Module], data) -> dict:
    out = {"method": "ensemble"}
    for split in SPLITS:
        outputs = [predict(m, getattr(data, split)) for m in models]
        logits = logit_ensemble([logits for logits, _ in outputs])
        out.update({f"{split}_{k}": v for k, v in metrics_from_logits(logits, outputs[0][1]).items()})
    return {**out, "time_s": 0.0}


def bn_rows(label: str, model: nn.Module, data, time_s: float, fixes: list[str], recompute: bool) -> list[dict]:
    """The merged model as is (``none`` in ``merge.correction``), and with BatchNorm statistics recomputed on
    training data (``recompute_bn``, for models with BatchNorm; in place)."""
    rows = [row(label, model, data, time_s)] if "none" in fixes or not recompute else []
    if recompute:
        start = time.perf_counter()
        recompute_bn(model, data.train_eval)
        rows.append(row(f"{label}+recompute_bn", model, data, time_s + time.perf_counter() - start))
    return rows


def align_all(merge, graph, models, states, anchor: int, data, seed: int) -> list[dict]:
    """Every model aligned to the anchor (the anchor itself unchanged); activation features from one pass of all
    models over ``merge.num_samples`` training images."""
    stats = None
    if merge.alignment == "activations":
        stats = feature_stats(models, graph, sample_batches(data.train_eval, int(merge.num_samples)),
                              where=merge.where)
    return [state if k == anchor else merge.align(graph, states[anchor], state, stats, anchor, k)
            for k, state in enumerate(states)]


def sample_batches(batches, count: int):
    """The first ``count`` samples of a fixed-order split, as batches."""
    seen = 0
    for x, y in batches:
        if seen >= count:
            return
        take = min(len(y), count - seen)
        seen += take
        yield x[:take], y[:take]


def retrain(ctx: Context, model: nn.Module, data, epochs: int, name: str, meta: dict) -> float:
    """Fine-tune ``model`` in place with the shared Trainer for ``epochs`` (this config's optimizer, scheduler and
    train settings; no EMA), checkpoints in ``checkpoints/<name>``; returns the seconds taken."""
    cfg = OmegaConf.merge(ctx.cfg, {"train": {"epochs": epochs}})
    start = time.perf_counter()
    Trainer(model, data, cfg, ctx.run_dir / "checkpoints" / name, logger=ctx.open_logger(),
            meta={**meta, "task": "fuse"}, prefix=f"{name}/").fit()
    return time.perf_counter() - start


def prune_parents(ctx: Context, models, names, graph, data, table: list, meta: dict) -> dict:
    """L1-prune every parent in place (and retrain it with the pruned weights held at zero); rows for the parents
    before pruning go into ``table``."""
    cfg = ctx.cfg.prune
    keys = prunable_weights(graph)
    report = {"fraction": cfg.fraction, "type": cfg.type, "sparsity": {}}
    for index, (name, model) in enumerate(zip(names, models)):
        table.append(row(f"{name} unpruned", model, data, 0.0))
        masks = l1_masks(model.state_dict(), keys, cfg.fraction, cfg.type)
        apply_masks(model, masks)
        if cfg.retrain_epochs > 0:
            handles = freeze_pruned(model, masks)
            retrain(ctx, model, data, cfg.retrain_epochs, f"pruned_{index}", meta)
            for handle in handles:
                handle.remove()
        report["sparsity"][name] = sparsity(model, keys)
    return report


def barrier(template: nn.Module, state_a: dict, state_b: dict, data, cfg, recompute: bool) -> dict:
    model = copy.deepcopy(template)
    batches = getattr(data, cfg.split)

    def measure(state):
        model.load_state_dict(state)
        if recompute:
            recompute_bn(model, data.train_eval)
        return evaluate(model, batches)

    return interpolation_curve(state_a, state_b, int(cfg.points), measure)


def sharpness(model: nn.Module, data, cfg, seed: int) -> dict:
    """Hessian statistics of the training loss on the first ``cfg.num_samples`` training images."""
    batches = list(sample_batches(data.train_eval, int(cfg.num_samples)))
    return sharpness_report(model, batches, top_k=cfg.top_k, power_iters=cfg.power_iters,
                            trace_samples=cfg.trace_samples, lanczos_steps=cfg.lanczos_steps,
                            density_runs=cfg.density_runs, radius=cfg.radius, points=cfg.points, seed=seed)
