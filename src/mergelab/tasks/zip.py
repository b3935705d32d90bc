"""zip.py: merge models trained on disjoint tasks (ZipIt!, Stoica et al. 2024, by default) and compare methods.

Every model was trained on its own class subset (``train.py dataset.classes=[...]``). The table has each model alone,
the ensemble of all, the baselines (weight average; permutation matching by activation correlations) and the
method of ``merge=`` (ZipIt! unless told otherwise) at every depth of ``merge.stop_at`` (null: everything but the
task heads), each merge with every correction of ``merge.correction``. Every row is a trunk shared by all tasks
plus one head per task (:class:`~mergelab.models.multihead.MultiHead`), scored on the joint task (labels from the
union of the classes) two ways: ``joint_acc``, the argmax over all heads' logits, and ``joint_softmax_acc``, the
argmax over each head's softmax (the ZipIt! code's evaluator); on each task with its own head, and their average;
on validation and test, with its parameters and multiply-accumulates per input.

Validation and test data are each task's own splits, built with the seed its model was trained with, so no
validation image was seen in training by the model whose classes it belongs to. The merge data (features,
``recompute_bn``, REPAIR, ``merge.base_recompute_bn``) is every task's training data, taken in turn.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from mergelab.data import Data, build_data
from mergelab.config import corrections as parse_corrections
from mergelab.errors import UserError
from mergelab.evaluation import has_batchnorm, recompute_bn
from mergelab.flops import count_macs, count_params
from mergelab.merging import engine
from mergelab.merging.align import Permute
from mergelab.merging.average import Average
from mergelab.metrics import table_metrics
from mergelab.models import unit_graph
from mergelab.models.graph import _model_names
from mergelab.models.multihead import Cut, MultiHead, cut_points, find_cut
from mergelab.population import architecture, load_model, open_population
from mergelab.runner import Context

SPLITS = ("val", "test")
BASELINES = ("models", "ensemble", "average", "permute")


@dataclass
class Task:
    """One model's task: its original class labels (head output ``k`` is class ``classes[k]``) and its data."""

    classes: list[int]
    data: Data


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    paths, metas = population(cfg)
    models = [load_model(p, ctx.device, cfg)[0].eval() for p in paths]
    graph = unit_graph(models[0])
    cuts = cut_points(models[0], graph)
    if cfg.list_layers:
        return {"task": "zip", "metrics": {}, "table": cut_table(cuts, graph)}
    method = engine.build_method(cfg.merge)
    depths = [find_cut(cuts, stop_at) for stop_at in engine.listed(cfg.merge.stop_at)]
    corrections = parse_corrections(cfg.merge.correction)
    baselines = checked(cfg.zip.baselines, BASELINES, "zip.baselines")
    tasks = [Task(meta_classes(meta), task_data(ctx, meta_classes(meta), meta["seed"])) for meta in metas]
    merge_data = RoundRobin([task.data.train_eval for task in tasks])
    example = next(iter(tasks[0].data.test))[0]
    if cfg.merge.base_recompute_bn:  # the ZipIt! code's protocol: every base model's statistics on the merge data
        for model in models:
            recompute_bn(model, merge_data)

    def score(label: str, model: nn.Module, covered: list[int], cut: Cut | None = None) -> dict:
        return evaluate_row(label, model, covered, tasks, example, cut)

    table = []
    names = _model_names(len(models))
    if "models" in baselines:
        table += [score(name, MultiHead(nn.Identity(), [m]), [i]) for i, (name, m) in enumerate(zip(names, models))]
    if "ensemble" in baselines:
        table.append(score("ensemble", MultiHead(nn.Identity(), models), list(range(len(models)))))
    merges = [(m, cuts[-1], m.label) for m in (Average(), Permute("activations", num_samples=method.num_samples))
              if m.name in baselines]
    # The first depth is the method's row (an Optuna objective names it whatever stop_at is), the others @depth.
    merges += [(method, cut, method.label if k == 0 else f"{method.label}@{cut.depth}") for k, cut in enumerate(depths)]
    cache, timing, merged_features = {}, {}, {}
    for m, cut, label in merges:
        start = time.perf_counter()
        transforms = engine.match(m, models, graph, merge_data, cut=cut, cache=cache)
        timing[label] = time.perf_counter() - start
        merged = engine.merge_models(models, graph, transforms, cut)
        layers = engine.merged_layers(models[0], graph, cut)
        # Without BatchNorm, recomputing its statistics is the identity: no row for it.
        for correction in (c for c in corrections if c != "recompute_bn" or has_batchnorm(merged)):
            corrected = engine.correct(copy.deepcopy(merged), correction, models, layers, transforms, merge_data,
                                       graph=graph)
            table.append(score(label if correction == "none" else f"{label}+{correction}", corrected,
                               list(range(len(models))), cut))
        if m is method and cut == depths[0]:
            merged_features = {g: t.sizes.tolist() for g, t in transforms.items() if isinstance(t, engine.Zip)}

    metrics = table_metrics(table, skip=["depth"])
    logger = ctx.open_logger()
    logger.scalars("", metrics, step=0)
    logger.hparams({**{k: v for k, v in OmegaConf.to_container(cfg.merge).items()
                       if isinstance(v, (int, float, str, bool))},
                    "stop_at": str(cfg.merge.stop_at), "arch": models[0].arch, "num_models": len(models)}, metrics)
    return {"task": "zip", "metrics": metrics, "table": table,
            "models": [str(p) for p in paths], "tasks": [task.classes for task in tasks],
            "cuts": cut_table(cuts, graph), "match_time_s": timing, "merged_features": merged_features}


