"""Populations of checkpoints: resolving globs of files or run folders, and rebuilding models from checkpoints."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from mergelab.checkpoints import load_checkpoint, read_meta
from mergelab.errors import UserError

# Keys of a model config that fetch weights when the model is built; a checkpoint already holds the weights.
_WEIGHT_SOURCES = {"pretrained": False, "weights": None}


def resolve_checkpoints(specs: str | Iterable[str], which: str = "last") -> list[Path]:
    """Expand globs of checkpoint files or run folders into checkpoint paths, sorted, duplicates removed.

    A run folder (or a folder matched by a glob) stands for ``<folder>/checkpoints/<which>.safetensors``.
    """
    if isinstance(specs, str):
        specs = [specs]
    found: list[Path] = []
    for spec in specs:
        matches = sorted(glob.glob(str(spec), recursive=True))
        if not matches:
            raise UserError(f"no checkpoint or run folder matches {spec!r}; check the glob (quote it in the shell)")
        for match in map(Path, matches):
            if match.is_dir():
                candidate = match / "checkpoints" / f"{which}.safetensors"
                if not candidate.is_file():
                    if (match / ".hydra").is_dir() or (match / "checkpoints").is_dir():
                        raise UserError(f"run folder {match} has no checkpoints/{which}.safetensors; "
                                        "did the run finish?")
                    continue  # a folder that is not a run (e.g. a multirun's own .submitit or logs)
                match = candidate
            if match.suffix == ".safetensors":
                found.append(match)
    found = list(dict.fromkeys(found))
    if not found:
        raise UserError(f"no .safetensors checkpoint found in {list(specs)}; point to checkpoint files or run folders")
    return found


def model_from_meta(meta: dict, path: str | Path = "checkpoint") -> nn.Module:
    """A freshly initialised model of the architecture recorded in a checkpoint's metadata."""
    from mergelab.models import build_model

    try:
        model_cfg = {**meta["model"], **{k: v for k, v in _WEIGHT_SOURCES.items() if k in meta["model"]}}
        return build_model(model_cfg, meta["num_classes"], meta["in_channels"], meta["image_size"])
    except KeyError as exc:
        raise UserError(f"{path} has no mergelab metadata ({exc} missing); it was not written by mergelab") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a mergelab checkpoint; returns ``(model, meta)``."""
    tensors, meta = load_checkpoint(path)
    model = model_from_meta(meta, path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} does not fit its own model config ({first}); the file is damaged") from None
    return model.to(device), meta


def architecture(meta: dict) -> dict:
    """What must agree for two checkpoints to be averaged: the model config and the shape of its inputs/outputs."""
    model = {k: v for k, v in meta.get("model", {}).items() if k not in _WEIGHT_SOURCES}
    return {"model": model, **{k: meta.get(k) for k in ("num_classes", "in_channels", "image_size")}}


def check_same_architecture(paths: list[Path]) -> list[dict]:
    """Read every checkpoint's metadata; raise naming the first file whose architecture differs from the first's."""
    metas = [read_meta(p) for p in paths]
    reference = architecture(metas[0])
    for path, meta in zip(paths[1:], metas[1:]):
        if architecture(meta) != reference:
            raise UserError(f"cannot merge {path}: its architecture {architecture(meta)} differs from "
                            f"{paths[0]}'s {reference}")
    return metas
