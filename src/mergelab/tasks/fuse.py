"""fuse.py: merge two or more trained models of one task with any method of the merge engine (``merge=average|
permute|ot|zipit``), any correction (``merge.correction``) and depth (``merge.stop_at``).

Reports, on validation and test, each model alone, the prediction ensemble (mean logits), the vanilla average and the
method, each with every correction listed, optionally after retraining; the loss barrier between the anchor and the
second model before and after alignment; optionally the Hessian sharpness of the models. Parents can be pruned (and
retrained) first. A partial merge (``merge.stop_at``) is scored as the mean of its tails' logits.
"""

from __future__ import annotations

import copy
import time

from omegaconf import OmegaConf
from torch import nn

from mergelab.barrier import interpolation_curve
from mergelab.checkpoints import save_checkpoint
from mergelab.config import corrections as parse_corrections
from mergelab.config import number, whole
from mergelab.errors import UserError
from mergelab.evaluation import evaluate, has_batchnorm, metrics_from_logits, predict, recompute_bn
from mergelab.merging import engine
from mergelab.merging.average import Average, fusion_weights
from mergelab.merging.soups import logit_ensemble
from mergelab.metrics import column, metric_key, table_metrics
from mergelab.models import check_compatible, unit_graph
from mergelab.models.multihead import cut_points, find_cut
from mergelab.population import check_same_architecture, open_population
from mergelab.pruning import apply_masks, freeze_pruned, l1_masks, prunable_weights, sparsity
from mergelab.runner import Context
from mergelab.sharpness import sharpness_report
from mergelab.training import Trainer

SPLITS = ("val", "test")


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    whole(cfg.retrain.epochs, "retrain.epochs", 0, "0 = no retraining")
    whole(cfg.prune.retrain_epochs, "prune.retrain_epochs", 0, "0 = no retraining")
    number(cfg.prune.fraction, "prune.fraction", lambda v: 0 <= v < 1, "in [0, 1), the fraction of weights pruned")
    members = open_population(cfg.models, cfg, which=cfg.checkpoint)
    paths = [m.path for m in members]
    if len(paths) < 2:
        raise UserError(f"fusion needs at least 2 models, models={cfg.models} matches {len(paths)}; "
                        "pass a glob matching several checkpoints or run folders")
    metas = check_same_architecture(members)
    models = [m.model(ctx.device) for m in members]
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
    method = engine.build_method(cfg.merge)
    corrections = [c for c in parse_corrections(cfg.merge.correction)
                   if c != "recompute_bn" or has_batchnorm(models[0])]  # without BatchNorm it is the identity
    cut = None if cfg.merge.stop_at is None else find_cut(cut_points(models[0], graph), cfg.merge.stop_at)
    if cut is not None and cfg.retrain.epochs > 0:
        raise UserError("retrain.epochs needs a full merge (merge.stop_at=null); a partial merge is one trunk "
                        "with a tail per model")

    table, extra = [], {}
    if cfg.prune.fraction > 0:
        extra["pruning"] = prune_parents(ctx, models, names, graph, data, table, metas[0])
    if cfg.merge.base_recompute_bn:
        for model in models:
            recompute_bn(model, data.train_eval)

    for name, model in zip(names, models):
        table.append(row(name, model, data, 0.0))
    table.append(ensemble_row(models, data))

    merges = {}  # method label -> (transforms, {row label: merged model})
    for m in [Average(), method] if method.label != "average" else [method]:
        start = time.perf_counter()
        transforms = engine.match(m, models, graph, data.train_eval, anchor=anchor, cut=cut)
        merged = engine.merge_models(models, graph, transforms, cut, weights)
        seconds = time.perf_counter() - start
        merges[m.label] = (transforms, {})
        for correction in corrections:
            start = time.perf_counter()
            corrected = engine.correct(copy.deepcopy(merged), correction, models,
                                       engine.merged_layers(models[0], graph, cut), transforms, data.train_eval,
                                       weights, graph=graph)
            label = m.label if correction == "none" else f"{m.label}+{correction}"
            table.append(row(label, engine.tail_ensemble(corrected), data, seconds + time.perf_counter() - start))
            merges[m.label][1][label] = corrected
    label, fused = list(merges[method.label][1].items())[-1]
    if cut is None:
        save_checkpoint(ctx.run_dir / "checkpoints" / "fused.safetensors", fused.state_dict(),
                        {**metas[0], "task": "fuse", "method": label,
                         "corrections": [c for c in corrections[-1:] if c != "none"],
                         "parents": [str(p) for p in paths], "fusion_weights": weights, "seed": ctx.seed})
        if cfg.retrain.epochs > 0:
            retrained = copy.deepcopy(fused)
            seconds = retrain(ctx, retrained, data, cfg.retrain.epochs, f"retrain_{label}", metas[0])
            table.append(row(f"{label}+retrain", retrained, data, seconds))

    other = 1 if anchor != 1 else 0
    states = [m.state_dict() for m in models]
    reset_bn = "recompute_bn" in corrections
    extra["barrier"] = []
    for method_label, (transforms, _) in merges.items():
        aligned = aligned_state(graph, states, transforms, other)
        if aligned is not None:
            name = "vanilla" if method_label == "average" else method_label
            extra["barrier"].append({"name": f"{names[anchor]} - {names[other]} ({name})",
                                     **barrier(models[0], states[anchor], aligned, data, cfg.barrier, reset_bn)})
    if cfg.sharpness.enabled:
        subjects = {names[anchor]: models[anchor]}
        if cut is None:  # each method's model with its last correction
            subjects.update(list(rows.items())[-1] for _, rows in merges.values())
        extra["sharpness"] = {name: sharpness(model, data, cfg.sharpness, ctx.seed)
                              for name, model in subjects.items()}

    metrics = table_metrics(table, columns=[column(split, m) for split in SPLITS for m in ("acc", "loss")])
    metrics.update({metric_key("barrier", None, b["name"]): b["height"] for b in extra["barrier"]})
    return {"task": "fuse", "metrics": metrics, "table": table, "models": [str(p) for p in paths],
            "fusion_weights": weights, **extra}


