"""soup.py: every model-soup recipe over one population of checkpoints, with its baselines, in one table.

Reading files, caching, devices and logging live here; the mathematics is :mod:`mergelab.merging.soups`.
Selection (greedy order and acceptance, pruning, WiSE-FT's alpha, the best ingredient) sees only the validation
split, through :class:`Scorer.score`; test accuracy is measured afterwards for the table.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import f1_score
from torch import nn

from mergelab.checkpoints import load_checkpoint, save_checkpoint
from mergelab.data import build_data
from mergelab.errors import UserError
from mergelab.evaluation import accuracy, has_batchnorm, predict, recompute_bn
from mergelab.merging import soups
from mergelab.merging import task_vectors as tv
from mergelab.metrics import metric_key
from mergelab.population import Member, architecture, check_same_architecture, model_from_meta, open_member, \
    open_population
from mergelab.runner import Context
from mergelab.tasks.finetune import BATCH_OPTIONS, split_seed

SOUPS = ("uniform", "greedy", "greedy_random", "pruned", "wiseft", "ensemble")
RECIPES = (*SOUPS, *tv.HYPERPARAMETERS)  # soups and their baselines, then the task-vector methods
METRICS = ("acc", "f1", "neg_loss")
# Keys of an ingredient's metadata that describe its own training run, not the soup's architecture.
RUN_KEYS = ("hparams", "metrics", "epoch", "step", "index", "history", "ema_decay")


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    recipes = soup_recipes(cfg)
    if not isinstance(cfg.recompute_bn, bool):
        raise UserError(f"recompute_bn={cfg.recompute_bn} is not one of true, false")
    _check_choice("metric", cfg.metric, METRICS)
    votes = predictions_vote(ctx) if cfg.predict.vote else None
    if not cfg.ingredients:
        if votes:
            return votes
        raise UserError("no ingredients: pass ingredients='<glob of checkpoints or run folders>'")
    population = Population.open(cfg)
    seed = population.data_seed(cfg)
    if population.multitask:
        from mergelab.multitask import MultiTaskStudy

        return MultiTaskStudy(ctx, population, seed).run(recipes)
    data = build_data(cfg.dataset, batch_size=int(cfg.eval_batch_size), eval_batch_size=int(cfg.eval_batch_size),
                      seed=seed, device=ctx.device)
    population.check_dataset(data)
    scorer = Scorer(model_from_meta(population.metas[0], population.paths[0]).to(ctx.device), data,
                    bool(cfg.recompute_bn), cfg.metric, ctx.device)
    study = Study(ctx, population, scorer, split_seed(cfg.dataset, seed))
    study.individuals(cache_dir(ctx))
    study.best()
    for name in ("uniform", "greedy", "greedy_random", "pruned", "wiseft"):
        if name in recipes:
            getattr(study, name)(recipes[name])
    for name in tv.HYPERPARAMETERS:
        if name in recipes:
            study.task_vector(name, recipes[name])
    if "ensemble" in recipes:
        study.ensembles(recipes["ensemble"])
    if cfg.predict.folder:
        study.predict_folder(Path(cfg.predict.folder), list(cfg.predict.methods))
    results = study.results()
    if votes:
        results["vote_csv"] = votes["vote_csv"]
    return results


# -------------------------------------------------------------------------------------------------- configuration
def soup_recipes(cfg: DictConfig) -> dict[str, DictConfig]:
    """``cfg.merge`` as ``{recipe: settings}``; anything that is not a soup recipe is refused by name."""
    merge = cfg.get("merge") or {}
    foreign = [k for k, v in merge.items() if k not in RECIPES or not isinstance(v, DictConfig) or v.get("recipe") != k]
    if foreign:
        raise UserError(f"merge={_merge_choice(merge, foreign)} is not a soup recipe; soup.py runs "
                        f"{', '.join(RECIPES)} (e.g. merge=[greedy,pruned]); fuse.py and zip.py take the others")
    return dict(merge.items())


def _merge_choice(merge: DictConfig, foreign: list) -> str:
    """The name the user picked: Hydra's recorded choice, else the foreign config's class, else its keys."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("merge")
        if choice:
            return str(choice)
    if "_target_" in merge:
        return str(merge["_target_"]).rsplit(".", 1)[-1]
    return ",".join(map(str, foreign))


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value} is not one of {', '.join(allowed)}")


