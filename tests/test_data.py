"""Data: splits, class subsets, conversions, seeded epochs, and every source read through its real code path.

Torchvision sources are fed small files this module writes in the official on-disk formats.
"""

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

from mergelab.data import Images, build_data, load_digits
from mergelab.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
CPU = torch.device("cpu")


def build(name="digits", *, seed=0, batch_size=64, eval_batch_size=100, **overrides):
    """build_data on the real conf/dataset/<name>.yaml with some keys overridden."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return build_data(cfg, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, device=CPU)


def collect(batches):
    """All (x, y) of one pass, concatenated."""
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------------------------ digits


def test_digits_shapes_and_split_sizes():
    data = build()
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("digits", 10, 1, 8)
    assert data.classes == list(range(10))
    assert data.test.num_samples == round(0.2 * 1797)
    assert data.train.num_samples + data.val.num_samples == 1797 - data.test.num_samples
    assert data.val.num_samples == round(0.1 * (1797 - data.test.num_samples))
    assert data.train_eval.num_samples == data.train.num_samples
    assert len(data.train) == data.train.num_samples // 64  # training drops the last partial batch
    assert len(data.test) == math.ceil(data.test.num_samples / 100)  # evaluation keeps everything
    x, y = next(iter(data.train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert all(len(y) == 64 for _, y in data.train)
    x, _ = collect(data.train_eval)
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


def test_split_smaller_than_a_batch_still_gives_one_batch():
    data = build(batch_size=4096)
    assert len(data.train) == 1 and next(iter(data.train))[0].shape[0] == data.train.num_samples


def test_val_is_held_out_of_train_and_stratified():
    data = build()
    train, val = set(data.train.indices.tolist()), set(data.val.indices.tolist())
    assert not train & val
    assert train | val == set(range(data.train.num_samples + data.val.num_samples))
    per_class = torch.bincount(torch.cat([data.train.labels, data.val.labels]))
    val_per_class = torch.bincount(data.val.labels, minlength=10)
    assert ((val_per_class - 0.1 * per_class).abs() <= 1).all()


def test_test_and_val_splits_are_shared_across_run_seeds():
    # Models trained with different seeds are merged and scored on val: none may have trained on another's val.
    first, second = build(seed=0), build(seed=1)
    for a, b in zip(collect(first.test), collect(second.test)):
        assert torch.equal(a, b)
    assert torch.equal(first.val.indices, second.val.indices)
    moved = build(seed=0, split_seed=1)
    assert not torch.equal(first.val.indices, moved.val.indices)
    assert first.val.num_samples == moved.val.num_samples
    follows = build(seed=1, split_seed=None)
    assert torch.equal(follows.val.indices, moved.val.indices)


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    data = build(augment=True, crop_padding=1, flip=True)
    rng_state = torch.get_rng_state()
    data.train.set_epoch(3)
    x3, y3 = collect(data.train)
    again_x3, again_y3 = collect(data.train)
    assert torch.equal(x3, again_x3) and torch.equal(y3, again_y3)
    resumed = build(augment=True, crop_padding=1, flip=True)
    resumed.train.set_epoch(3)
    assert torch.equal(collect(resumed.train)[0], x3)
    data.train.set_epoch(4)
    assert not torch.equal(collect(data.train)[1], y3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is never used


def test_augmentation_changes_images_not_order():
    plain, augmented = build(), build(augment=True, crop_padding=1, flip=True)
    (x, y), (x_aug, y_aug) = collect(plain.train), collect(augmented.train)
    assert torch.equal(y, y_aug)
    assert not torch.equal(x, x_aug)
    assert x_aug.shape == x.shape


def test_class_subset_is_remapped_in_the_given_order():
    full = build()
    x_full, y_full = collect(full.test)
    data = build(classes=[9, 5, 6, 7, 8])
    assert data.num_classes == 5 and data.classes == [9, 5, 6, 7, 8]
    x, y = collect(data.test)
    kept = y_full >= 5
    assert torch.equal(x, x_full[kept])  # same samples, same order, same normalisation
    assert torch.equal(torch.tensor(data.classes)[y], y_full[kept])
    assert set(collect(data.train_eval)[1].tolist()) == set(range(5))
    full_train_labels = torch.cat([full.train.labels, full.val.labels])
    assert data.train.num_samples + data.val.num_samples == int((full_train_labels >= 5).sum())


def test_resize_and_channels():
    data = build(image_size=32, channels=3)
    assert (data.in_channels, data.image_size) == (3, 32)
    x, _ = next(iter(data.test))
    assert x.shape[1:] == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale repeated


def test_tensors_and_loader_give_the_same_batches():
    in_memory = build(in_memory=True)
    lazy = build(in_memory=False, num_workers=0)
    for a, b in zip(collect(in_memory.train_eval), collect(lazy.train_eval)):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert [len(y) for _, y in lazy.train] == [64] * len(in_memory.train)


def imbalanced_digits(root, download):
    """Digits 0, 1 and 2 with 100, 30 and 8 training samples: a source plugged in by ``_target_``."""
    digits = load_digits(root, download)
    labels = digits.train.labels
    kept = torch.cat([(labels == label).nonzero().squeeze(1)[:size] for label, size in ((0, 100), (1, 30), (2, 8))])
    digits.train = digits.train.take(kept.sort().values)
    return digits


def test_balanced_sampling_draws_classes_equally():
    options = dict(source={"_target_": f"{__name__}.imbalanced_digits"}, classes=[0, 1, 2], val_fraction=0.0)
    data = build(balanced=True, batch_size=47, **options)
    assert torch.bincount(data.train.labels).tolist() == [100, 30, 8]
    counts = torch.zeros(3, dtype=torch.int64)
    for epoch in range(20):
        data.train.set_epoch(epoch)
        counts += torch.bincount(collect(data.train)[1], minlength=3)
    assert (counts - counts.sum() / 3).abs().max() < 0.2 * counts.sum() / 3  # unbalanced: 100 vs 8
    drawn = collect(build(balanced=False, batch_size=47, **options).train)[1]
    assert torch.bincount(drawn, minlength=3)[2] <= 8  # without balancing each sample comes at most once an epoch


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="classes"):
        build(classes=[3, 12])
    with pytest.raises(UserError, match="val_frac"):
        build(val_frac=0.2)
    with pytest.raises(UserError, match="channels"):
        build(channels=2)


def test_plain_dict_config_by_name():
    data = build_data({"name": "digits", "max_test_samples": 50}, batch_size=32, eval_batch_size=64, seed=0, device=CPU)
    assert data.test.num_samples == 50
    assert torch.bincount(collect(data.test)[1]).min() == 5  # a stratified subsample


# -------------------------------------------------------------------------------------------- torchvision sources


def write_idx(path, array):
    """An uncompressed IDX file: big-endian magic (0x08 = uint8, then the rank), the sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(folder, n_train=50, n_test=20):
    """Random 28x28 images labelled i % 10 under folder/raw, as torchvision's MNIST expects them."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / "raw" / f"{split}-labels-idx1-ubyte", labels)
        written[split] = images, labels
    return written


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_formats(tmp_path, name, folder):
    written = write_mnist_like(tmp_path / folder)
    data = build(name, root=str(tmp_path), mean=[0.0], std=[1.0], batch_size=16)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert data.train.num_samples + data.val.num_samples == 50 and data.val.num_samples == 5
    x, y = collect(data.test)
    images, labels = written["t10k"]
    assert torch.equal(y, torch.from_numpy(labels).long())
    assert torch.allclose(x, torch.from_numpy(images).float().unsqueeze(1) / 255)


def write_cifar(folder, files, label_key, names_file, names_key, num_classes, per_file):
    """Pickled CIFAR batches: uint8 rows of 3072 (planar R, G, B) and their labels, plus the label names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    written = {}
    for offset, file in enumerate(files):
        data = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = [(offset + i) % num_classes for i in range(per_file)]
        with open(folder / file, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[file] = data.reshape(-1, 3, 32, 32), labels
    with open(folder / names_file, "wb") as f:
        pickle.dump({names_key: [f"class {i}" for i in range(num_classes)]}, f)
    return written


def trust_our_files(monkeypatch, cls):
    """Clear the md5s torchvision checks: they are those of the official archives, which tiny files cannot match.

    check_integrity(path, None) only checks that the file exists; reading, unpickling and reshaping stay the same.
    """
    monkeypatch.setattr(cls, "train_list", [[file, None] for file, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[file, None] for file, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def test_cifar10_format(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, CIFAR10_FILES, "labels", "batches.meta", "label_names", 10, per_file=10)
    with pytest.raises(UserError, match=f"CIFAR-10 not found or corrupted under {folder}"):
        build("cifar10", root=str(tmp_path))  # the real md5 check rejects our files
    trust_our_files(monkeypatch, torchvision.datasets.CIFAR10)
    data = build("cifar10", root=str(tmp_path), mean=[0.0], std=[1.0], channels=1, batch_size=8)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 32)
    assert data.train.num_samples + data.val.num_samples == 50
    x, y = collect(data.test)
    images, labels = written["test_batch"]
    assert y.tolist() == labels
    luminance = torchvision.transforms.v2.functional.rgb_to_grayscale(torch.from_numpy(images))
    assert torch.allclose(x, luminance.float() / 255)
    x, _ = next(iter(data.train))
    assert x.shape == (8, 1, 32, 32)  # augmented: cropped and flipped, same shape


def test_cifar100_format(tmp_path, monkeypatch):
    written = write_cifar(tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names",
                          100, per_file=40)
    trust_our_files(monkeypatch, torchvision.datasets.CIFAR100)
    data = build("cifar100", root=str(tmp_path), classes=[3, 1], val_fraction=0.0, eval_batch_size=7)
    assert data.num_classes == 2 and data.in_channels == 3
    images, labels = written["test"]
    _, y = collect(data.test)
    assert y.tolist() == [{3: 0, 1: 1}[label] for label in labels if label in (3, 1)]
    assert data.train.num_samples == 2 and data.val.num_samples == 0


@pytest.mark.parametrize("name, path", [("mnist", "MNIST"), ("cifar10", "cifar-10-batches-py")])
def test_missing_files_name_the_path(tmp_path, name, path):
    root = tmp_path / "nowhere"
    with pytest.raises(UserError, match=f"not found .*under {root / path}; set dataset.download=true"):
        build(name, root=str(root))


# ---------------------------------------------------------------------------------------------------- image folder


def write_image_folder(root, counts):
    """Random RGB PNGs of assorted sizes in root/<split>/<class>/."""
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for label, count in per_class.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


@pytest.fixture
def image_folder(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 12, "dog": 6}, "test": {"cat": 3, "dog": 2}})
    return tmp_path