# ------------------------------------------------------------------------------------------------- inputs


def population(cfg) -> tuple[list[Path], list[dict]]:
    """The checkpoints and their metadata, refusing what cannot be zipped: fewer than two models, other model
    families or configs, another data set, heads that do not match their classes, tasks that overlap."""
    members = open_population(cfg.models, cfg, which=cfg.checkpoint)
    paths = [m.path for m in members]
    if len(paths) < 2:
        raise UserError(f"zip.py needs at least 2 task models, models={cfg.models} matches {len(paths)}; "
                        "pass a glob matching one checkpoint or run folder per task")
    metas = [m.meta for m in members]
    reference = {**architecture(metas[0]), "num_classes": None}
    for path, meta in zip(paths, metas):
        if {**architecture(meta), "num_classes": None} != reference:
            raise UserError(f"cannot zip {path}: its model {meta.get('model')} differs from {paths[0]}'s "
                            f"{metas[0].get('model')}; ZipIt! merges models of one architecture")
        trained_on = meta.get("dataset", {}).get("name")
        if trained_on != cfg.dataset.name:
            raise UserError(f"{path} was trained on {trained_on}, not on dataset={cfg.dataset.name}; "
                            f"pass dataset={trained_on}")
        if len(meta_classes(meta)) != meta["num_classes"]:
            raise UserError(f"{path}: its head has {meta['num_classes']} outputs but its task has classes "
                            f"{meta_classes(meta)}; the checkpoint metadata is inconsistent, retrain the model")
    for (pa, ma), (pb, mb) in itertools.combinations(zip(paths, metas), 2):
        shared = sorted(set(meta_classes(ma)) & set(meta_classes(mb)))
        if shared:
            raise UserError(f"tasks overlap: {pa} and {pb} both have classes {shared}; ZipIt! zips models of "
                            "disjoint tasks (train each with its own dataset.classes=[...])")
    return paths, metas


def meta_classes(meta: dict) -> list[int]:
    """The original labels a checkpoint's head predicts, in head order (all classes when trained on all)."""
    classes = meta.get("dataset", {}).get("classes")
    return list(classes) if classes is not None else list(range(meta["num_classes"]))


