"""finetune.py: fine-tune one ingredient of a model-soup population from a shared start point.

The start point is the pretrained backbone with a classifier head for the new classes that every ingredient
shares (zero, seeded, or a linear probe fitted once: LP-FT, Kumar et al. 2022). Soups of fine-tuned models with
independently random heads fail (see the ModelSoup study); sharing the head is what keeps the population in one
basin. The start point is written once to a cache derived from the pretrained source and the data set, so every
ingredient (and WiSE-FT in soup.py) reads the same weights.

Hyperparameters: ``index=i`` draws ingredient ``i``'s from a generator seeded with ``(search.seed, i)``, like the
random search of model soups (Wortsman et al. 2022, Sec. 3.1); ``search.mode=grid`` walks a fixed grid instead.
The validation split is seeded by the population's ``seed`` and never by the ingredient, so no ingredient trains on
the split that soup.py selects on; the drawn ``data_seed`` only orders and augments the training batches.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from torch import nn

from mergelab.checkpoints import read_meta, save_checkpoint
from mergelab.errors import UserError
from mergelab.evaluation import evaluate
from mergelab.population import load_model, resolve_checkpoints
from mergelab.runner import Context
from mergelab.tasks.train import summarize
from mergelab.training import Trainer, build_scheduler

HEADS = ("zero", "seeded", "linear_probe")
# Dataset options that change only how training batches are drawn, not which samples the splits hold.
BATCH_OPTIONS = ("augment", "crop_padding", "padding_mode", "flip", "balanced", "in_memory", "num_workers")


def run(ctx: Context) -> dict:
    cfg = ctx.cfg
    if cfg.get("tasks"):
        return joint_training(ctx)
    hparams = draw_hparams(cfg, int(cfg.index))
    tuned = apply_hparams(cfg, hparams)
    data = ctx.data(tuned.dataset)
    # Batch order and augmentation follow the ingredient's seed; the splits stay those of the population's seed.
    data.train.seed = hparams["data_seed"]
    torch.manual_seed(hparams["data_seed"])
    model, model_cfg, start = start_point(ctx, data)
    meta = {**ctx.model_meta(data, model_cfg), "hparams": hparams, "index": int(cfg.index),
            "split_seed": split_seed(tuned.dataset, ctx.seed),
            "init": str(start["path"]) if start.get("path") else None, "head": start["head"]}
    trainer = Trainer(model, data, tuned, ctx.run_dir / "checkpoints", logger=ctx.open_logger(), meta=meta,
                      prefix=f"[{cfg.index}] ")
    results = summarize(trainer, trainer.fit(on_epoch_end=ctx.on_epoch_end))
    return {**results, "task": "finetune", "index": int(cfg.index), "hparams": hparams, "start": start}


def split_seed(dataset_cfg: DictConfig, seed: int) -> int:
    """The seed of the train/validation split: ``dataset.split_seed``, or the run seed when it is null (data.py)."""
    value = dataset_cfg.get("split_seed")
    return int(seed) if value is None else int(value)


# ------------------------------------------------------------------------------------------- hyperparameter search
def draw_hparams(cfg: DictConfig, index: int) -> dict[str, Any]:
    """Ingredient ``index``'s hyperparameters as ``{config key: value}`` plus ``data_seed``.

    ``random``: ``optimizer.lr`` log-uniform in ``[lr/f, lr*f]``, ``optimizer.weight_decay`` log-uniform in
    ``[wd/f, wd*f]``, ``train.epochs`` uniform over the integers of ``search.epochs``, ``train.label_smoothing`` and
    ``dataset.augment`` uniform over their lists, ``data_seed`` uniform in ``[0, 2^31)``; all from
    ``numpy.random.default_rng([search.seed, index])``. ``grid``: element ``index`` of the Cartesian product of
    ``search.grid`` (row-major, keys in the order given). ``none``: the config as given. Outside random mode
    ``data_seed`` is ``seed + index`` unless the grid sets it.
    """
    search = cfg.search
    if index < 0:
        raise UserError(f"index={index} must be >= 0")
    if search.mode == "random":
        rng = np.random.default_rng([int(search.seed), index])
        lr, wd = float(cfg.optimizer.lr), float(cfg.optimizer.get("weight_decay", 0.0))
        low, high = (int(e) for e in search.epochs)
        drawn = {
            "optimizer.lr": _log_uniform(rng, lr, float(search.lr_factor)),
            "optimizer.weight_decay": _log_uniform(rng, wd, float(search.weight_decay_factor)),
            "train.epochs": int(rng.integers(low, high + 1)),
            "train.label_smoothing": float(_choice(rng, search.label_smoothing)),
            "dataset.augment": bool(_choice(rng, search.augment)),
            "data_seed": int(rng.integers(2**31)),
        }
        if "weight_decay" not in cfg.optimizer:
            drawn.pop("optimizer.weight_decay")
        return drawn
    if search.mode == "grid":
        grid = OmegaConf.to_container(search.grid, resolve=True)
        combos = list(itertools.product(*grid.values()))
        if index >= len(combos):
            raise UserError(f"index={index} is outside search.grid, which has {len(combos)} points; "
                            f"use index=range(0,{len(combos)})")
        return {"data_seed": int(cfg.seed) + index, **dict(zip(grid, combos[index]))}
    if search.mode == "none":
        return {"data_seed": int(cfg.seed) + index}
    raise UserError(f"search.mode={search.mode!r} is not one of random, grid, none")


def _choice(rng: np.random.Generator, options) -> Any:
    if not options:
        raise UserError("a search choice list is empty; give it at least one value")
    return options[int(rng.integers(len(options)))]


def _log_uniform(rng: np.random.Generator, centre: float, factor: float) -> float:
    if centre <= 0 or factor <= 1:
        return centre
    return float(math.exp(rng.uniform(math.log(centre / factor), math.log(centre * factor))))


def apply_hparams(cfg: DictConfig, hparams: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with every drawn ``config key: value`` set (``data_seed`` is not a config key)."""
    tuned = copy.deepcopy(cfg)
    for key, value in hparams.items():
        if key == "data_seed":
            continue
        if OmegaConf.select(tuned, key, default=KeyError) is KeyError:
            raise UserError(f"search key {key!r} is not a setting of this config; use a dotted key such as "
                            "optimizer.lr or train.epochs")
        OmegaConf.update(tuned, key, value, merge=False)
    return tuned


