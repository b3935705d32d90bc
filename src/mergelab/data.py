"""Data sets as batches on the device: train/val/test splits, class subsets (tasks), resizing, augmentation.

Small data sets live on the device as tensors and are batched by indexing with a per-epoch permutation, with
augmentation as a few batched tensor ops (airbench style). Large ones (image folders, or ``in_memory=false``) go
through a DataLoader with torchvision transforms. Either way the seed and the epoch number fix every random choice,
so a resumed run sees exactly the batches an uninterrupted one would, and the global RNG is never used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import sklearn.datasets
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import default_loader

from mergelab.config import instantiate
from mergelab.errors import UserError

# Seeds the splits that every run and script must share whatever its own seed: digits' test split and the
# max_train_samples / max_test_samples subsamples.
SPLIT_SEED = 0
CHUNK = 4096  # images per step when converting or measuring a tensor set, so no float copy of all of it is needed
STATS_SAMPLES = 1000  # files decoded to estimate mean/std when an image folder is read lazily

# Every dataset option and its value when a config leaves it out; any other key is a user error (a typo).
DEFAULTS = {
    "name": None,
    "split_seed": SPLIT_SEED,  # seeds the train/val split; null = the run seed
    "source": None,
    "root": "data",
    "download": False,
    "val_fraction": 0.1,
    "classes": None,
    "domain": None,
    "image_size": None,
    "channels": None,
    "augment": False,
    "crop_padding": 0,
    "padding_mode": "reflect",
    "flip": False,
    "balanced": False,
    "in_memory": "auto",
    "num_workers": 2,
    "max_train_samples": None,
    "max_test_samples": None,
    "mean": None,
    "std": None,
}

# Loaders for configs that give a known ``name`` but no ``source`` (plain dicts in tests and scripts).
SOURCES = {
    "digits": "mergelab.data.load_digits",
    "mnist": "mergelab.data.load_mnist",
    "fashion_mnist": "mergelab.data.load_fashion_mnist",
    "cifar10": "mergelab.data.load_cifar10",
    "cifar100": "mergelab.data.load_cifar100",
    "imagefolder": "mergelab.data.load_imagefolder",
}


@dataclass
class Images:
    """One split: images and their integer labels.

    ``images`` is an N x C x H x W tensor (uint8 in 0..255, or float in 0..1) or a list of image file paths.
    """

    images: torch.Tensor | list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> Images:
        """The samples at ``index``, in that order."""
        if isinstance(self.images, list):
            return Images([self.images[i] for i in index.tolist()], self.labels[index])
        return Images(self.images[index], self.labels[index])


@dataclass
class Source:
    """The official train and test splits of a data set, as its loader returns them."""

    train: Images
    test: Images
    num_classes: int


# ----------------------------------------------------------------------------------------------------------- sources


def load_digits(root: str, download: bool) -> Source:
    """sklearn's 1797 8x8 digits, split 80/20 into train/test (stratified, seeded with SPLIT_SEED).

    The data ship with sklearn, so ``root`` and ``download`` are unused. The split ignores the run seed so that every
    run and every script sees the same test set.
    """
    bunch = sklearn.datasets.load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16  # pixel values are 0..16
    every = Images(images, torch.tensor(bunch.target, dtype=torch.int64))
    train, test = stratified_split(every.labels, round(0.2 * len(every)), SPLIT_SEED)
    return Source(every.take(train), every.take(test), num_classes=10)


def load_mnist(root: str, download: bool) -> Source:
    """MNIST from ``root/MNIST/raw`` (torchvision layout)."""
    return _load_torchvision(torchvision.datasets.MNIST, "MNIST", os.path.join(root, "MNIST"), root, download)


def load_fashion_mnist(root: str, download: bool) -> Source:
    """Fashion-MNIST from ``root/FashionMNIST/raw`` (torchvision layout)."""
    folder = os.path.join(root, "FashionMNIST")
    return _load_torchvision(torchvision.datasets.FashionMNIST, "Fashion-MNIST", folder, root, download)


def load_cifar10(root: str, download: bool) -> Source:
    """CIFAR-10 from the pickled batches in ``root/cifar-10-batches-py``."""
    folder = os.path.join(root, "cifar-10-batches-py")
    return _load_torchvision(torchvision.datasets.CIFAR10, "CIFAR-10", folder, root, download)


def load_cifar100(root: str, download: bool) -> Source:
    """CIFAR-100 (fine labels) from the pickles in ``root/cifar-100-python``."""
    folder = os.path.join(root, "cifar-100-python")
    return _load_torchvision(torchvision.datasets.CIFAR100, "CIFAR-100", folder, root, download)


def load_imagefolder(root: str, download: bool) -> Source:
    """Images under ``root/train/<class>/`` and ``root/test/<class>/`` (or ``root/val/``), kept as file paths.

    There is nothing to download, so ``download`` is unused. Both splits must have the same class folders.
    """
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise UserError(
            f"image folder not found: {root} needs train/ and test/ (or val/) subfolders; "
            "set dataset.root=<folder with them>"
        )
    train_classes, train = _read_image_folder(train_dir)
    test_classes, test = _read_image_folder(test_dir)
    if train_classes != test_classes:
        raise UserError(f"{train_dir} and {test_dir} have different class folders; give both the same ones")
    return Source(train, test, num_classes=len(train_classes))


def _load_torchvision(cls: type, title: str, folder: str, root: str, download: bool) -> Source:
    """Both splits of a torchvision data set with ``.data`` and ``.targets``, as uint8 N x C x H x W tensors."""
    try:
        splits = [cls(root, train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as err:
        if download:
            reason = " ".join(str(err).split())
            raise UserError(f"{title} download into {folder} failed ({reason}); put the files there by hand") from err
        raise UserError(
            f"{title} not found or corrupted under {folder}; "
            "set dataset.download=true or dataset.root=<folder with the files>"
        ) from err
    train, test = (Images(_as_nchw(torch.as_tensor(s.data)), torch.as_tensor(s.targets)) for s in splits)
    return Source(train, test, num_classes=len(splits[0].classes))


def _as_nchw(data: torch.Tensor) -> torch.Tensor:
    """MNIST-style N x H x W or CIFAR-style N x H x W x C images as N x C x H x W."""
    if data.ndim == 3:
        return data.unsqueeze(1)
    return data.permute(0, 3, 1, 2).contiguous()


def _read_image_folder(path: str) -> tuple[list[str], Images]:
    """The class names and the (file path, label) samples of one ImageFolder split."""
    try:
        folder = torchvision.datasets.ImageFolder(path)
    except FileNotFoundError as err:
        raise UserError(f"no images in class folders under {path}; put them in {path}/<class name>/") from err
    paths, labels = zip(*folder.samples)
    return folder.classes, Images(list(paths), torch.tensor(labels, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ splits and subsets


def stratified_split(labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample positions into sorted ``(kept, held)``, holding out ``count`` samples in class proportions.

    Each class gives its exact share rounded by largest remainder, so it is within one sample of its share and the
    total is exactly ``count``; which samples of a class are held is a permutation seeded with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    classes, sizes = labels.unique(return_counts=True)
    share = sizes.double() * count / max(len(labels), 1)
    quota = share.floor().long()
    largest_remainders = (share - quota).argsort(descending=True, stable=True)
    quota[largest_remainders[: count - int(quota.sum())]] += 1
    held = [torch.empty(0, dtype=torch.int64)]
    for label, size in zip(classes.tolist(), quota.tolist()):
        members = (labels == label).nonzero().squeeze(1)
        held.append(members[torch.randperm(len(members), generator=generator)[:size]])
    is_held = torch.zeros(len(labels), dtype=torch.bool)
    is_held[torch.cat(held)] = True
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)


def select_classes(split: Images, classes: list[int], num_classes: int) -> Images:
    """The samples whose label is in ``classes``, relabelled so that label ``classes[i]`` becomes ``i``."""
    table = torch.full((num_classes,), -1, dtype=torch.int64)
    table[classes] = torch.arange(len(classes))
    new_labels = table[split.labels]
    kept = (new_labels >= 0).nonzero().squeeze(1)
    return Images(split.take(kept).images, new_labels[kept])


def _subsample(split: Images, max_samples: int | None) -> Images:
    """At most ``max_samples`` samples, chosen stratified with SPLIT_SEED, in their original order."""
    if max_samples is None or max_samples >= len(split):
        return split
    return split.take(stratified_split(split.labels, max_samples, SPLIT_SEED)[1])


# -------------------------------------------------------------------------------------------- conversion and scaling


def convert_images(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """N x C x H x W images with ``channels`` channels and ``size`` x ``size`` pixels, in the input's dtype.

    Grayscale becomes RGB by repeating, RGB becomes grayscale by luminance; resizing is bilinear and antialiased.
    None keeps the native value.
    """
    if channels in (None, images.shape[1]) and size in (None, images.shape[-1]):
        return images  # sources give square images, so the native size needs no resize
    return torch.cat([_convert_chunk(chunk, channels, size) for chunk in images.split(CHUNK)])


def _convert_chunk(x: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """One chunk of ``convert_images``."""
    # Drop channels before resizing and add them after, so the resize works on as few channels as possible.
    if channels == 1 and x.shape[1] == 3:
        x = TF.rgb_to_grayscale(x)
    if size is not None:
        x = TF.resize(x, [size, size], antialias=True)
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of N x C x H x W images, on the 0..1 scale."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for chunk in images.split(CHUNK):
        x = chunk.float()
        total += x.sum((0, 2, 3)).double().cpu()
        squares += x.square().sum((0, 2, 3)).double().cpu()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    scale = _scale(images)
    return (mean / scale).tolist(), (std / scale).tolist()


def _scale(images: torch.Tensor) -> float:
    """The value of a white pixel in this storage: 255 for uint8, 1 for float."""
    return 255.0 if images.dtype == torch.uint8 else 1.0


def _file_transform(size: int, channels: int | None, *, augment: bool, flip: bool) -> T.Compose:
    """RGB PIL image -> uint8 tensor, ``size`` x ``size``: resize and centre crop, or a random resized crop."""
    if augment:
        crop = [T.RandomResizedCrop(size, antialias=True), *([T.RandomHorizontalFlip()] if flip else [])]
    else:
        crop = [T.Resize(size, antialias=True), T.CenterCrop(size)]
    return T.Compose([*crop, T.PILToTensor(), *([T.Grayscale(1)] if channels == 1 else [])])


def _decode_all(paths: list[str], options: DictConfig) -> torch.Tensor:
    """The image files as one uint8 N x C x size x size tensor, without augmentation."""
    decode = _file_transform(options.image_size, options.channels, augment=False, flip=False)
    return torch.stack([decode(default_loader(path)) for path in paths])


# --------------------------------------------------------------------------------------------------------- batching


class Batches:
    """The batches of one split, one epoch at a time: iterating gives ``(x, y)`` on the device.

    ``x`` is float32 N x C x H x W and normalised, ``y`` int64 labels. The order and augmentation of epoch ``e``
    depend only on ``(seed, e)``; call ``set_epoch(e)`` before iterating. ``indices`` are the split's positions in
    the (class-selected) training or test set, ``labels`` their labels, both on the CPU.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        indices: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = False,
        balanced: bool = False,
        drop_last: bool = False,
    ):
        self.indices = indices
        self.labels = labels[indices]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.balanced = balanced
        # A split smaller than one batch still gives one batch rather than none.
        self.drop_last = drop_last and len(indices) >= batch_size
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration give epoch ``epoch``'s batches."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = self._order(generator).split(self.batch_size)[: len(self)]
        return self._iterate(list(batches), generator)

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        """This epoch's positions in the split: fixed, shuffled, or drawn with replacement at 1/class_count."""
        if self.balanced:
            weights = 1.0 / torch.bincount(self.labels).double()[self.labels]
            return torch.multinomial(weights, self.num_samples, replacement=True, generator=generator)
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=generator)
        return torch.arange(self.num_samples)

    def _iterate(self, batches: list[torch.Tensor], generator: torch.Generator):
        """The ``(x, y)`` pairs of the given batches of positions; ``generator`` drives augmentation."""
        raise NotImplementedError


