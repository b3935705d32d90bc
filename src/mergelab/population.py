"""Populations of checkpoints: resolving globs, reading checkpoints from anywhere, and rebuilding their models.

This is the one loader of every merging script (soup.py ``ingredients=``, fuse.py and zip.py ``models=``).
A population member is a checkpoint whose architecture is known: from its mergelab metadata, or, for weights written
elsewhere (plain safetensors, weights-only ``.pt``/``.pth``/``.bin`` state dicts, sharded safetensors folders; see
:func:`mergelab.checkpoints.open_weights`), from the command line (``model=... dataset=...``). Every member is checked
against a model of that architecture when opened (common key prefixes ``module.``, ``model.``, ``net.`` are
stripped or added as needed), so a merge never starts on weights that do not fit. Tensors stay on disk until asked
for, one at a time (:meth:`Member.tensor`), which is what lets merges stream.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mergelab.checkpoints import INDEX_SUFFIX, WEIGHT_SUFFIXES, WeightReader, open_weights
from mergelab.errors import UserError

# Keys of a model config that fetch weights when the model is built; a checkpoint already holds the weights.
_WEIGHT_SOURCES = {"pretrained": False, "weights": None}
# Prefixes that wrappers add to every key: DistributedDataParallel (module.), Lightning and EMA wrappers (model.),
# and mergelab's own TimmModel (net.), whose checkpoints then load into a bare timm model and vice versa.
PREFIXES = ("module.", "model.", "net.")


def resolve_checkpoints(specs: str | Iterable[str], which: str = "last") -> list[Path]:
    """Expand globs of checkpoint files, run folders and sharded folders into paths, sorted, duplicates removed.

    A run folder (or a folder matched by a glob) stands for ``<folder>/checkpoints/<which>.safetensors``; a folder
    holding a ``*.safetensors.index.json`` stands for its shards. Files count when they end in one of
    ``WEIGHT_SUFFIXES``.
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
                if any(match.glob(f"*{INDEX_SUFFIX}")):
                    found.append(match)
                    continue
                candidate = match / "checkpoints" / f"{which}.safetensors"
                if not candidate.is_file():
                    if (match / ".hydra").is_dir() or (match / "checkpoints").is_dir():
                        raise UserError(f"run folder {match} has no checkpoints/{which}.safetensors; "
                                        "did the run finish?")
                    continue  # a folder that is not a run (e.g. a multirun's own .submitit or logs)
                match = candidate
            if match.suffix in WEIGHT_SUFFIXES:
                found.append(match)
    found = list(dict.fromkeys(found))
    if not found:
        raise UserError(f"no checkpoint found in {list(specs)}; point to run folders, weight files "
                        f"({', '.join(WEIGHT_SUFFIXES)}) or sharded safetensors folders")
    return found


def model_from_meta(meta: dict, path: str | Path = "checkpoint") -> nn.Module:
    """A freshly initialised model of the architecture recorded in a checkpoint's metadata."""
    from mergelab.models import build_model

    try:
        model_cfg = {**meta["model"], **{k: v for k, v in _WEIGHT_SOURCES.items() if k in meta["model"]}}
        return build_model(model_cfg, meta["num_classes"], meta["in_channels"], meta["image_size"])
    except KeyError as exc:
        raise UserError(f"{path} has no mergelab metadata ({exc} missing); it was not written by mergelab") from None


