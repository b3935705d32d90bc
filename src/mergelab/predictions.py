"""Predictions for an unlabelled image folder as CSV, and hard voting over several prediction CSVs.

The competition workflow of the model-soups write-ups: predict the test images with a soup (or an ensemble), write
``image,prediction,label``, then combine the CSVs of several models by majority vote.
"""

from __future__ import annotations

import csv
import glob
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image, UnidentifiedImageError

from mergelab.errors import UserError
from mergelab.evaluation import predict
from mergelab.merging.soups import hard_vote, logit_ensemble

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_folder(folder: Path, channels: int, size: int) -> tuple[list[str], torch.Tensor]:
    """Every image file directly in ``folder`` (sorted by name) as N x C x size x size floats in 0..1."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UserError(f"no images in {folder}; predict.folder must hold image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        try:
            image = Image.open(path).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {path} ({exc}); remove it from {folder}") from None
        tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, channels)
        images.append(tensor.permute(2, 0, 1).float() / 255)
    return [p.name for p in files], torch.stack(images)


def normaliser(batches):
    """The per-channel affine map of the data set's in-memory batches, for images on the 0..1 scale."""
    if not hasattr(batches, "mean") or not hasattr(batches, "images") or isinstance(batches.images, list):
        raise UserError("predict.folder needs an in-memory data set (dataset.in_memory=true)")
    scale = 255.0 if batches.images.dtype == torch.uint8 else 1.0
    mean, std = batches.mean.cpu() / scale, batches.std.cpu() / scale
    return lambda x: (x - mean) / std


def folder_batches(x: torch.Tensor, device: torch.device, batch_size: int = 1024) -> list[tuple]:
    return [(chunk.to(device), torch.zeros(len(chunk), dtype=torch.long, device=device))
            for chunk in x.split(batch_size)]


def predict_folder(study, folder: Path, methods: list[str]) -> None:
    """Write ``predictions/<method>.csv`` for each method: a weight-space soup of the study, ``best``,
    ``ensemble`` (mean logits of every ingredient) or ``vote`` (hard vote of every ingredient)."""
    data, model, device = study.scorer.data, study.scorer.model, study.ctx.device
    names, x = read_folder(folder, data.in_channels, data.image_size)
    batches = folder_batches(normaliser(data.val)(x), device)
    out = study.ctx.run_dir / "predictions"

    def logits_of(state):
        model.load_state_dict(state)
        study.scorer.loaded = None  # the evaluation model no longer holds what the scorer last loaded
        return predict(model, batches)[0]

    for method in methods:
        if method in study.states:
            labels = logits_of(study.states[method]).argmax(1)
        elif method in ("ensemble", "vote"):
            each = [logits_of(state) for state in study.population.states()]
            labels = (logit_ensemble(each).argmax(1) if method == "ensemble"
                      else hard_vote(torch.stack([e.argmax(1) for e in each]), data.num_classes))
        else:
            raise UserError(f"predict.methods has {method!r}; choose among {sorted(study.states)}, ensemble, vote")
        write_csv(out / f"{method}.csv", names, labels.tolist(), [data.classes[i] for i in labels.tolist()])


def write_csv(path: Path, names: list[str], predictions: list[int], labels: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prediction", "label"])
        writer.writerows(zip(names, predictions, labels))


def read_csv(path: Path) -> dict[str, str]:
    """``{image: label}`` of a prediction CSV (columns image and label, or image and prediction)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prediction CSV {path} ({exc})") from None
    column = "label" if rows and "label" in rows[0] else "prediction"
    if not rows or "image" not in rows[0] or column not in rows[0]:
        raise UserError(f"{path} is not a prediction CSV: it needs the columns image and label (or prediction)")
    return {row["image"]: row[column] for row in rows}


def vote_csvs(specs: str | Iterable[str], out: Path) -> dict:
    """Hard vote over prediction CSVs: per image the most frequent label; a tie goes to the tied label of the
    earliest CSV in sorted path order, so the result depends only on the files."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    paths = sorted({Path(p) for spec in specs for p in glob.glob(str(spec), recursive=True)})
    if len(paths) < 2:
        raise UserError(f"hard voting needs at least two prediction CSVs; {specs} matches {len(paths)}")
    tables = [read_csv(p) for p in paths]
    for path, table in zip(paths[1:], tables[1:]):
        if table.keys() != tables[0].keys():
            raise UserError(f"{path} predicts other images than {paths[0]}; vote over CSVs of one image folder")
    names = list(tables[0])
    winners = []
    for name in names:
        votes = Counter(t[name] for t in tables)
        top = max(votes.values())
        winners.append(next(t[name] for t in tables if votes[t[name]] == top))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows(zip(names, winners))
    return {"task": "soup", "metrics": {}, "vote_csv": str(out), "voters": [str(p) for p in paths]}