# ------------------------------------------------------------------------------------------------------ pieces


def aligned_state(graph, states, transforms, other: int) -> dict | None:
    """Model ``other`` alone carried onto the merged units (its fusion weight 1, the others' 0): B aligned to the
    anchor, computing B's function, when every merged unit has a member of B (alignments: identity, permutations,
    transport plans); ``None`` for merges that are not alignments (ZipIt!'s within-model merges)."""
    onehot = [float(k == other) for k in range(len(states))]
    for transform in transforms.values():
        mass = transform.mass(onehot)
        if mass is not None and not bool((mass > 0).all()):
            return None
    return engine.merge_states(graph, states, transforms, onehot)


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


def barrier(template: nn.Module, state_a: dict, state_b: dict, data, cfg, reset_bn: bool) -> dict:
    model = copy.deepcopy(template)
    batches = getattr(data, cfg.split)

    def measure(state):
        model.load_state_dict(state)
        if reset_bn:
            recompute_bn(model, data.train_eval)
        return evaluate(model, batches)

    return interpolation_curve(state_a, state_b, int(cfg.points), measure)


def sharpness(model: nn.Module, data, cfg, seed: int) -> dict:
    """Hessian statistics of the training loss on the first ``cfg.num_samples`` training images."""
    batches = list(engine.take(data.train_eval, int(cfg.num_samples)))
    return sharpness_report(model, batches, top_k=cfg.top_k, power_iters=cfg.power_iters,
                            trace_samples=cfg.trace_samples, lanczos_steps=cfg.lanczos_steps,
                            density_runs=cfg.density_runs, radius=cfg.radius, points=cfg.points, seed=seed)
