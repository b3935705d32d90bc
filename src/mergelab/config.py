"""Reading the composed config: building objects from ``_target_`` nodes, option values shared by several tasks,
and the multirun folder names.

Every object built from config goes through :func:`instantiate`, so that bad input met while building it (a
:class:`~mergelab.errors.UserError` from a constructor, an option the target does not take, a ``_target_`` that does
not exist) reaches the runner as one line and exit status 2, not as Hydra's multi-line ``InstantiationException``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from mergelab.errors import UserError

# The corrections applied to a merged model before it is scored (``merge.correction``): nothing, BatchNorm
# statistics recomputed on training data (:func:`mergelab.evaluation.recompute_bn`), or REPAIR (Jordan et al. 2023).
CORRECTIONS = ("none", "recompute_bn", "repair")

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def instantiate(node: Mapping[str, Any], *args: Any, key: str = "", exclude: Iterable[str] = (), **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, *args, **kwargs)`` without the keys in ``exclude`` (options the caller
    reads itself, e.g. ``merge.correction``). ``key`` is the node's config path (``merge``), named in errors.

    A :class:`UserError` raised by the target comes out as itself; an option the target does not accept or a
    ``_target_`` that cannot be imported becomes a :class:`UserError` naming it. Any other failure is a bug and keeps
    Hydra's exception and traceback.
    """
    exclude = set(exclude)
    if exclude:
        if isinstance(node, DictConfig):  # interpolations need the root, which a copy lacks: resolve first
            node = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in node.items() if k not in exclude})
    target = node.get("_target_") if hasattr(node, "get") else None
    where = f"{key}: " if key else ""
    try:
        return hydra.utils.instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        unexpected = _UNEXPECTED.search(str(exc.__cause__ or exc))
        if unexpected:
            option = f"{key}.{unexpected.group(1)}" if key else unexpected.group(1)
            raise UserError(f"{option} is not an option of {target}; see its config file for the options it "
                            "takes") from None
        if isinstance(exc.__cause__, ImportError) or str(exc).startswith("Error locating target"):
            raise UserError(f"{where}cannot find _target_ {target}; check its spelling or pick another config "
                            f"file{f' ({key}=<name>)' if key else ''}") from None
        raise


def corrections(value: Any, allowed: Iterable[str] = CORRECTIONS, key: str = "merge.correction") -> list[str]:
    """``merge.correction`` as a list of names (one name or a list; each merge is reported once per correction),
    refusing unknown or unsupported ones."""
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    allowed = tuple(allowed)
    if not names or any(n not in allowed for n in names):
        shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        raise UserError(f"{key}={shown} is not a list of {' | '.join(allowed)}; e.g. {key}=[{','.join(allowed)}]")
    return [str(n) for n in names]


# Multirun folders are <job number>_<overrides>, written with item_sep '+' and kv_sep '-' (conf/common.yaml) and
# passed through this resolver, so that a folder name holds only characters that Hydra's override parser, the shell
# and glob all read literally: a path copied from outputs/<task>-multirun/ works in models=[...] as it is.
_DIRNAME_KEEP = re.compile(r"[^A-Za-z0-9_.+@%-]")
_DIRNAME_DROP = re.compile(r"[\[\](){}'\"]")


def safe_dirname(text: str) -> str:
    """``ema.decays-[0.9,0.99]+seed-1`` -> ``ema.decays-0.9_0.99+seed-1``: brackets and quotes dropped, every
    other character outside letters, digits and ``_ . + @ % -`` (a list's comma, a space, ``/``, ``=``...) -> ``_``."""
    return _DIRNAME_KEEP.sub("_", _DIRNAME_DROP.sub("", str(text)))


if not OmegaConf.has_resolver("mergelab.dirname"):
    OmegaConf.register_new_resolver("mergelab.dirname", safe_dirname)


# ------------------------------------------------------------------------------------------------ training settings
PRECISIONS = ("fp32", "bf16")
EMA_BUFFERS = ("average", "copy")


def check_training(cfg: DictConfig) -> None:
    """Refuse training settings that would train nothing or fail deep inside torch, each with the one line that
    names the key and a valid value: ``train`` (epochs, batch sizes, label smoothing, gradient clipping, precision,
    log interval), ``optimizer`` (lr, weight decay, momentum), ``scheduler.warmup`` and ``ema`` (decays, every,
    buffers)."""
    train = cfg.train
    whole(train.epochs, "train.epochs", 1, "e.g. train.epochs=10")
    for key in ("batch_size", "eval_batch_size", "log_every"):
        if key in train:
            whole(train[key], f"train.{key}", 1, f"e.g. train.{key}=64" if "batch" in key else "")
    number(train.get("label_smoothing", 0.0), "train.label_smoothing", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    if train.get("grad_clip") is not None:
        number(train.grad_clip, "train.grad_clip", lambda v: v > 0, "a positive norm, or null for no clipping")
    if train.get("precision", "fp32") not in PRECISIONS:
        raise UserError(f"train.precision={train.precision} is not one of {' | '.join(PRECISIONS)}")
    optimizer = cfg.get("optimizer") or {}
    if "lr" in optimizer:
        number(optimizer.lr, "optimizer.lr", lambda v: v > 0, "positive, e.g. optimizer.lr=0.05")
    if "weight_decay" in optimizer:
        number(optimizer.weight_decay, "optimizer.weight_decay", lambda v: v >= 0, ">= 0")
    if "momentum" in optimizer:
        number(optimizer.momentum, "optimizer.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    scheduler = cfg.get("scheduler") or {}
    if "warmup" in scheduler:
        number(scheduler.warmup, "scheduler.warmup", lambda v: v >= 0,
                ">= 0 (a fraction of all steps below 1, else a number of steps)")
    ema = cfg.get("ema") or {}
    for decay in ema.get("decays") or []:
        number(decay, "ema.decays", lambda v: 0 <= v < 1, "each in [0, 1), e.g. ema.decays=[0.999]")
    averaged = OmegaConf.select(cfg, "averaged.decay")
    if averaged is not None:
        number(averaged, "averaged.decay", lambda v: 0 <= v < 1, "in [0, 1)")
    if "every" in ema:
        whole(ema.every, "ema.every", 1, "1 updates after every step")
    if ema.get("buffers", "average") not in EMA_BUFFERS:
        raise UserError(f"ema.buffers={ema.buffers} is not one of {' | '.join(EMA_BUFFERS)}")


def whole(value: Any, key: str, low: int, hint: str = "") -> None:
    """Refuse ``key=value`` unless it is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{key}={value} must be a whole number >= {low}{'; ' + hint if hint else ''}")


def number(value: Any, key: str, ok: Callable[[float], bool], allowed: str) -> None:
    """Refuse ``key=value`` unless it is a number (not NaN) for which ``ok`` holds; ``allowed`` says which are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not ok(value):
        raise UserError(f"{key}={value} must be {allowed}")
