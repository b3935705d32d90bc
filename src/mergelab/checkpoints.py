"""Checkpoints: safetensors weights plus JSON metadata, written atomically, loaded without unpickling.

Reading also accepts weights written elsewhere (:func:`open_weights`): a safetensors file without mergelab
metadata, a ``torch.load(weights_only=True)`` state dict (``.pt``/``.pth``/``.bin``, optionally nested under
``state_dict`` or ``model``), or a sharded safetensors folder with its ``*.safetensors.index.json``. Readers hand
out one tensor at a time, so a merge can stream tensors without holding whole models.

A checkpoint ``name.safetensors`` carries its metadata twice: inside the safetensors header (authoritative, so the
file is self-describing and cannot disagree with itself) and in a ``name.json`` sidecar for people and tools.
Nested training state (optimizer, scheduler, RNG) is stored the same way: its tensors go into the safetensors file
and the structure around them into JSON (``flatten_state`` / ``unflatten_state``), so loading never runs code.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from mergelab.errors import UserError

META_KEY = "mergelab"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one: ``os.replace`` is atomic on
    POSIX and Windows when both paths are on one file system, which a sibling temporary file guarantees.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) to ``path`` (.safetensors) and its .json sidecar."""
    path = Path(path)
    meta = meta or {}
    meta_json = json.dumps(meta, default=_json_default)
    # safetensors refuses views and shared storage: give it compact, owned CPU copies.
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={META_KEY: meta_json}))
    write_json(path.with_suffix(".json"), meta)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any safetensors file: its metadata is then {})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path or glob")
    try:
        tensors = load_file(str(path), device=str(device))
        return tensors, read_meta(path)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"corrupt checkpoint {path} ({exc}); delete it or point to another file") from None


def read_meta(path: str | Path) -> dict:
    """The metadata of a checkpoint, read from its safetensors header without loading the tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"corrupt checkpoint {path} ({exc}); delete it or point to another file") from None
    return json.loads(raw) if raw else {}


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure of dicts, lists and tensors into ``(tensors, skeleton)``.

    The skeleton is JSON: every tensor is replaced by ``{"__tensor__": key}`` and ``key`` indexes ``tensors``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node
            return {"__tensor__": key}
        if isinstance(node, dict):
            # JSON object keys are strings; remember int keys (optimizer state is keyed by parameter index).
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(node)]
        return node

    skeleton = walk(obj, prefix)
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        return {k: unflatten_state(tensors, v) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, v) for v in skeleton]
    return skeleton


# --------------------------------------------------------------------------------------- weights from anywhere
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
NESTED_KEYS = ("state_dict", "model")  # where training scripts commonly nest the state dict in a .pt file
INDEX_SUFFIX = ".safetensors.index.json"


class WeightReader:
    """The tensors of one checkpoint, read one at a time: ``keys()``, ``shape(key)``, ``get(key)``, ``meta``.

    ``rename`` maps the model's key to the file's (prefix stripping); :meth:`get` takes the model's key.
    """

    path: Path
    meta: dict

    def file_keys(self) -> list[str]:
        raise NotImplementedError

    def file_shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def file_get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def __init__(self) -> None:
        self.rename: dict[str, str] = {}

    def keys(self) -> list[str]:
        inverse = {v: k for k, v in self.rename.items()}
        return [inverse.get(k, k) for k in self.file_keys()]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_shape(self.rename.get(key, key))

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.file_get(self.rename.get(key, key)).to(device)

    def state(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor, under the model's key names."""
        return {key: self.get(key, device) for key in self.keys()}


class SafetensorsReader(WeightReader):
    """One safetensors file. Each :meth:`get` maps the file, copies one tensor out and unmaps it again: pages of a
    mapping that stays open count in the process's resident memory once touched, so a merge of N files kept open
    would grow to N models however it streamed (measured by bench/stream_memory.py)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get(META_KEY)
                self.meta = json.loads(raw) if raw else {}
                self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise UserError(f"corrupt checkpoint {path} ({exc}); delete it or point to another file") from None

    def file_keys(self) -> list[str]:
        return list(self.shapes)

    def file_shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]

    def file_get(self, key: str) -> torch.Tensor:
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"corrupt checkpoint {self.path} ({exc}); delete it or point to another file") from None


class ShardedReader(WeightReader):
    """A folder of safetensors shards and the ``*.safetensors.index.json`` whose ``weight_map`` names each
    tensor's shard (the Hugging Face layout)."""

    def __init__(self, index: Path):
        super().__init__()
        self.path = index
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a safetensors index ({exc!r}); it needs a weight_map") from None
        self.shards = {name: SafetensorsReader(index.parent / name) for name in sorted(set(weight_map.values()))
                       if _exists(index.parent / name, index)}
        self.where = {key: self.shards[name] for key, name in weight_map.items()}
        self.meta = next((s.meta for s in self.shards.values() if s.meta), {})

    def file_keys(self) -> list[str]:
        return list(self.where)

    def file_shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].file_shape(key)

    def file_get(self, key: str) -> torch.Tensor:
        return self.where[key].file_get(key)


def _exists(shard: Path, index: Path) -> bool:
    if not shard.is_file():
        raise UserError(f"shard {shard.name} listed in {index} is missing; copy every shard next to the index")
    return True


class TorchReader(WeightReader):
    """A ``torch.load(weights_only=True)`` state dict, memory-mapped when the file is in torch's zip format."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.meta = path, {}
        self.tensors = read_torch_state(path)

    def file_keys(self) -> list[str]:
        return list(self.tensors)

    def file_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def file_get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with ``torch.save``, loaded with ``weights_only=True`` (never unpickling objects), taken
    from under ``state_dict`` or ``model`` when nested there."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as exc:
        # torch's own messages run over many lines and advise weights_only=False, which would run the file's code:
        # say in one line what the file holds instead.
        text = str(exc).strip()
        if "Unsupported global" in text:
            raise UserError(f"{path} holds objects other than tensors, so it was not loaded (only weights-only state "
                            "dicts are read); save its state_dict() alone, or as safetensors") from None
        detail = text.split("WeightsUnpickler error:")[-1].strip()
        first = detail.splitlines()[0] if detail else type(exc).__name__
        raise UserError(f"cannot read weights file {path} ({first}); is it a torch state dict?") from None
    for key in NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) and _tensors_only(obj[key]):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not _tensors_only(obj):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors, possibly under "
                        f"{' or '.join(NESTED_KEYS)}); save model.state_dict()")
    return dict(obj)


def _tensors_only(mapping: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def open_weights(path: str | Path) -> WeightReader:
    """A reader for a weights file or a sharded safetensors folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) != 1:
            raise UserError(f"{path} is a folder without exactly one *{INDEX_SUFFIX} (found {len(indexes)}); "
                            "point to a weights file or a sharded safetensors folder")
        return ShardedReader(indexes[0])
    if path.name.endswith(INDEX_SUFFIX):
        return ShardedReader(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; check the path or glob")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in WEIGHT_SUFFIXES:
        return TorchReader(path)
    raise UserError(f"{path} is not a weights file; use {', '.join(WEIGHT_SUFFIXES)} or a sharded safetensors folder")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file or sharded folder (file key names), without unpickling."""
    return open_weights(path).state()
