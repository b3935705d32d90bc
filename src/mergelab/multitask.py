"""Multi-task evaluation of a merged backbone, FusionBench's convention: every task keeps its own head.

A population is multi-task when its checkpoints were fine-tuned on different tasks: class subsets of one data set
(``dataset.classes``) or input domains (``dataset.domain``), as their metadata records. A merged backbone is
evaluated on every task with that task's head (taken from the task's fine-tuned checkpoint); the score that selects
hyperparameters is the mean validation accuracy over tasks. Tasks whose label sets are disjoint and that share the
plain input domain are also scored jointly: the concatenated heads' argmax over the union of their classes (the
joint accuracy of ZipIt!).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mergelab.data import Data, build_data
from mergelab.errors import UserError
from mergelab.evaluation import accuracy, has_batchnorm, predict, recompute_bn
from mergelab.merging import soups
from mergelab.merging import task_vectors as tv
from mergelab.metrics import metric_key
from mergelab.population import model_from_meta, open_population

State = dict[str, torch.Tensor]


def task_id(meta: dict) -> str:
    """What identifies a checkpoint's task: its data set, classes and domain, as recorded in its metadata."""
    dataset = meta.get("dataset") or {}
    return json.dumps({k: dataset.get(k) for k in ("name", "classes", "domain")}, sort_keys=True)


def task_name(dataset: dict, every: list[int]) -> str:
    """``0-4``, ``5-9``, ``rotated``, ``rotated 0-4``...: the domain, then the classes when they are a subset of
    ``every`` (the union of the population's classes)."""
    classes = list(dataset.get("classes") or every)
    parts = [dataset["domain"]] if dataset.get("domain") else []
    if sorted(classes) != sorted(every):
        contiguous = classes == list(range(classes[0], classes[0] + len(classes)))
        parts.append(f"{classes[0]}-{classes[-1]}" if contiguous else ",".join(map(str, classes)))
    return " ".join(parts) or "all"


@dataclass(eq=False)
class Task:
    name: str
    dataset: dict
    data: Data
    head: State  # the task's classifier tensors, from its fine-tuned checkpoint
    members: list[int]  # population indices fine-tuned on this task