def load_model(path: str | Path, device: str | torch.device = "cpu",
               cfg: DictConfig | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a checkpoint (its architecture from its metadata, else from ``cfg``); returns
    ``(model, meta)``."""
    member = open_member(Path(path), cfg)
    return member.model(device), member.meta


def architecture(meta: dict) -> dict:
    """What must agree for two checkpoints to be averaged: the model config and the shape of its inputs/outputs."""
    model = {k: v for k, v in meta.get("model", {}).items() if k not in _WEIGHT_SOURCES}
    return {"model": model, **{k: meta.get(k) for k in ("num_classes", "in_channels", "image_size")}}


def check_same_architecture(members: list["Member"]) -> list[dict]:
    """Raise naming the first member whose architecture differs from the first's; returns the metadata."""
    reference = architecture(members[0].meta)
    for member in members[1:]:
        if architecture(member.meta) != reference:
            raise UserError(f"cannot merge {member.path}: its architecture {architecture(member.meta)} differs from "
                            f"{members[0].path}'s {reference}")
    return [m.meta for m in members]


# ------------------------------------------------------------------------------------------------------ members
@dataclass
class Member:
    """One checkpoint of a population: a display name, its path, its metadata (mergelab's, or built from the
    command line for foreign weights) and a reader whose key names are the model's."""

    name: str
    path: Path
    meta: dict
    reader: WeightReader

    @property
    def foreign(self) -> bool:
        return bool(self.meta.get("foreign"))

    def keys(self) -> list[str]:
        return self.reader.keys()

    def tensor(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read from disk now (nothing else of the checkpoint is held)."""
        return self.reader.get(key, device)

    def state(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return self.reader.state(device)

    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        model = model_from_meta(self.meta, self.path)
        model.load_state_dict(self.state())
        return model.to(device)


def member_name(path: Path) -> str:
    """A run's folder name for ``<run>/checkpoints/<which>.safetensors``, else the file (or folder) name."""
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def open_member(path: Path, cfg: DictConfig | None = None) -> Member:
    """Open one checkpoint, give it metadata, and check that its keys and shapes fit that model."""
    reader = open_weights(path)
    meta = dict(reader.meta) if "model" in reader.meta else foreign_meta(path, cfg)
    fit(reader, meta, path)
    return Member(member_name(path), path, meta, reader)


def open_population(specs: str | Iterable[str], cfg: DictConfig | None = None, *, which: str = "last",
                    minimum: int = 1, what: str = "merge") -> list[Member]:
    """The population named by ``specs`` (globs of files, run folders or sharded folders), each member opened and
    checked by :func:`open_member`; ``cfg`` (``model`` and ``dataset``) describes checkpoints without metadata."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    paths = resolve_checkpoints(specs, which)
    if len(paths) < minimum:
        raise UserError(f"a {what} needs at least {minimum} checkpoints; {specs} matches only "
                        f"{', '.join(map(str, paths))}")
    return [open_member(path, cfg) for path in paths]


# ------------------------------------------------------------------------------------------ foreign checkpoints
def foreign_meta(path: Path, cfg: DictConfig | None) -> dict:
    """Metadata for weights written elsewhere: the architecture named by ``cfg.model``, the input and output shape
    of ``cfg.dataset``."""
    model_cfg = cfg.get("model") if cfg is not None else None
    if not model_cfg:
        raise UserError(f"{path} has no mergelab metadata, so its architecture is unknown; name it on the command "
                        "line: model=<name> (e.g. model=timm model.name=test_resnet) dataset=<its data set>")
    data = _geometry(cfg.dataset)
    return {"model": OmegaConf.to_container(model_cfg, resolve=True), "num_classes": data["num_classes"],
            "in_channels": data["in_channels"], "image_size": data["image_size"],
            "dataset": {"name": data["name"], "classes": data["classes"]}, "foreign": True,
            "seed": int(cfg.get("seed", 0))}  # unknown: the run's own seed stands for the split it was trained with


_GEOMETRY: dict[str, dict] = {}


def _geometry(dataset_cfg: DictConfig) -> dict:
    """Classes, channels and image side of a data set config (built once per config)."""
    from mergelab.data import build_data

    key = OmegaConf.to_yaml(dataset_cfg)
    if key not in _GEOMETRY:
        data = build_data(dataset_cfg, batch_size=1, eval_batch_size=1, seed=0, device="cpu")
        _GEOMETRY[key] = {"num_classes": data.num_classes, "in_channels": data.in_channels,
                          "image_size": data.image_size, "name": data.name, "classes": list(data.classes)}
    return _GEOMETRY[key]


def expected_shapes(meta: dict, path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of the model ``meta`` describes (built on the meta device: no memory)."""
    try:
        with torch.device("meta"):
            model = model_from_meta(meta, path)
    except (NotImplementedError, RuntimeError):  # an initialiser that cannot run on the meta device
        model = model_from_meta(meta, path)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_prefixes(file_keys: list[str], expected: Iterable[str]) -> dict[str, str]:
    """``{model key: file key}`` after stripping (then adding) the wrapper prefixes that make most keys match."""
    expected = set(expected)
    mapping = {k: k for k in file_keys}

    def hits(m: dict[str, str]) -> int:
        return sum(k in expected for k in m)

    changed = True
    while changed and hits(mapping) < len(mapping):
        changed = False
        for prefix in PREFIXES:
            # A wrapper prefix is on every key; strip it unless that makes fewer keys match (nested wrappers, e.g.
            # module.model., match only once both are gone).
            if all(k.startswith(prefix) for k in mapping):
                stripped = {k.removeprefix(prefix): f for k, f in mapping.items()}
                if hits(stripped) >= hits(mapping):
                    mapping, changed = stripped, True
                    break
    for prefix in PREFIXES:
        added = {prefix + k: f for k, f in mapping.items()}
        if hits(added) > hits(mapping):
            mapping = added
    return {k: f for k, f in mapping.items() if k != f}


def fit(reader: WeightReader, meta: dict, path: Path) -> None:
    """Rename the reader's keys to the model's and check that every key and shape fits; one line if not."""
    expected = expected_shapes(meta, path)
    reader.rename = match_prefixes(reader.file_keys(), expected)
    keys = reader.keys()
    missing = [k for k in expected if k not in set(keys)]
    unexpected = [k for k in keys if k not in expected]
    model = meta["model"].get("name") or meta["model"].get("_target_", "?").rsplit(".", 1)[-1]
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model {model}: {len(missing)} missing keys (first: "
                        f"{missing[:3]}) and {len(unexpected)} unexpected keys (first: {unexpected[:3]}); "
                        "name the architecture it was trained as (model=..., dataset=...)")
    for key in keys:
        if reader.shape(key) != expected[key]:
            raise UserError(f"{path} does not fit the model {model}: {key} has shape {list(reader.shape(key))} in "
                            f"the file but {list(expected[key])} in the model; check model=... and dataset=... "
                            "(dataset.classes sets the number of outputs)")
