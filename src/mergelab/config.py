"""Reading the composed config: building objects from ``_target_`` nodes, and option values shared by several tasks.

Every object built from config goes through :func:`instantiate`, so that bad input raised while building it (a
:class:`~mergelab.errors.UserError` from a constructor, an option the target does not take) reaches the runner as
one line and exit status 2, not as Hydra's multi-line ``InstantiationException``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from mergelab.errors import UserError

# The corrections applied to a merged model before it is scored (``merge.correction``): nothing, BatchNorm
# statistics recomputed on training data (:func:`mergelab.evaluation.recompute_bn`), or REPAIR (Jordan et al. 2023).
CORRECTIONS = ("none", "recompute_bn", "repair")

_UNEXPECTED = re.compile(r"got an unexpected keyword argument '(\w+)'")


def instantiate(node: DictConfig, *args: Any, key: str = "", exclude: Iterable[str] = (), **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, *args, **kwargs)`` without the keys in ``exclude`` (options the caller
    reads itself, e.g. ``merge.correction``). ``key`` is the node's config path (``merge``), named in errors.

    A :class:`UserError` raised by the target comes out as itself; an option the target does not accept becomes a
    :class:`UserError` naming it. Any other failure is a bug and keeps Hydra's exception and traceback.
    """
    exclude = set(exclude)
    if exclude:
        resolved = OmegaConf.to_container(node, resolve=True)  # interpolations need the root, which a copy lacks
        node = OmegaConf.create({k: v for k, v in resolved.items() if k not in exclude})
    try:
        return hydra.utils.instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        unexpected = _UNEXPECTED.search(str(exc))
        if unexpected:
            option = f"{key}.{unexpected.group(1)}" if key else unexpected.group(1)
            raise UserError(f"{option} is not an option of {node.get('_target_')}; see its config file for the "
                            "options it takes") from None
        raise


def corrections(value: Any, allowed: Iterable[str] = CORRECTIONS, key: str = "merge.correction") -> list[str]:
    """``merge.correction`` as a list of names (one name or a list; each merge is reported once per correction),
    refusing unknown or unsupported ones."""
    names = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    allowed = tuple(allowed)
    bad = [str(n) for n in names if n not in allowed]
    if bad or not names:
        raise UserError(f"{key}={OmegaConf.to_container(value) if isinstance(value, ListConfig) else value} is not "
                        f"a list of {' | '.join(allowed)}; e.g. {key}=[{','.join(allowed)}]")
    return [str(n) for n in names]
