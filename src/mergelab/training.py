"""The shared training loop: steps, EMA, per-epoch evaluation, checkpoints and exact resume.

Used by train.py, finetune.py, ema.py and by retraining after a merge. Reproducibility contract: the batches of
epoch ``e`` are a pure function of ``(seed, e)`` (see :mod:`mergelab.data`), every other random state is saved in
the checkpoint at the end of each epoch, so a run resumed from any epoch ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from mergelab import distributed
from mergelab.checkpoints import flatten_state, load_checkpoint, save_checkpoint, unflatten_state
from mergelab.ema import EMA, sigma_rel_label
from mergelab.errors import UserError
from mergelab.config import check_training, instantiate
from mergelab.evaluation import evaluate, has_batchnorm, recompute_bn
from mergelab.merging.posthoc import SIGMA_REL_MAX
from mergelab.metrics import is_metric_key, metric_key
from mergelab.reporting import RunLogger

STATE_FILE = "state.safetensors"
SNAPSHOT_DIR = "posthoc"  # checkpoints/posthoc/: snapshots of the power-function EMAs, for post-hoc EMA
# Config sections that must agree between an interrupted run and its resumption.
RESUME_KEYS = ("dataset", "model", "optimizer", "scheduler", "train", "ema", "seed")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg`` is a partial optimizer config (``_target_: torch.optim.SGD``, ``_partial_: true``, ...)."""
    # Called here rather than as a partial, so that a bad option fails inside instantiate (one line, exit 2).
    return instantiate(cfg, list(model.parameters()), key="optimizer", _partial_=False)


def build_scheduler(cfg: DictConfig, optimizer, total_steps: int, steps_per_epoch: int):
    return instantiate(cfg, key="scheduler", optimizer=optimizer, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch)


def ema_decays(cfg: DictConfig) -> list[float]:
    """The decays to track: ``averaged.decay`` (the EMA study's override name) wins over ``ema.decays``."""
    single = OmegaConf.select(cfg, "averaged.decay")
    if single is not None:
        return [float(single)]
    return [float(d) for d in (OmegaConf.select(cfg, "ema.decays") or [])]


SNAPSHOTS_PER_PROFILE = 50  # ema.posthoc.every=null: about this many snapshots of each profile over the run


def posthoc_settings(cfg: DictConfig, total_steps: int) -> tuple[list[float], int | None]:
    """``ema.posthoc``: the power-function EMAs to track (``sigma_rels``) and the steps between their snapshots
    (``every``; null = ``total_steps / 50`` rounded to a multiple of ``ema.every``); ``([], None)`` when off."""
    sigma_rels = [float(s) for s in (OmegaConf.select(cfg, "ema.posthoc.sigma_rels") or [])]
    if not sigma_rels:
        return [], None
    fold = int(OmegaConf.select(cfg, "ema.every") or 1)
    every = OmegaConf.select(cfg, "ema.posthoc.every")
    if every is None:
        every = max(1, round(total_steps / SNAPSHOTS_PER_PROFILE / fold)) * fold
    if not isinstance(every, int) or every < 1 or every % fold:
        raise UserError(f"ema.posthoc.every={every} must be a number of steps >= 1 and a multiple of "
                        f"ema.every={fold}, e.g. ema.posthoc.every={10 * fold}, or null")
    if not all(0.0 < s < SIGMA_REL_MAX for s in sigma_rels):
        raise UserError(f"ema.posthoc.sigma_rels={sigma_rels} must lie in (0, {SIGMA_REL_MAX:.4f}), "
                        "e.g. ema.posthoc.sigma_rels=[0.05,0.1]")
    return sigma_rels, every


def tail_start_step(tail: float | None, total_steps: int) -> int | None:
    """``ema.tail``: the uniform tail average starts after this fraction of all steps (null = no tail average)."""
    if tail is None:
        return None
    if not 0.0 <= float(tail) < 1.0:
        raise UserError(f"ema.tail={tail} must be a fraction of training in [0, 1), e.g. ema.tail=0.75, or null")
    return int(round(float(tail) * total_steps))


def train_step(model, x, y, optimizer, scheduler, *, label_smoothing: float, grad_clip: float | None, autocast):
    """One optimiser step; returns the (detached) loss."""
    with autocast:
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