# ------------------------------------------------------------------------------------------------------ population
@dataclass
class Population:
    """The ingredients (:func:`mergelab.population.open_population`: mergelab's or foreign checkpoints), and their
    states, each read from disk once when ``keep_in_memory`` (the default), else re-read lazily one at a time;
    :meth:`read` gives one tensor, from memory or straight from the file, for streaming merges."""

    members: list[Member]
    keep_in_memory: bool
    _states: dict[int, dict] = field(default_factory=dict)
    reads: int = 0

    @classmethod
    def open(cls, cfg: DictConfig) -> "Population":
        members = open_population(cfg.ingredients, cfg, which=cfg.which, minimum=2, what="soup")
        population = cls(members, bool(cfg.keep_in_memory))
        if population.multitask:
            # Every task keeps its own head: only the backbone must agree.
            reference = {**architecture(members[0].meta), "num_classes": None}
            for member in members[1:]:
                if {**architecture(member.meta), "num_classes": None} != reference:
                    raise UserError(f"cannot merge {member.path}: its model {member.meta.get('model')} differs from "
                                    f"{members[0].path}'s {members[0].meta.get('model')}")
        else:
            check_same_architecture(members)
        return population

    @property
    def paths(self) -> list[Path]:
        return [m.path for m in self.members]

    @property
    def metas(self) -> list[dict]:
        return [m.meta for m in self.members]

    @property
    def multitask(self) -> bool:
        """Fine-tuned on different tasks (classes or input domains), as the checkpoints' metadata records."""
        from mergelab.multitask import task_id

        return len({task_id(m) for m in self.metas}) > 1

    def keys(self) -> list[str]:
        return self.members[0].keys()

    def read(self, index: int, key: str) -> torch.Tensor:
        """Tensor ``key`` of ingredient ``index``: from memory when held, else read from its file now."""
        if index in self._states:
            return self._states[index][key]
        return self.members[index].tensor(key)

    def data_seed(self, cfg: DictConfig) -> int:
        """The run seed to build the soup's data with, after checking that the soup's validation split is the one
        every ingredient held out: selecting on samples an ingredient trained on would favour it unfairly.

        With ``dataset.split_seed`` set (the default) the split is fixed whatever the run seed; ingredients that
        record their split (finetune.py) must agree with it. With ``split_seed=null`` the split follows the run
        seed, so all ingredients must share theirs and the soup uses it.
        """
        fixed = cfg.dataset.get("split_seed")
        first = self.metas[0]
        mine = int(fixed) if fixed is not None else int(first.get("split_seed", first.get("seed", 0)))
        for path, meta in zip(self.paths, self.metas):
            theirs = meta.get("split_seed", int(meta.get("seed", 0)) if fixed is None else mine)
            if theirs != mine:
                raise UserError(f"{path} held out the validation split of seed {theirs} but the soup selects on the "
                                f"split of seed {mine} (from {self.paths[0]} or dataset.split_seed): its validation "
                                "splits differ, so selection would score models on their own training data; train "
                                "the population with one dataset.split_seed and set the same here")
        return int(cfg.seed) if fixed is not None else mine

    def check_dataset(self, data) -> None:
        """The soup's data set must be the one the ingredients were trained on (same name, same classes)."""
        mine = {"name": data.name, "classes": list(data.classes), **({"domain": data.domain} if data.domain else {})}
        for path, meta in zip(self.paths, self.metas):
            theirs = meta.get("dataset")
            if theirs is not None and theirs != mine:
                raise UserError(f"{path} was trained on {theirs} but the soup evaluates on {mine}; set dataset=... "
                                "(and dataset.classes) to the ingredients' data set")

    def __len__(self) -> int:
        return len(self.paths)

    def state(self, index: int) -> dict[str, torch.Tensor]:
        if index in self._states:
            return self._states[index]
        state = self.members[index].state()
        self.reads += 1
        if self.keep_in_memory:
            self._states[index] = state
        return state

    def states(self, indices: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Ingredients one at a time (a generator, so a streaming soup holds at most one that is not cached)."""
        for index in range(len(self)) if indices is None else indices:
            yield self.state(index)

    def soup_meta(self) -> dict:
        """Metadata for a soup checkpoint: the ingredients' architecture and data, without their own run details."""
        return {k: v for k, v in self.metas[0].items() if k not in RUN_KEYS}


def cache_dir(ctx: Context) -> Path:
    """Where individual evaluations are cached: ``cache=<folder>`` (shareable between runs) or the run folder."""
    return Path(ctx.cfg.cache) if ctx.cfg.cache else ctx.run_dir / "cache"


# ---------------------------------------------------------------------------------------------------------- scoring
def selection_score(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """Higher is better: accuracy (%), macro-F1 (%) or the negative mean cross-entropy."""
    if metric == "acc":
        return accuracy(logits, labels)
    if metric == "f1":
        return float(f1_score(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), average="macro") * 100)
    return -F.cross_entropy(logits.float(), labels).item()


class Scorer:
    """One evaluation model: loads a state, recomputes BatchNorm statistics for averaged states when ``recompute_bn``
    (the fix of the ModelSoup study; averaged running statistics do not describe the averaged network), and scores
    it on the validation split. :meth:`score` is the only thing selection ever calls."""

    def __init__(self, model: nn.Module, data, recompute: bool, metric: str, device: torch.device):
        self.model, self.data, self.metric, self.device = model, data, metric, device
        self.recompute_bn = recompute and has_batchnorm(model)
        self.loaded: Any = None
        self.val_labels = torch.cat([y for _, y in data.val])
        self.test_labels = torch.cat([y for _, y in data.test])
        self.calls = 0

    def load(self, state, averaged: bool = True) -> None:
        # A greedy step scores a candidate and, if accepted, reports it: skip the second load and recomputation.
        if self.loaded is not None and self.loaded[0] is state and self.loaded[1] == averaged:
            return
        self.model.load_state_dict(state)
        if averaged and self.recompute_bn:
            recompute_bn(self.model, self.data.train_eval)
        self.loaded = (state, averaged)

    def score(self, state) -> float:
        """The validation score of ``state`` (an averaged candidate)."""
        self.load(state)
        self.calls += 1
        return selection_score(predict(self.model, self.data.val)[0], self.val_labels, self.metric)

    def logits(self, state, averaged: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation and test logits of ``state``, for the table (after selection is over)."""
        self.load(state, averaged)
        return predict(self.model, self.data.val)[0], predict(self.model, self.data.test)[0]


# ------------------------------------------------------------------------------------------------------- the study
@dataclass
class Method:
    method: str
    selected: list[int]
    forward_passes: int
    val_acc: float
    test_acc: float
    time_s: float
    val_score: float
    extra: dict = field(default_factory=dict)


class Study:
    """Runs the recipes in order on one population and collects rows, curves and soup checkpoints."""

    def __init__(self, ctx: Context, population: Population, scorer: Scorer, split: int):
        self.ctx, self.cfg, self.population, self.scorer, self.split = ctx, ctx.cfg, population, scorer, split
        self.logger = ctx.open_logger()
        self.methods: dict[str, Method] = {}
        self.states: dict[str, dict] = {}  # weight-space soups, for WiSE-FT and predictions
        self.val_logits: list[torch.Tensor] = []
        self.test_logits: list[torch.Tensor] = []
        self.greedy_curve: list[dict] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ individual ingredients
    def individuals(self, folder: Path) -> None:
        """Every ingredient alone, on its own BatchNorm statistics; logits cached in ``folder`` by file identity."""
        for index, path in enumerate(self.population.paths):
            start = time.perf_counter()
            cached = folder / f"eval-{evaluation_key(path, self.cfg, self.split)}.safetensors"
            if cached.is_file():
                tensors, _ = load_checkpoint(cached, device=self.ctx.device)
                val, test = tensors["val"], tensors["test"]
            else:
                val, test = self.scorer.logits(self.population.state(index), averaged=False)
                save_checkpoint(cached, {"val": val, "test": test}, {"path": str(path)})
            self.val_logits.append(val)
            self.test_logits.append(test)
            self._add(f"ingredient[{index}]", [index], 1, val, test, time.perf_counter() - start)
        self.ranking = sorted(range(len(self.population)), key=lambda i: (-self.methods[f"ingredient[{i}]"].val_score, i))

    def best(self) -> None:
        start = time.perf_counter()
        index = self.ranking[0]
        self._add("best", [index], 1, self.val_logits[index], self.test_logits[index], time.perf_counter() - start)
        self.states["best"] = self.population.state(index)

    # ------------------------------------------------------------------ weight-space soups
    def uniform(self, settings: DictConfig) -> None:
        start = time.perf_counter()
        # Streamed one tensor at a time from the files (or from memory when held): one model's memory whatever N.
        state = soups.streamed_uniform_soup(self.population.keys(), self.population.read, len(self.population))
        self._soup("uniform", list(range(len(self.population))), state, start)

    def greedy(self, settings: DictConfig) -> None:
        start = time.perf_counter()

        def record(selected: list[int], state) -> None:
            # Reporting only: test accuracy of each accepted soup, measured after its acceptance was decided.
            val, test = self.scorer.logits(state)
            self.greedy_curve.append({"n": len(selected), "val_acc": accuracy(val, self.scorer.val_labels),
                                      "test_acc": accuracy(test, self.scorer.test_labels)})

        result = soups.greedy_soup(self.population.state, self.ranking, self.scorer.score,
                                   strict=bool(settings.strict), passes=int(settings.passes),
                                   max_ingredients=settings.max_ingredients, on_accept=record)
        for point in self.greedy_curve:
            self.logger.scalars("greedy_curve", {"val_acc": point["val_acc"], "test_acc": point["test_acc"]},
                                point["n"])
        self._soup("greedy", result.selected, result.state, start)

    def greedy_random(self, settings: DictConfig) -> None:
        start = time.perf_counter()
        order = torch.randperm(len(self.population), generator=torch.Generator().manual_seed(int(settings.seed)))
        result = soups.greedy_soup(self.population.state, order.tolist(), self.scorer.score,
                                   strict=bool(settings.strict), passes=int(settings.passes),
                                   max_ingredients=settings.max_ingredients)
        self._soup("greedy_random", result.selected, result.state, start, {"order": order.tolist()})

    def pruned(self, settings: DictConfig) -> None:
        start = time.perf_counter()
        result = soups.pruned_soup(self.population.state, self.ranking[::-1], self.scorer.score,
                                   strict=bool(settings.strict), passes=int(settings.passes),
                                   min_ingredients=int(settings.min_ingredients))
        self._soup("pruned", sorted(result.selected), result.state, start)

    def wiseft(self, settings: DictConfig) -> None:
        start = time.perf_counter()
        if settings.of not in self.states:
            raise UserError(f"merge.wiseft.of={settings.of} needs the {settings.of} soup; add it to merge=[...] or "
                            f"choose one of {sorted(self.states)}")
        pretrained = settings.pretrained or self._shared_init()
        if pretrained is None:
            self.notes.append("wiseft skipped: the ingredients record no shared start point (not from finetune.py); "
                              "set merge.wiseft.pretrained=<checkpoint>")
            return
        theta0 = open_member(Path(pretrained), self.cfg).state(self.ctx.device)
        alpha, state, curve = soups.wiseft(theta0, self.states[settings.of], list(settings.alphas), self.scorer.score)
        selected = self.methods[settings.of].selected
        self._soup("wiseft", selected, state, start, {"alpha": alpha, "of": settings.of, "pretrained": str(pretrained),
                                                      "curve": [{"alpha": a, "val_score": s} for a, s in curve]})

    def _shared_init(self) -> str | None:
        return shared_init(self.population)

    # ------------------------------------------------------------------ task vectors
    def task_vector(self, name: str, settings: DictConfig) -> None:
        """A task-vector method (merging/task_vectors.py), its hyperparameters chosen on validation over its grid."""
        start = time.perf_counter()
        keys = self.population.keys()
        base = pretrained_member(self.cfg, self.population, name, keys)
        stats = None
        if name in tv.NEEDS_DATA:
            stats = [model_statistics(name, settings, self.population.members[i].model(self.ctx.device),
                                      self.scorer.data.train_eval) for i in range(len(self.population))]
        params, state, curve = tv.select_merge(
            name, settings, keys, self.population.read, len(self.population), self.scorer.score,
            base=(lambda key: base.tensor(key)) if base is not None else None, stats=stats)
        self._soup(name, list(range(len(self.population))), state, start,
                   {"params": params, "curve": [{"params": p, "val_score": v} for p, v in curve]})

    # ------------------------------------------------------------------ output-space baselines
    def ensembles(self, settings: DictConfig) -> None:
        everyone = list(range(len(self.population)))
        for members in settings.members:
            start = time.perf_counter()
            chosen = everyone if members == "all" else (self.methods[members].selected if members in self.methods
                                                         else [])
            if not chosen:
                self.notes.append(f"ensemble({members}) skipped: run merge={members} too")
                continue
            val = soups.logit_ensemble([self.val_logits[i] for i in chosen])
            test = soups.logit_ensemble([self.test_logits[i] for i in chosen])
            self._add(f"ensemble({members})", chosen, len(chosen), val, test, time.perf_counter() - start)
        if settings.vote:
            start = time.perf_counter()
            k = self.val_logits[0].shape[1]
            val = _one_hot(soups.hard_vote(torch.stack([v.argmax(1) for v in self.val_logits]), k), k)
            test = _one_hot(soups.hard_vote(torch.stack([t.argmax(1) for t in self.test_logits]), k), k)
            self._add("vote(all)", everyone, len(everyone), val, test, time.perf_counter() - start)

    # ------------------------------------------------------------------ rows and results
    def _soup(self, name: str, selected: list[int], state: dict, start: float, extra: dict | None = None) -> None:
        """Score a weight-space soup (one forward pass per input), keep it, save it."""
        val, test = self.scorer.logits(state)
        self.states[name] = {k: v.clone() for k, v in self.scorer.model.state_dict().items()}
        self._add(name, selected, 1, val, test, time.perf_counter() - start, extra)
        if self.cfg.save_soups:
            meta = {**self.population.soup_meta(), "soup": {
                "method": name, "recompute_bn": bool(self.cfg.recompute_bn), "metric": self.cfg.metric,
                "selected": [str(self.population.paths[i]) for i in selected], **(extra or {})}}
            save_checkpoint(self.ctx.run_dir / "checkpoints" / f"{name}.safetensors", self.states[name], meta)

    def _add(self, name: str, selected: list[int], passes: int, val: torch.Tensor, test: torch.Tensor,
             seconds: float, extra: dict | None = None) -> None:
        row = Method(name, list(selected), passes, accuracy(val, self.scorer.val_labels),
                     accuracy(test, self.scorer.test_labels), seconds,
                     selection_score(val, self.scorer.val_labels, self.cfg.metric), extra or {})
        self.methods[name] = row
        self.logger.scalars(f"soup/{name}", {"val_acc": row.val_acc, "test_acc": row.test_acc,
                                             "n_ingredients": len(row.selected)}, 0)

    def predict_folder(self, folder: Path, methods: list[str]) -> None:
        from mergelab.predictions import predict_folder

        predict_folder(self, folder, methods)

    def results(self) -> dict:
        paths = self.population.paths
        table = [{"method": m.method, "n_ingredients": len(m.selected), "forward_passes": m.forward_passes,
                  "val_acc": m.val_acc, "test_acc": m.test_acc, "time_s": m.time_s} for m in self.methods.values()]
        for note in self.notes:
            print(note)
        return {
            "task": "soup",
            "metrics": {metric_key(m.method, split, "acc"): getattr(m, f"{split}_acc") for m in self.methods.values()
                        for split in ("val", "test")},
            "table": table,
            "recompute_bn": bool(self.cfg.recompute_bn), "metric": self.cfg.metric,
            "ingredients": [{"path": str(p), "val_acc": self.methods[f"ingredient[{i}]"].val_acc,
                             "test_acc": self.methods[f"ingredient[{i}]"].test_acc,
                             "hparams": self.population.metas[i].get("hparams", {})} for i, p in enumerate(paths)],
            "methods": [{"method": m.method, "n_ingredients": len(m.selected), "val_acc": m.val_acc,
                         "test_acc": m.test_acc, "forward_passes": m.forward_passes, "time_s": m.time_s,
                         "selected": [str(paths[i]) for i in m.selected], "val_score": m.val_score, **m.extra}
                        for m in self.methods.values()],
            "greedy_curve": self.greedy_curve,
            "checkpoint_reads": self.population.reads,
            "candidate_evaluations": self.scorer.calls,
            "notes": self.notes,
        }


def _one_hot(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Votes as one-hot "logits", so that accuracy is computed like every other row's."""
    return F.one_hot(predictions, num_classes).float()


def evaluation_key(path: Path, cfg: DictConfig, split: int) -> str:
    """Identifies an individual evaluation: the file (path, mtime, size) and the samples it is evaluated on."""
    stat = path.stat()
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in BATCH_OPTIONS}
    key = {"path": str(path.resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size, "dataset": dataset,
           "split_seed": split}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def shared_init(population: Population) -> str | None:
    """The start point every ingredient records (finetune.py's meta ``init``), when they record one and agree."""
    inits = {m.get("init") for m in population.metas}
    if len(inits) != 1 or None in inits:
        return None
    return inits.pop()


def pretrained_member(cfg: DictConfig, population: Population, method: str, keys: list[str]) -> Member | None:
    """The pretrained weights theta_0 of task vectors: ``pretrained=<checkpoint>``, else the start point the
    ingredients record; None for methods that do not need it. Its tensors ``keys`` must have the ingredients'
    shapes."""
    if method not in tv.NEEDS_BASE:
        return None
    path = cfg.get("pretrained") or shared_init(population) or _backbone_init(population)
    if not path:
        raise UserError(f"merge={method} needs the pretrained model the ingredients were fine-tuned from; set "
                        "pretrained=<checkpoint> (the ingredients record no shared start point)")
    base = open_member(Path(path), cfg)
    mine = population.members[0]
    for key in keys:
        if base.reader.shape(key) != mine.reader.shape(key):
            raise UserError(f"pretrained={path} does not fit the ingredients: {key} has shape "
                            f"{list(base.reader.shape(key))} there but {list(mine.reader.shape(key))} in "
                            f"{mine.path}; point to the model they were fine-tuned from")
    return base


def _backbone_init(population: Population) -> str | None:
    """Multi-task populations record one start point per task (its head differs); their backbones are the same
    pretrained model, so any of them serves as theta_0 of the backbone."""
    inits = [m.get("init") for m in population.metas]
    return inits[0] if population.multitask and all(inits) else None


def model_statistics(method: str, settings: DictConfig, model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """What Fisher merging (diagonal Fisher) or RegMean (input Gram matrices) reads from a model's training data."""
    if method == "fisher":
        return tv.fisher_diagonal(model, batches, int(settings.num_examples))
    return tv.input_grams(model, batches, int(settings.num_examples))


def predictions_vote(ctx: Context) -> dict:
    from mergelab.predictions import vote_csvs

    return vote_csvs(ctx.cfg.predict.vote, ctx.run_dir / "predictions" / "vote.csv")