@dataclass(frozen=True)
class CropFlip:
    """Batched augmentation: a random crop from a ``padding``-padded copy, and a random horizontal flip."""

    padding: int
    padding_mode: str  # "reflect" or "zeros"
    flip: bool

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.padding:
            x = self._crop(x, generator)
        if self.flip:
            flipped = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(flipped[:, None, None, None], x.flip(3), x)
        return x

    def _crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        mode = "reflect" if self.padding_mode == "reflect" else "constant"
        padded = F.pad(x, (self.padding,) * 4, mode=mode)
        dy, dx = torch.randint(0, 2 * self.padding + 1, (2, n, 1), generator=generator).to(x.device)
        rows = dy + torch.arange(height, device=x.device)
        cols = dx + torch.arange(width, device=x.device)
        # One gather for the whole batch: sample i, every channel, its own window of rows and columns.
        crops = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return crops.permute(0, 3, 1, 2).contiguous()


class TensorBatches(Batches):
    """Batches cut by indexing tensors already on the device; augmentation and normalisation per batch."""

    def __init__(
        self,
        split: Images,
        indices: torch.Tensor,
        *,
        mean: list[float],
        std: list[float],
        device: torch.device,
        augment: CropFlip | None = None,
        **options,
    ):
        super().__init__(split.labels, indices, **options)
        self.images = split.images
        self.device_indices = indices.to(device)
        self.device_labels = self.labels.to(device)
        # Normalise in the storage's units (0..255 for uint8) so a batch needs one subtraction and one division.
        scale = _scale(split.images)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * scale
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * scale
        self.augment = augment

    def _iterate(self, batches, generator):
        if not batches:
            return
        # Move the epoch's order to the device once rather than batch by batch.
        sizes = [len(positions) for positions in batches]
        for positions in torch.cat(batches).to(self.device_indices.device).split(sizes):
            x = self.images[self.device_indices[positions]].float()
            if self.augment is not None:
                x = self.augment(x, generator)
            yield (x - self.mean) / self.std, self.device_labels[positions]