class Trainer:
    """Trains ``model`` on ``data`` as configured by ``cfg`` (sections train, optimizer, scheduler, ema, seed).

    Checkpoints go to ``ckpt_dir``: ``last`` and ``best`` (raw model, by validation accuracy), one file per EMA
    decay at the end, and ``state.safetensors`` holding everything needed to resume. With ``ema.posthoc`` on, the
    power-function EMAs are also saved every ``ema.posthoc.every`` steps and at the last step into ``posthoc/``.
    ``meta`` is stored in every checkpoint (the runner puts the model config and data shape there so later scripts
    can rebuild the model).

    Under torchrun (:mod:`mergelab.distributed`) every rank steps on its shard of each global batch through
    DistributedDataParallel; the EMA, evaluation, checkpoints and logs are rank 0's.
    """

    def __init__(self, model: nn.Module, data, cfg: DictConfig, ckpt_dir: str | Path, logger: RunLogger | None,
                 meta: dict | None = None, prefix: str = ""):
        check_training(cfg)
        self.model, self.data, self.cfg = model, data, cfg
        self.tcfg = cfg.train
        self.ckpt_dir = Path(ckpt_dir)
        self.logger, self.meta, self.prefix = logger, dict(meta or {}), prefix
        self.device = next(model.parameters()).device
        distributed.check_batch_size(int(self.tcfg.batch_size))
        self.main = distributed.is_main()
        self.steps_per_epoch = len(data.train)
        self.total_steps = self.tcfg.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer(cfg.optimizer, model)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, self.total_steps, self.steps_per_epoch)
        decays = ema_decays(cfg)
        ema_cfg = cfg.get("ema") or {}
        tail_start = tail_start_step(ema_cfg.get("tail"), self.total_steps)
        sigma_rels, self.snapshot_every = posthoc_settings(cfg, self.total_steps)
        if not self.main:
            self.snapshot_every = None  # rank 0 tracks the EMAs and writes their snapshots
        self.ema = None
        if self.main and (decays or sigma_rels or tail_start is not None):
            try:
                self.ema = EMA(model, decays, warmup=ema_cfg.get("warmup", False), tail_start=tail_start,
                               buffers=ema_cfg.get("buffers", "average"), every=ema_cfg.get("every", 1),
                               sigma_rels=sigma_rels)
            except ValueError as exc:
                raise UserError(f"{exc}; fix the ema.* settings") from None
        self.recompute_bn = bool(ema_cfg.get("recompute_bn", False)) and has_batchnorm(model)
        self._eval_model = copy.deepcopy(model) if self.ema else None
        # What steps: a DDP wrapper across ranks (after the copy above: SyncBatchNorm must stay out of rank 0's
        # evaluation, where a training-mode pass for recompute_bn would wait for the other ranks).
        self.net = distributed.wrap(model, bool(self.tcfg.get("sync_bn", False)))
        self.progress = bool(cfg.get("progress", True))
        self.epoch, self.step = 0, 0
        self.best_val = -math.inf
        self.history: list[dict[str, float]] = []
        use_bf16 = self.tcfg.get("precision", "fp32") == "bf16" and self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # ---------------------------------------------------------------- the loop
    def fit(self, on_epoch_end: Callable[["Trainer"], None] | None = None) -> dict[str, Any]:
        """Train from the current epoch to ``train.epochs``, evaluating and checkpointing after each epoch."""
        for epoch in range(self.epoch, self.tcfg.epochs):
            self.train_epoch(epoch)
            self.epoch = epoch + 1
            if not self.main:
                continue  # rank 0 evaluates and writes; the others go on to the next epoch's first step
            record = {"epoch": self.epoch, "step": self.step, **self.evaluate_all()}
            self.history.append(record)
            self._log({k: v for k, v in record.items() if is_metric_key(k)})
            self._save_epoch(record)
            if on_epoch_end:
                on_epoch_end(self)
        if self.snapshot_every and self.step % self.snapshot_every:
            self._save_snapshots()  # reconstructions target the last step: it needs its own snapshot
        self._save_ema()
        return {"history": self.history, "final": self.history[-1] if self.history else {},
                "best_val_acc": self.best_val, "steps": self.step}

    def train_epoch(self, epoch: int) -> None:
        """One pass over the training batches of ``epoch``: optimiser steps, EMA updates, loss logs."""
        # Plain Python values: a DictConfig lookup costs microseconds, which shows at a few thousand steps/s.
        log_every = int(self.tcfg.get("log_every", 50))
        label_smoothing, grad_clip = float(self.tcfg.label_smoothing), self.tcfg.grad_clip
        self.model.train()
        self.data.train.set_epoch(epoch)
        running, count = torch.zeros((), device=self.device), 0
        bar = tqdm(self.data.train, desc=f"{self.prefix}epoch {epoch + 1}/{self.tcfg.epochs}", leave=False,
                   disable=not self.progress, mininterval=0.5)
        for x, y in bar:
            x, y = distributed.shard(x, y)
            loss = train_step(self.net, x, y, self.optimizer, self.scheduler,
                              label_smoothing=label_smoothing, grad_clip=grad_clip, autocast=self.autocast)
            if self.ema:
                self.ema.update()
            self.step += 1
            if self.snapshot_every and self.step % self.snapshot_every == 0:
                self._save_snapshots()
            running += loss
            count += 1
            # One host sync per `log_every` steps: checks divergence and feeds the logs.
            if self.step % log_every == 0:
                mean = self._check_finite(running / count, epoch)
                bar.set_postfix(loss=f"{mean:.3f}")
                self._log({"loss": mean, "lr": self.scheduler.get_last_lr()[0]}, prefix="train")
                running, count = torch.zeros((), device=self.device), 0
        if count:
            self._check_finite(running / count, epoch)

    def _check_finite(self, mean_loss: torch.Tensor, epoch: int) -> float:
        value = mean_loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training diverged: loss is {value} at epoch {epoch + 1}, step {self.step}; "
                f"lower optimizer.lr (now {self.cfg.optimizer.lr}) or set train.grad_clip"
            )
        return value

    def _log(self, values: dict[str, float], prefix: str = "") -> None:
        if self.logger:
            self.logger.scalars(f"{self.prefix}{prefix}".strip("/"), values, self.step)

    # ---------------------------------------------------------------- evaluation
    def averaged_models(self):
        """Yield ``(name, model)`` for the raw model and every EMA (and EMA with recomputed BatchNorm)."""
        yield "raw", self.model
        if not self.ema:
            return
        for i, label in enumerate(self.ema.labels):
            self._eval_model.load_state_dict(self.ema.state_dict_for(i))
            yield label, self._eval_model
            if self.recompute_bn:
                recompute_bn(self._eval_model, self.data.train_eval)
                yield label + "+recompute_bn", self._eval_model

    def evaluate_all(self) -> dict[str, float]:
        """``{"<model>/<split>_<metric>": value}`` for every model of :meth:`averaged_models` on val and test."""
        out = {}
        for name, model in self.averaged_models():
            for split in ("val", "test"):
                for metric, value in evaluate(model, getattr(self.data, split)).items():
                    out[metric_key(name, split, metric)] = value
        return out

    # ---------------------------------------------------------------- checkpoints and resume
    def _model_meta(self, record: dict) -> dict:
        return {**self.meta, "epoch": self.epoch, "step": self.step, "metrics": record}

    def _save_epoch(self, record: dict) -> None:
        weights = self.model.state_dict()
        save_checkpoint(self.ckpt_dir / "last.safetensors", weights, self._model_meta(record))
        val = record.get(metric_key("raw", "val", "acc"), -math.inf)
        if val > self.best_val:
            self.best_val = val
            save_checkpoint(self.ckpt_dir / "best.safetensors", weights, self._model_meta(record))
        self._save_state()

    def _save_ema(self) -> None:
        for i, label in enumerate(self.ema.labels if self.ema else []):
            save_checkpoint(self.ckpt_dir / f"{label}.safetensors", self.ema.state_dict_for(i),
                            {**self._model_meta(self.history[-1] if self.history else {}), **self.ema.profile(i)})

    def _save_snapshots(self) -> None:
        """``posthoc/sigma_rel<s>-<step>.safetensors``: each power-function EMA now, with its step and gamma.

        A resumed run rewrites the snapshots after its last saved epoch with the same bits (atomically)."""
        first = len(self.ema.decays)
        for i, sigma_rel in enumerate(self.ema.sigma_rels, start=first):
            path = self.ckpt_dir / SNAPSHOT_DIR / f"{sigma_rel_label(sigma_rel)}-{self.step:07d}.safetensors"
            save_checkpoint(path, self.ema.state_dict_for(i),
                            {**self.meta, "step": self.step, **self.ema.profile(i)})

    def _save_state(self) -> None:
        opt_tensors, opt_skeleton = flatten_state(self.optimizer.state_dict(), "optimizer")
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(opt_tensors)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if self.ema:
            tensors.update(self.ema.tensors())
        meta = {
            **self.meta,
            "epoch": self.epoch, "step": self.step, "best_val": self.best_val, "history": self.history,
            "optimizer": opt_skeleton, "scheduler": self.scheduler.state_dict(),
            "ema_step": self.ema.step if self.ema else 0,
            "resume_config": resume_fingerprint(self.cfg),
        }
        save_checkpoint(self.ckpt_dir / STATE_FILE, tensors, meta)

    def load_state(self, path: str | Path) -> None:
        """Restore everything :meth:`_save_state` wrote; refuse a folder trained with another config."""
        tensors, meta = load_checkpoint(path, device=self.device)
        mismatch = config_mismatch(meta.get("resume_config", {}), resume_fingerprint(self.cfg))
        if mismatch:
            raise UserError(f"cannot resume from {path}: it was trained with {mismatch}; "
                            "resume with the original settings or start a new run")
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(unflatten_state(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.ema:
            self.ema.load_tensors(tensors, meta["ema_step"])
        torch.set_rng_state(tensors["rng.cpu"].cpu())
        cuda_states = [tensors[k].cpu() for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.best_val, self.history = meta["best_val"], meta["history"]


def resume_fingerprint(cfg: DictConfig) -> dict:
    """The config sections that determine a training trajectory, as plain data (``ema.posthoc`` only when on, so
    runs from before it existed still resume)."""
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg.get(k), DictConfig) else cfg.get(k)
           for k in RESUME_KEYS if k in cfg}
    if isinstance(out.get("ema"), dict) and not (out["ema"].get("posthoc") or {}).get("sigma_rels"):
        out["ema"].pop("posthoc", None)
    return out


def config_mismatch(saved: dict, current: dict, path: str = "") -> str | None:
    """The first setting that differs, as ``"key=saved (now current)"``, or None."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{path}.{key}" if path else key
        if isinstance(a, dict) and isinstance(b, dict):
            found = config_mismatch(a, b, name)
            if found:
                return found
        elif a != b:
            return f"{name}={a} (now {b})"
    return None