def test_image_folder_in_memory_and_from_files(image_folder):
    options = dict(root=str(image_folder), image_size=8, batch_size=4, eval_batch_size=5, num_workers=0)
    lazy, in_memory = build("imagefolder", **options), build("imagefolder", in_memory=True, **options)
    for data in (lazy, in_memory):
        assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 8)
        assert data.test.num_samples == 5 and data.val.num_samples == 2
        x, _ = next(iter(data.train))
        assert x.shape == (4, 3, 8, 8)
    for split in ("train_eval", "val", "test"):
        for a, b in zip(collect(getattr(lazy, split)), collect(getattr(in_memory, split))):
            assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert collect(lazy.test)[1].tolist() == [0, 0, 0, 1, 1]


def test_image_folder_epochs_do_not_depend_on_workers(image_folder):
    options = dict(root=str(image_folder), image_size=8, batch_size=4, channels=1, mean=None, std=None)
    one_process, workers = build("imagefolder", num_workers=0, **options), build("imagefolder", num_workers=2, **options)
    rng_state = torch.get_rng_state()
    for data in (one_process, workers):
        data.train.set_epoch(2)
    (x, y), (x_workers, y_workers) = collect(one_process.train), collect(workers.train)
    assert torch.equal(x, x_workers) and torch.equal(y, y_workers)
    assert x.shape[1:] == (1, 8, 8)
    one_process.train.set_epoch(3)
    assert not torch.equal(collect(one_process.train)[0], x)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_image_folder_needs_train_and_test(tmp_path):
    write_image_folder(tmp_path, {"train": {"cat": 2}})
    with pytest.raises(UserError, match=f"{tmp_path} needs train/ and test/"):
        build("imagefolder", root=str(tmp_path))