class SeededImages(Dataset):
    """Images (tensors or files) with a transform, indexed by ``(index, seed)``.

    The transform's randomness comes from ``seed`` alone, in a forked RNG, so augmentation depends neither on the
    number of workers nor on the global RNG.
    """

    def __init__(self, split: Images, transform: Callable):
        self.split = split
        self.transform = transform

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        image = self.split.images[index]
        if isinstance(image, str):
            image = default_loader(image)
        # Transforms draw from the CPU default generator; seeding it alone (not torch.manual_seed, which also queues
        # every accelerator's seeding) keeps this cheap.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(image), self.split.labels[index]


class LoaderBatches(Batches):
    """Batches read by a DataLoader (workers, pinned memory) and moved to the device as they arrive."""

    def __init__(
        self, dataset: SeededImages, indices: torch.Tensor, *, num_workers: int, device: torch.device, **options
    ):
        super().__init__(dataset.split.labels, indices, **options)
        self.dataset = dataset
        self.num_workers = num_workers
        self.device = device

    def _iterate(self, batches, generator):
        if not batches:
            return
        positions = torch.cat(batches)
        # One seed per drawn sample, not per index, so a sample drawn twice (balanced sampling) is augmented twice.
        seeds = torch.randint(2**62, positions.shape, generator=generator)
        samples = list(zip(self.indices[positions].tolist(), seeds.tolist()))
        batch_sampler = [samples[start : start + self.batch_size] for start in range(0, len(samples), self.batch_size)]
        pin = self.device.type == "cuda"
        # The generator also seeds the workers; without it DataLoader would draw from the global RNG.
        loader = DataLoader(
            self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers, pin_memory=pin, generator=generator
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)


