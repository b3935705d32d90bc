"""Checkpoints: safetensors weights plus JSON metadata, written atomically, loaded without unpickling.

A checkpoint ``name.safetensors`` carries its metadata twice: inside the safetensors header (authoritative, so the
file is self-describing and cannot disagree with itself) and in a ``name.json`` sidecar for people and tools.
Nested training state (optimizer, scheduler, RNG) is stored the same way: its tensors go into the safetensors file
and the structure around them into JSON (``flatten_state`` / ``unflatten_state``), so loading never runs code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

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