# ------------------------------------------------------------------------------------------------ the start point
def start_point(ctx: Context, data) -> tuple[nn.Module, DictConfig, dict]:
    """``(model, model config, description)``: the model every ingredient starts from, on the device.

    ``init=pretrained`` reads (or creates once) the cached shared start point; ``init=scratch`` draws fresh weights
    from the ingredient's seed, so every ingredient starts elsewhere (the soups' negative result).
    """
    cfg = ctx.cfg
    if cfg.init == "scratch":
        return ctx.build_model(data), cfg.model, {"head": "independent", "path": None}
    if cfg.init != "pretrained":
        raise UserError(f"init={cfg.init!r} is not one of pretrained, scratch")
    if cfg.head not in HEADS:
        raise UserError(f"head={cfg.head!r} is not one of {', '.join(HEADS)}")
    source, model_cfg = pretrained_source(cfg)
    path = init_cache_path(ctx, data, source)
    if path.is_file():
        model = load_model(path, device=ctx.device)[0]
        return model, model_cfg, {"head": cfg.head, "path": path, "source": source, "cached": True}
    model = pretrained_model(ctx, data, source, model_cfg)
    model.reset_classifier(data.num_classes)
    probe = init_head(model, cfg, data)
    meta = {**ctx.model_meta(data, model_cfg), "start_point": {"source": source, "head": cfg.head, **probe}}
    save_checkpoint(path, model.state_dict(), meta)
    return model, model_cfg, {"head": cfg.head, "path": path, "source": source, "cached": False, **probe}