# ------------------------------------------------------------------------------------------------------ front door


@dataclass
class Data:
    """A data set ready for training: batches of each split and what a model needs to know about them."""

    train: Batches  # shuffled each epoch, augmented if cfg.augment, class-balanced if cfg.balanced
    train_eval: Batches  # the same samples as train, fixed order, no augmentation
    val: Batches  # held out of the training data (seeded, stratified)
    test: Batches  # the official test split
    num_classes: int
    in_channels: int
    image_size: int
    classes: list[int]  # label i of this Data is label classes[i] of the source
    name: str
    domain: str | None = None  # the input domain (DOMAINS), None = the images as they are


def build_data(
    cfg: DictConfig | dict, *, batch_size: int, eval_batch_size: int, seed: int, device: torch.device
) -> Data:
    """Build the train, train_eval, val and test batches of the data set described by ``cfg`` (the ``dataset`` node).

    Normalisation statistics come from the whole training split before class selection and the validation split,
    so models trained with different seeds or on different class subsets (tasks) see the same input scaling, as
    merging them requires.
    """
    options = _options(cfg)
    device = torch.device(device)
    if batch_size < 1 or eval_batch_size < 1:
        raise UserError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
    source = _load_source(options)
    classes = _check_classes(options, source.num_classes)
    in_memory = _in_memory(options, source)
    train = _prepare(_subsample(source.train, options.max_train_samples), options, in_memory)
    test = _prepare(_subsample(source.test, options.max_test_samples), options, in_memory)
    in_channels, image_size = _geometry(train, options)
    mean, std = _normalisation(options, train, in_channels)
    # After the statistics: every domain is normalised like the original images, as a model pretrained on them sees it.
    train, test = (apply_domain(split, options.domain) for split in (train, test))
    if options.augment and options.padding_mode == "reflect" and options.crop_padding >= image_size:
        raise UserError(f"dataset.crop_padding={options.crop_padding} must be below the image size {image_size}")
    train, test = (select_classes(split, classes, source.num_classes) for split in (train, test))
    # The validation split is fixed by `split_seed`, not the run seed: models trained with different seeds must not
    # have trained on each other's validation samples, or every merge's selection would be scored on training data.
    split_seed = seed if options.split_seed is None else options.split_seed
    fit, val = stratified_split(train.labels, round(options.val_fraction * len(train)), split_seed)
    if in_memory:
        train, test = (Images(split.images.to(device), split.labels) for split in (train, test))

    def batches(split: Images, indices: torch.Tensor, *, training: bool) -> Batches:
        size = batch_size if training else eval_batch_size
        sampling = dict(
            batch_size=size, seed=seed, shuffle=training, balanced=training and options.balanced, drop_last=training
        )
        augment = training and options.augment
        if in_memory:
            crop_flip = CropFlip(options.crop_padding, options.padding_mode, options.flip) if augment else None
            return TensorBatches(split, indices, mean=mean, std=std, device=device, augment=crop_flip, **sampling)
        dataset = SeededImages(split, _loader_transform(split, options, mean, std, augment=augment))
        return LoaderBatches(dataset, indices, num_workers=options.num_workers, device=device, **sampling)

    return Data(
        train=batches(train, fit, training=True),
        train_eval=batches(train, fit, training=False),
        val=batches(train, val, training=False),
        test=batches(test, torch.arange(len(test)), training=False),
        num_classes=len(classes),
        in_channels=in_channels,
        image_size=image_size,
        classes=classes,
        name=options.name,
        domain=options.domain,
    )