def test_images_take_keeps_paths_and_labels():
    split = Images(["a.png", "b.png", "c.png"], torch.tensor([2, 0, 1]))
    taken = split.take(torch.tensor([2, 0]))
    assert taken.images == ["c.png", "a.png"] and taken.labels.tolist() == [1, 2]


def test_input_domains_are_exact_transforms_normalised_like_the_plain_images():
    plain = build(classes=[3, 7])
    x, y = next(iter(plain.test))
    mean, std = plain.test.mean.view(1, -1, 1, 1), plain.test.std.view(1, -1, 1, 1)
    rotated = build(classes=[3, 7], domain="rotated")
    xr, yr = next(iter(rotated.test))
    assert yr.equal(y) and rotated.domain == "rotated" and plain.domain is None
    torch.testing.assert_close(xr, torch.rot90(x, 1, dims=(-2, -1)))  # per-channel normalisation commutes
    xi, _ = next(iter(build(classes=[3, 7], domain="inverted").test))
    torch.testing.assert_close(xi * std + mean, 1 - (x * std + mean))  # 1 - x on the 0..1 scale
    xb, _ = next(iter(build(classes=[3, 7], domain="blurred").test))
    assert xb.shape == x.shape and (xb.var() < x.var())  # smoothing lowers the pixel variance
    with pytest.raises(UserError, match="dataset.domain=sheared is not one of rotated, inverted, blurred"):
        build(domain="sheared")