def pretrained_source(cfg: DictConfig) -> tuple[dict, DictConfig]:
    """What the start point is made from (a file with its mtime and size, or a timm hub name) and its model config."""
    if cfg.pretrained_from:
        paths = resolve_checkpoints(str(cfg.pretrained_from))
        if len(paths) != 1:
            raise UserError(f"pretrained_from={cfg.pretrained_from} matches {len(paths)} checkpoints; "
                            "point to one checkpoint or run folder")
        meta = read_meta(paths[0])
        if "model" not in meta:
            raise UserError(f"{paths[0]} has no mergelab metadata; pretrained_from takes a mergelab checkpoint "
                            "(for a timm or torchvision state dict use model=timm model.weights=<file>)")
        return _file_identity(paths[0]), OmegaConf.create(meta["model"])
    weights, hub = cfg.model.get("weights"), cfg.model.get("pretrained")
    if weights:
        return _file_identity(Path(weights)), cfg.model
    if hub:
        return {"hub": str(cfg.model.get("name"))}, cfg.model
    raise UserError("finetune needs a pretrained model: pretrained_from=<checkpoint or run folder>, "
                    "model=timm model.weights=<file>, or model=timm model.pretrained=true (or init=scratch)")


def _file_identity(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"pretrained weights not found: {path}; check the path")
    stat = path.stat()
    return {"path": str(path.resolve()), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def init_cache_path(ctx: Context, data, source: dict) -> Path:
    """A file name that changes whenever anything the start point depends on changes: the pretrained source, the
    head recipe, the classes and the training/validation samples (the linear probe is fitted and chosen on them)."""
    cfg = ctx.cfg
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in BATCH_OPTIONS}
    key = {"source": source, "head": cfg.head, "dataset": dataset, "split_seed": split_seed(cfg.dataset, ctx.seed),
           "num_classes": data.num_classes}
    if cfg.head == "seeded":
        key["head_seed"] = int(cfg.head_seed)
    if cfg.head == "linear_probe":
        key["linear_probe"] = OmegaConf.to_container(cfg.linear_probe, resolve=True)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if cfg.init_cache:
        folder = Path(cfg.init_cache)
    elif cfg.pretrained_from:
        folder = Path(source["path"]).parent / "finetune_init"
    else:
        folder = Path("outputs") / "finetune_init"
    return folder / f"{cfg.head}-{digest}.safetensors"


def pretrained_model(ctx: Context, data, source: dict, model_cfg: DictConfig) -> nn.Module:
    """The pretrained network on the device, with whatever head it came with."""
    if "path" in source and ctx.cfg.pretrained_from:
        model, meta = load_model(source["path"], device=ctx.device)
        if (meta["in_channels"], meta["image_size"]) != (data.in_channels, data.image_size):
            raise UserError(f"{source['path']} takes {meta['in_channels']}x{meta['image_size']}px inputs but "
                            f"{data.name} gives {data.in_channels}x{data.image_size}px; set dataset.channels and "
                            "dataset.image_size to match")
        return model
    return ctx.build_model(data, model_cfg)


# ------------------------------------------------------------------------------------------------------- the head
@torch.no_grad()
def init_head(model: nn.Module, cfg: DictConfig, data) -> dict:
    """Set the (freshly reset) classifier as ``cfg.head`` says; returns what the linear probe chose, if any."""
    head = model.get_classifier()
    if cfg.head == "zero":
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
        return {}
    if cfg.head == "seeded":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.head_seed))
            head.reset_parameters()
        return {}
    return linear_probe(model, data, list(cfg.linear_probe.C), int(cfg.linear_probe.max_iter))