def _options(cfg: DictConfig | dict) -> DictConfig:
    """The dataset options: ``cfg`` (interpolations resolved) over DEFAULTS, checked."""
    given = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown dataset option(s) {unknown}; known ones are {sorted(DEFAULTS)}")
    o = OmegaConf.merge(DEFAULTS, given)
    checks = [
        (o.name is not None, "dataset.name is missing; name the data set (e.g. digits)"),
        (0 <= o.val_fraction < 1, f"dataset.val_fraction={o.val_fraction} must be in [0, 1)"),
        (o.channels in (None, 1, 3), f"dataset.channels={o.channels} must be null, 1 or 3"),
        (_null_or_positive(o.image_size), f"dataset.image_size={o.image_size} must be null or positive"),
        (o.crop_padding >= 0, f"dataset.crop_padding={o.crop_padding} must be >= 0"),
        (o.padding_mode in ("reflect", "zeros"), f"dataset.padding_mode={o.padding_mode} must be reflect or zeros"),
        (o.domain is None or o.domain in DOMAINS,
         f"dataset.domain={o.domain} is not one of {', '.join(DOMAINS)} (or null for the images as they are)"),
        (o.in_memory in ("auto", True, False), f"dataset.in_memory={o.in_memory} must be auto, true or false"),
        (o.num_workers >= 0, f"dataset.num_workers={o.num_workers} must be >= 0"),
        (_null_or_positive(o.max_train_samples), f"dataset.max_train_samples={o.max_train_samples} must be null or >0"),
        (_null_or_positive(o.max_test_samples), f"dataset.max_test_samples={o.max_test_samples} must be null or >0"),
    ]
    for fine, message in checks:
        if not fine:
            raise UserError(message)
    return o


# Input domains built from any in-memory data set without downloads: new tasks for multi-task merging.
DOMAINS = ("rotated", "inverted", "blurred")