def task_data(ctx: Context, classes: list[int], seed: int) -> Data:
    """The data set restricted to ``classes`` with the train/val split of the seed the task's model used."""
    dataset = OmegaConf.merge(ctx.cfg.dataset, {"classes": classes})
    return build_data(dataset, batch_size=ctx.cfg.train.batch_size, eval_batch_size=ctx.cfg.train.eval_batch_size,
                      seed=seed, device=ctx.device)


def checked(values, allowed: tuple[str, ...], key: str) -> list[str]:
    values = list(values)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise UserError(f"{key}={values}: {unknown} unknown; choose from {list(allowed)}")
    return values


class RoundRobin:
    """Batches taken from each iterable in turn (task A, task B, task A...), until all are spent: training data
    of every task for the features, BatchNorm statistics and REPAIR (``merge.num_samples`` cuts the features')."""

    def __init__(self, sources):
        self.sources = sources

    def __iter__(self):
        for batch_group in itertools.zip_longest(*self.sources):
            yield from (batch for batch in batch_group if batch is not None)


def cut_table(cuts: list[Cut], graph) -> list[dict]:
    """Where the models can be cut (the values ``merge.stop_at`` takes)."""
    return [{"depth": cut.label, "stop_at": cut.depth, "hook": cut.hook, "group": cut.group,
             "units": graph.groups[cut.group], "layers": " ".join(cut.layers)} for cut in cuts]


# ------------------------------------------------------------------------------------------------- evaluation


def evaluate_row(method: str, model: MultiHead, covered: list[int], tasks: list[Task], example: torch.Tensor,
                 cut: Cut | None) -> dict:
    """One table row: size, cost and accuracies on both splits (see :func:`split_accuracies`)."""
    row = {"method": method, "depth": cut.label if cut else None,
           "params": count_params(model), "macs": count_macs(model, example)}
    for split in SPLITS:
        row.update(split_accuracies(model, covered, tasks, split))
    return row


@torch.no_grad()
def split_accuracies(model: MultiHead, covered: list[int], tasks: list[Task], split: str) -> dict:
    """Accuracy (%) on every task's ``split``: joint (argmax over the concatenated logits of the heads, which
    cover tasks ``covered``, against the original label), joint by per-task softmax (argmax over each head's
    softmax probabilities, concatenated: the ZipIt! code's ``evaluate_logits_alltasks``, which puts the heads on
    one scale), per task with its own head (None for a task no head covers), and the average over tasks."""
    model.eval()
    device = next(model.parameters()).device
    joint_classes = torch.tensor([c for t in covered for c in tasks[t].classes], device=device)
    joint_correct, softmax_correct, joint_total, per_task = 0, 0, 0, {}
    for t, task in enumerate(tasks):
        original = torch.tensor(task.classes, device=device)
        correct_t, total_t = 0, 0
        for x, y in getattr(task.data, split):
            outputs = model.forward_tasks(x)
            joint_correct += int((joint_classes[torch.cat(outputs, 1).argmax(1)] == original[y]).sum())
            probabilities = torch.cat([o.float().softmax(1) for o in outputs], 1)
            softmax_correct += int((joint_classes[probabilities.argmax(1)] == original[y]).sum())
            if t in covered:
                correct_t += int((outputs[covered.index(t)].argmax(1) == y).sum())
            total_t += len(y)
        joint_total += total_t
        per_task[t] = 100.0 * correct_t / total_t if t in covered else None
    scores = [v for v in per_task.values() if v is not None]
    return {f"{split}_joint_acc": 100.0 * joint_correct / joint_total,
            f"{split}_joint_softmax_acc": 100.0 * softmax_correct / joint_total,
            **{f"{split}_task{t}_acc": v for t, v in per_task.items()},
            f"{split}_avg_task_acc": sum(scores) / len(scores) if len(scores) == len(tasks) else None}