def features(model: nn.Module, batches) -> tuple[np.ndarray, np.ndarray]:
    """``forward_features`` of every batch in eval mode, as float64 numpy arrays with the labels."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    with torch.no_grad():
        for x, y in batches:
            feats.append(model.forward_features(x).double().cpu())
            labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def linear_probe(model: nn.Module, data, grid: list[float], max_iter: int) -> dict:
    """LP of LP-FT (Kumar et al. 2022): multinomial logistic regression (L2, L-BFGS) on frozen features of the
    training split; the regularisation ``C`` with the best validation accuracy is kept and written into the head."""
    if not grid:
        raise UserError("linear_probe.C is empty; list at least one regularisation strength")
    x_train, y_train = features(model, data.train_eval)
    x_val, y_val = features(model, data.val)
    if len(np.unique(y_train)) != data.num_classes:
        raise UserError(f"the training split lacks some of the {data.num_classes} classes; a linear probe needs them all")
    fits = [LogisticRegression(C=float(c), max_iter=max_iter).fit(x_train, y_train) for c in grid]
    scores = [float((fit.predict(x_val) == y_val).mean() * 100) for fit in fits]
    best = int(np.argmax(scores))
    weight, bias = _multiclass_coefficients(fits[best])
    head = model.get_classifier()
    head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return {"probe_C": float(grid[best]), "probe_val_acc": scores[best]}


def _multiclass_coefficients(fit: LogisticRegression) -> tuple[np.ndarray, np.ndarray]:
    """One row of weights per class; sklearn stores a single row ``w1 - w0`` for two classes, split symmetrically."""
    if fit.coef_.shape[0] == 1:
        half, bias = fit.coef_[0] / 2, fit.intercept_[0] / 2
        return np.stack([-half, half]), np.array([-bias, bias])
    return fit.coef_, fit.intercept_


# ---------------------------------------------------------------------------------------- the multi-task model
def joint_training(ctx: Context) -> dict:
    """The multi-task reference of task-vector benchmarks: one backbone from the pretrained model with one head per
    task (each started like a fine-tuned ingredient's: ``head=...``), trained on every task together. Each step
    takes one batch of every task and minimises the sum of the tasks' cross-entropies. ``tasks`` lists each task's
    dataset options (e.g. ``{classes: [0,1,2,3,4]}``, ``{domain: rotated}``). Writes one checkpoint per task,
    ``checkpoints/task<i>.safetensors`` (the shared backbone with that task's head, that task's metadata), which
    soup.py reads with ``multitask=<glob>``."""
    cfg = ctx.cfg
    datas = [ctx.data(OmegaConf.merge(cfg.dataset, task)) for task in cfg.tasks]
    source, model_cfg = pretrained_source(cfg)
    model = pretrained_model(ctx, datas[0], source, model_cfg)
    heads = []
    for data in datas:
        model.reset_classifier(data.num_classes)
        init_head(model, cfg, data)
        heads.append(model.get_classifier())
    modules = nn.ModuleList([model, *heads])  # the model's current classifier is the last head: listed once
    optimizer = instantiate(cfg.optimizer)(list(dict.fromkeys(modules.parameters())))
    steps = max(len(d.train) for d in datas)  # an epoch: one pass over the largest task, the others cycled
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps * int(cfg.train.epochs), steps)
    smoothing = float(cfg.train.label_smoothing)
    torch.manual_seed(ctx.seed)
    streams = [_cycle(d.train) for d in datas]
    for epoch in range(int(cfg.train.epochs)):
        model.train()
        for _ in range(steps):
            batches = [next(stream) for stream in streams]
            loss = sum(F.cross_entropy(head(model.forward_features(x)), y, label_smoothing=smoothing)
                       for head, (x, y) in zip(heads, batches))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if not torch.isfinite(loss):
            raise UserError(f"the multi-task loss diverged at epoch {epoch}; lower optimizer.lr")
    table, metrics = [], {}
    for index, (data, head) in enumerate(zip(datas, heads)):
        model.set_submodule(model.classifier_name, head)
        row = {"model": f"task{index}", **{f"{split}_acc": evaluate(model, getattr(data, split))["acc"]
                                           for split in ("val", "test")}}
        table.append(row)
        metrics.update({f"task{index}/{k}": v for k, v in row.items() if k != "model"})
        meta = {**ctx.model_meta(data, model_cfg), "split_seed": split_seed(data_cfg(cfg, index), ctx.seed),
                "index": index, "multitask": [OmegaConf.to_container(t, resolve=True) for t in cfg.tasks]}
        save_checkpoint(ctx.run_dir / "checkpoints" / f"task{index}.safetensors", model.state_dict(), meta)
    return {"task": "finetune", "metrics": metrics, "table": table}


def _cycle(batches):
    """The training batches of one task, epoch after epoch (each pass reshuffled by its own epoch number)."""
    for epoch in itertools.count():
        batches.set_epoch(epoch)
        yield from batches


def data_cfg(cfg: DictConfig, index: int) -> DictConfig:
    return OmegaConf.merge(cfg.dataset, cfg.tasks[index])