class MultiTaskScorer:
    """Loads a backbone plus a task's head into one evaluation model and scores it on that task's splits."""

    def __init__(self, model: nn.Module, tasks: list[Task], joint: tuple[list[Task], Data] | None, recompute: bool,
                 device: torch.device):
        self.model, self.tasks, self.joint, self.device = model.to(device), tasks, joint, device
        self.prefix = model.classifier_name + "."
        self.recompute = recompute and has_batchnorm(model)
        self.labels = {(t.name, s): torch.cat([y for _, y in getattr(t.data, s)]) for t in tasks for s in ("val", "test")}
        self.calls = 0

    def backbone_keys(self, state_keys: list[str]) -> list[str]:
        return [k for k in state_keys if not k.startswith(self.prefix)]

    def load(self, backbone: State, task: Task, head: State | None = None) -> nn.Module:
        head = task.head if head is None else head
        rows = head[self.prefix + "weight"].shape[0]
        if self.model.get_classifier().out_features != rows:
            self.model.reset_classifier(rows)
        self.model.load_state_dict({**backbone, **head})
        if self.recompute:
            recompute_bn(self.model, task.data.train_eval)
        return self.model

    def logits(self, backbone: State, task: Task, splits: tuple[str, ...],
               head: State | None = None) -> dict[str, torch.Tensor]:
        """``{split: logits}`` of the backbone with the task's head (or ``head``); ``joint_val``/``joint_test`` are
        the joint data."""
        model = self.load(backbone, task, head)
        out = {}
        for split in splits:
            if split.startswith("joint_"):
                if self.joint and any(task is t for t in self.joint[0]):
                    out[split] = predict(model, getattr(self.joint[1], split.removeprefix("joint_")))[0]
            else:
                out[split] = predict(model, getattr(task.data, split))[0]
        return out

    def score(self, backbone: State) -> float:
        """Mean validation accuracy over tasks: what selection sees."""
        self.calls += 1
        return sum(accuracy(self.logits(backbone, t, ("val",))["val"], self.labels[(t.name, "val")])
                   for t in self.tasks) / len(self.tasks)

    def row(self, method: str, logits: Callable[[Task], dict[str, torch.Tensor]], n_ingredients: int,
            forward_passes: int, extra: dict | None = None) -> dict:
        """A table row from ``logits(task) -> {split: logits}``: per-task test accuracy, means, joint accuracy."""
        row = {"method": method, "n_ingredients": n_ingredients, "forward_passes": forward_passes}
        per_task, joint = {}, {}
        for task in self.tasks:
            got = logits(task)
            per_task[task.name] = {s: accuracy(got[s], self.labels[(task.name, s)]) for s in ("val", "test")}
            for split in ("joint_val", "joint_test"):
                if split in got:
                    joint.setdefault(split, []).append(got[split])
        for task in self.tasks:
            row[task.name] = per_task[task.name]["test"]
        row["val_acc"] = sum(v["val"] for v in per_task.values()) / len(per_task)
        row["test_acc"] = sum(v["test"] for v in per_task.values()) / len(per_task)
        if self.joint and len(joint.get("joint_test", [])) == len(self.joint[0]):
            row["test_joint_acc"] = self.joint_accuracy(joint["joint_test"], "test")
        row["per_task"] = per_task
        return {**row, **(extra or {})}

    def joint_accuracy(self, logits: list[torch.Tensor], split: str) -> float:
        """Argmax over the concatenated heads' logits, as an original label, against the true original label."""
        tasks, data = self.joint
        classes = torch.tensor([c for t in tasks for c in t.dataset["classes"]], device=logits[0].device)
        truth = torch.tensor(data.classes, device=logits[0].device)[torch.cat([y for _, y in getattr(data, split)])]
        return (classes[torch.cat(logits, 1).argmax(1)] == truth).double().mean().item() * 100


def build_tasks(population, dataset_cfg: DictConfig, seed: int, batch_size: int, device: torch.device,
                prefix: str) -> tuple[list[Task], tuple[list[Task], Data] | None]:
    """One task per distinct task of the population's metadata, with its data (same split seed as the soup) and the
    head of its first fine-tuned checkpoint; and the joint evaluation (the plain-domain tasks with pairwise disjoint
    classes, and the data of their union), or None."""
    groups: dict[str, list[int]] = {}
    for index, meta in enumerate(population.metas):
        groups.setdefault(task_id(meta), []).append(index)
    every = sorted({c for meta in population.metas for c in (meta.get("dataset") or {}).get("classes") or []})
    tasks = []
    for members in groups.values():
        meta = population.metas[members[0]]
        dataset = dict(meta.get("dataset") or {})
        if dataset.get("name") != dataset_cfg.name:
            raise UserError(f"{population.paths[members[0]]} was fine-tuned on {dataset.get('name')}, not on "
                            f"dataset={dataset_cfg.name}; pass dataset={dataset.get('name')}")
        options = OmegaConf.merge(dataset_cfg, {"classes": dataset.get("classes"), "domain": dataset.get("domain")})
        data = build_data(options, batch_size=batch_size, eval_batch_size=batch_size, seed=seed, device=device)
        state = population.state(members[0])
        head = {k: v for k, v in state.items() if k.startswith(prefix)}
        tasks.append(Task(task_name(dataset, every), dataset, data, head, members))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"two tasks of the population share the name {names}; give them distinct classes or domains")
    joint = [t for t in tasks if not t.dataset.get("domain") and t.dataset.get("classes") is not None]
    union = [c for t in joint for c in t.dataset["classes"]]
    if len(joint) < 2 or len(set(union)) != len(union):
        return tasks, None
    options = OmegaConf.merge(dataset_cfg, {"classes": union, "domain": None})
    return tasks, (joint, build_data(options, batch_size=batch_size, eval_batch_size=batch_size, seed=seed,
                                     device=device))