def apply_domain(split: Images, domain: str | None) -> Images:
    """The split seen in ``domain``: ``rotated`` by 90 degrees (exact, no interpolation), ``inverted`` (``1 - x`` on
    the 0..1 scale), ``blurred`` (Gaussian, kernel 3, sigma 1). Labels are unchanged."""
    if domain is None:
        return split
    if isinstance(split.images, list):
        raise UserError(f"dataset.domain={domain} needs images held in memory; image folders are read lazily")
    images = split.images
    if domain == "rotated":
        images = torch.rot90(images, 1, dims=(-2, -1)).contiguous()
    elif domain == "inverted":
        images = (255 - images) if images.dtype == torch.uint8 else 1 - images
    else:
        images = torch.cat([TF.gaussian_blur(chunk, [3, 3], [1.0, 1.0]) for chunk in images.split(CHUNK)])
    return Images(images, split.labels)


def _null_or_positive(value: int | None) -> bool:
    return value is None or value >= 1


def _load_source(options: DictConfig) -> Source:
    """The raw splits from ``options.source`` (a ``_target_`` node), or from the loader registered for the name."""
    source = options.source
    if source is None:
        if options.name not in SOURCES:
            raise UserError(
                f"unknown dataset {options.name!r}; use one of {sorted(SOURCES)} or set dataset.source._target_"
            )
        source = {"_target_": SOURCES[options.name]}
    loaded = instantiate(source, key="dataset.source", root=str(options.root), download=options.download)
    if isinstance(loaded.train.images, list) and options.image_size is None:
        raise UserError(f"{options.name} holds images of any size; set dataset.image_size (e.g. 224)")
    return loaded


def _check_classes(options: DictConfig, num_classes: int) -> list[int]:
    """The original labels to keep, in order: ``options.classes``, or all of them."""
    if options.classes is None:
        return list(range(num_classes))
    classes = list(options.classes)
    unknown = [c for c in classes if not isinstance(c, int) or not 0 <= c < num_classes]
    if unknown:
        raise UserError(f"dataset.classes has {unknown}, not labels of {options.name}; use 0..{num_classes - 1}")
    if not classes:
        raise UserError("dataset.classes is empty; list the labels to keep, or null for all")
    if len(set(classes)) < len(classes):
        raise UserError(f"dataset.classes={classes} repeats a label; list each label once")
    return classes


def _in_memory(options: DictConfig, source: Source) -> bool:
    """Whether to hold the images as tensors on the device; ``auto`` does so unless they are image files."""
    if options.in_memory == "auto":
        return not isinstance(source.train.images, list)
    return bool(options.in_memory)


def _prepare(split: Images, options: DictConfig, in_memory: bool) -> Images:
    """The split with its images converted once (channels, size): tensors, or file paths when files are read lazily."""
    if isinstance(split.images, list):
        if not in_memory:
            return split
        return Images(_decode_all(split.images, options), split.labels)
    return Images(convert_images(split.images, options.channels, options.image_size), split.labels)


def _geometry(train: Images, options: DictConfig) -> tuple[int, int]:
    """The channels and the side of the images the batches will hold."""
    if isinstance(train.images, list):
        return options.channels or 3, options.image_size  # files are read as RGB
    return train.images.shape[1], train.images.shape[-1]


def _normalisation(options: DictConfig, train: Images, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale: given in the config, or measured on the training images."""
    if options.mean is not None or options.std is not None:
        if options.mean is None or options.std is None or not len(options.mean) == len(options.std) == channels:
            raise UserError(f"dataset.mean and dataset.std need {channels} values each, or both null to measure them")
        return list(options.mean), list(options.std)
    images = train.images
    if isinstance(images, list):
        # Files read lazily: estimate on a fixed subsample rather than decoding the whole set.
        picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))[:STATS_SAMPLES]
        images = _decode_all([images[i] for i in picked.tolist()], options)
    return channel_stats(images)


def _loader_transform(
    split: Images, options: DictConfig, mean: list[float], std: list[float], *, augment: bool
) -> T.Compose:
    """The per-sample transform of the DataLoader path: (augment), scale to 0..1, normalise."""
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if isinstance(split.images, list):
        decode = _file_transform(options.image_size, options.channels, augment=augment, flip=options.flip)
        return T.Compose([decode, *finish])
    steps = []
    if augment and options.crop_padding:
        mode = "reflect" if options.padding_mode == "reflect" else "constant"
        steps.append(T.RandomCrop(split.images.shape[-1], padding=options.crop_padding, padding_mode=mode))
    if augment and options.flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, *finish])