SPLITS = ("val", "test", "joint_val", "joint_test")
# Soup recipes that make sense without a shared head; the others need one model's validation ranking of whole models.
MULTITASK_SOUPS = ("uniform", "greedy", "ensemble")


class MultiTaskStudy:
    """soup.py on a multi-task population: references (each fine-tuned model on its task, the pretrained backbone,
    the multi-task model, the ensemble), the uniform and greedy soups of the backbones, and the task-vector methods,
    all evaluated with each task's own head."""

    def __init__(self, ctx, population, seed: int):
        self.ctx, self.cfg, self.population = ctx, ctx.cfg, population
        model = model_from_meta(population.metas[0], population.paths[0])
        tasks, joint = build_tasks(population, self.cfg.dataset, seed, int(self.cfg.eval_batch_size), ctx.device,
                                   model.classifier_name + ".")
        self.scorer = MultiTaskScorer(model, tasks, joint, bool(self.cfg.recompute_bn), ctx.device)
        self.keys = self.scorer.backbone_keys(population.keys())
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def backbone(self, index: int) -> State:
        return {k: self.population.read(index, k) for k in self.keys}

    def merged(self, backbone: State) -> Callable[[Task], dict[str, torch.Tensor]]:
        return lambda task: self.scorer.logits(backbone, task, SPLITS)

    def add(self, method: str, logits, n: int, passes: int, start: float, extra: dict | None = None) -> None:
        row = self.scorer.row(method, logits, n, passes, extra)
        row["time_s"] = time.perf_counter() - start
        self.rows.append(row)

    def run(self, recipes: dict) -> dict:
        from mergelab.tasks.soup import pretrained_member  # soup.py imports this module

        n, tasks = len(self.population), self.scorer.tasks
        start = time.perf_counter()
        self.add("fine-tuned", lambda t: self.scorer.logits(self.backbone(t.members[0]), t, SPLITS), len(tasks), 1,
                 start)
        try:
            base = pretrained_member(self.cfg, self.population, "task_arithmetic", self.keys)
        except UserError as exc:
            base = None
            self.notes.append(f"no pretrained row: {exc}")
        if base is not None:
            start = time.perf_counter()
            self.add("pretrained", self.merged({k: base.tensor(k, self.ctx.device) for k in self.keys}), 0, 1, start)
        if self.cfg.get("multitask"):
            self.multitask_reference()
        if "ensemble" in recipes:
            start = time.perf_counter()

            def ensemble(task: Task) -> dict[str, torch.Tensor]:
                each = [self.scorer.logits(self.backbone(i), task, SPLITS) for i in range(n)]
                return {s: soups.logit_ensemble([e[s] for e in each]) for s in each[0]}

            self.add("ensemble", ensemble, n, n, start)
        if "uniform" in recipes:
            start = time.perf_counter()
            state = soups.streamed_uniform_soup(self.keys, self.population.read, n)
            self.add("uniform", self.merged(state), n, 1, start)
        if "greedy" in recipes:
            start = time.perf_counter()
            scores = [self.scorer.score(self.backbone(i)) for i in range(n)]
            order = sorted(range(n), key=lambda i: (-scores[i], i))
            settings = recipes["greedy"]
            result = soups.greedy_soup(self.backbone, order, self.scorer.score, strict=bool(settings.strict),
                                       passes=int(settings.passes), max_ingredients=settings.max_ingredients)
            state = {k: v.clone() for k, v in result.state.items()}
            self.add("greedy", self.merged(state), len(result.selected), 1, start,
                     {"selected": [str(self.population.paths[i]) for i in result.selected]})
        skipped = [r for r in recipes if r not in MULTITASK_SOUPS and r not in tv.HYPERPARAMETERS]
        if skipped:
            self.notes.append(f"skipped on a multi-task population (they rank whole models on one task): {skipped}")
        for name in (m for m in tv.HYPERPARAMETERS if m in recipes):
            self.task_vector(name, recipes[name], base)
        return self.results()

    def task_vector(self, name: str, settings: DictConfig, base) -> None:
        from mergelab.tasks.soup import model_statistics, pretrained_member  # soup.py imports this module

        start = time.perf_counter()
        if name in tv.NEEDS_BASE and base is None:
            pretrained_member(self.cfg, self.population, name, self.keys)  # raises the one-line error
        stats = None
        if name in tv.NEEDS_DATA:
            stats = []
            for index, member in enumerate(self.population.members):
                task = next(t for t in self.scorer.tasks if index in t.members)
                computed = model_statistics(name, settings, member.model(self.ctx.device), task.data.train_eval)
                stats.append({k: v for k, v in computed.items() if k in set(self.keys)})
        n = len(self.population)
        if name == "slerp" and n != 2:
            raise UserError(f"merge=slerp interpolates two models; the population has {n}")
        params, state, curve = tv.select_merge(
            name, settings, self.keys, self.population.read, n, self.scorer.score,
            base=(lambda key: base.tensor(key)) if base is not None else None, stats=stats)
        self.add(name, self.merged(state), n, 1, start,
                 {"params": params, "curve": [{"params": p, "val_score": v} for p, v in curve]})

    def multitask_reference(self) -> None:
        """The model trained on every task together (finetune.py ``tasks=[...]``): one checkpoint per task, each its
        shared backbone with that task's head."""
        start = time.perf_counter()
        members = {task_id(m.meta): m for m in open_population(self.cfg.multitask, self.cfg, what="multi-task row")}
        missing = [t.name for t in self.scorer.tasks if task_id(self.population.metas[t.members[0]]) not in members]
        if missing:
            raise UserError(f"multitask={self.cfg.multitask} has no checkpoint for the tasks {missing}; point it to "
                            "the checkpoints of finetune.py tasks=[...]")

        def logits(task: Task) -> dict[str, torch.Tensor]:
            state = members[task_id(self.population.metas[task.members[0]])].state(self.ctx.device)
            head = {k: v for k, v in state.items() if k.startswith(self.scorer.prefix)}
            return self.scorer.logits({k: state[k] for k in self.keys}, task, SPLITS, head)

        self.add("multi-task model", logits, len(members), 1, start)

    def results(self) -> dict:
        metrics = {}
        for row in self.rows:
            metrics[metric_key(row["method"], "val", "acc")] = row["val_acc"]
            metrics[metric_key(row["method"], "test", "acc")] = row["test_acc"]
            for name, accs in row["per_task"].items():  # per task: <method>/<task>/test_acc
                metrics[metric_key(f"{row['method']}/{name}", "test", "acc")] = accs["test"]
            if "test_joint_acc" in row:
                metrics[metric_key(row["method"], "test", "joint_acc")] = row["test_joint_acc"]
        columns = ["method", "n_ingredients", "forward_passes", *[t.name for t in self.scorer.tasks], "val_acc",
                   "test_acc", *(["test_joint_acc"] if self.scorer.joint else []), "time_s"]
        table = [{c: row.get(c) for c in columns} for row in self.rows]
        for note in self.notes:
            print(note)
        return {"task": "soup", "multitask": True, "metrics": metrics, "table": table,
                "tasks": [{"name": t.name, "dataset": t.dataset,
                           "ingredients": [str(self.population.paths[i]) for i in t.members]}
                          for t in self.scorer.tasks],
                "methods": self.rows, "candidate_evaluations": self.scorer.calls, "notes": self.notes}
