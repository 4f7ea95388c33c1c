"""The dataset axis: MNIST and Fashion-MNIST through torchvision, held in memory.

torchvision finds, downloads (from its mirrors, each file checked against its published MD5)
and parses the files, in its layout ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``.
On top of it this module keeps the project's one-paragraph errors: a ``.gz`` whose plain copy
is missing is decompressed (torchvision reads only the plain files), every file's IDX header is
checked against its size, and any failure names the file, where we looked and how to point at
a copy. The whole dataset is then one float32 tensor in [0, 1] (on the GPU when training runs
there) and batches are sliced from it.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torchvision import datasets

from vae_sweeps.errors import DataError

log = logging.getLogger(__name__)

# The datasets of the data axis (conf/data/): torchvision classes with MNIST's file layout.
DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
# (images, labels) file names of each split, as published (torchvision keeps them decompressed).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STEMS = tuple(stem for pair in SPLIT_FILES.values() for stem in pair)
IMAGE_SIZE = 28


def classes(name: str) -> tuple[str, ...]:
    """Short class names: "0" .. "9" for MNIST (torchvision says "0 - zero"), Fashion's as they are."""
    return tuple(label.split(" - ")[0] for label in DATASETS[name].classes)


def raw_dir(name: str, root: str | Path) -> Path:
    return Path(root) / DATASETS[name].__name__ / "raw"


# ---------------------------------------------------------------------------- checks on top of torchvision


def decompress(gz: Path) -> Path:
    """Write the plain copy of ``gz`` beside it (through a temporary file, so a failure leaves
    nothing that looks complete)."""
    plain = gz.with_suffix("")
    fd, tmp = tempfile.mkstemp(dir=gz.parent, prefix=f".{plain.name}.", suffix=".part")
    try:
        with gzip.open(gz, "rb") as source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(tmp, plain)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{gz} is a damaged gzip file ({err}); delete it and download it again "
                        "(or copy a good one there).") from err
    finally:
        Path(tmp).unlink(missing_ok=True)
    return plain


def check_idx(path: Path) -> None:
    """Raise DataError unless ``path`` starts with an IDX header of unsigned bytes whose shape
    matches the file's size (a truncated or foreign file would otherwise fail inside torchvision)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4 + 4 * 3)
    if len(head) < 4:
        raise DataError(f"{path} is truncated: {size} bytes, shorter than an IDX header.")
    if head[:3] != b"\x00\x00\x08" or not 1 <= head[3] <= 3:
        raise DataError(f"{path} is not an IDX file of unsigned bytes: its magic number is 0x{head[:4].hex()}, "
                        "expected 0x0000080N (N = 1 to 3 dimensions).")
    header = 4 + 4 * head[3]
    if len(head) < header:
        raise DataError(f"{path} is truncated inside its header ({size} of {header} bytes).")
    shape = tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(head[3]))
    expected = header + math.prod(shape)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {size} bytes, but a {shape} array needs {expected}.")


def _where_to_point(name: str) -> str:
    return (f"If you have a local copy, point the data root at the folder that holds {DATASETS[name].__name__}/raw/: "
            "data.root=/path/to/datasets on the command line, or VAE_SWEEPS_DATA_DIR=/path/to/datasets in the "
            "environment.")


def load_arrays(name: str, root: str | Path, download_missing: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": (images, labels)} as uint8 arrays, read by torchvision.

    Raises DataError, one paragraph naming the file and the fix, for missing files that cannot
    be downloaded, damaged gzip files, and files whose IDX header does not match their size.
    """
    folder = raw_dir(name, root)
    for stem in STEMS:
        plain, gz = folder / stem, folder / f"{stem}.gz"
        if not plain.is_file() and gz.is_file():
            decompress(gz)
        if plain.is_file():
            check_idx(plain)
    missing = [stem for stem in STEMS if not (folder / stem).is_file()]
    if missing and not download_missing:
        raise DataError(f"The {name} files {', '.join(missing)} (with or without .gz) are missing from "
                        f"{folder.resolve()}. Downloading is off (data.download=false). {_where_to_point(name)}")
    splits = {}
    for split in SPLIT_FILES:
        try:
            dataset = DATASETS[name](str(root), train=split == "train", download=download_missing)
        except Exception as err:  # torchvision: RuntimeError, URLError, or a parsing error
            reason = " ".join(str(err).split())
            raise DataError(f"The {name} files {', '.join(missing) or '(all present)'} could not be loaded into "
                            f"{folder.resolve()}: {reason}. {_where_to_point(name)}") from err
        images, labels = dataset.data.numpy(), dataset.targets.numpy()
        image_file, label_file = (folder / stem for stem in SPLIT_FILES[split])
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{image_file} holds an array of shape {images.shape}, expected (N, 28, 28).")
        if labels.shape != (len(images),):
            raise DataError(f"{label_file} holds labels of shape {labels.shape}, expected ({len(images)},) "
                            f"to match {image_file.name}.")
        splits[split] = (images, labels)
    return splits


# ---------------------------------------------------------------------------- batches and the DataModule


class TensorBatches:
    """Batches sliced from tensors already in memory: no Dataset, no collation, no workers.

    With ``shuffle``, each pass draws its order from a generator seeded with (``seed``, the
    pass's epoch), so the data order of an epoch is a function of the seed and the epoch alone:
    a run resumed at epoch k sees the same batches as one that never stopped. ``epoch`` tells
    the current epoch (the Trainer's); without it, passes are counted.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool = False, seed: int = 0, epoch=None):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch, self.passes = epoch, 0

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``: the same for the same (seed, epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.images), generator=generator)

    def __iter__(self):
        n, size = len(self.images), self.batch_size
        epoch = self.epoch() if self.epoch is not None else self.passes
        self.passes += 1
        if not self.shuffle:
            for start in range(0, n, size):
                yield self.images[start:start + size], self.labels[start:start + size]
            return
        order = self.order(epoch).to(self.images.device)
        for start in range(0, n, size):
            index = order[start:start + size]
            yield self.images[index], self.labels[index]


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 28, 28) images -> float32 (N, 1, 28, 28) in [0, 1]; labels -> int64."""
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


class ImageDataModule(pl.LightningDataModule):
    """MNIST or Fashion-MNIST: train = first N - val_size training images, val = the last
    val_size, test = the official test set."""

    def __init__(self, name: str = "mnist", root: str = "data", download: bool = True,
                 batch_size: int = 128, val_size: int = 5000, seed: int = 0):
        super().__init__()
        self.name, self.root, self.download = name, root, download
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.classes = classes(name)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def load(self) -> None:
        """Read the files into memory once (idempotent); raises DataError on bad files."""
        if self.splits:
            return
        arrays = load_arrays(self.name, self.root, self.download)
        images, labels = to_tensors(*arrays["train"])
        if not 0 < self.val_size < len(images):
            raise DataError(
                f"data.val_size={self.val_size} is not allowed: it must be between 1 and "
                f"{len(images) - 1} (the training file holds {len(images)} images)."
            )
        cut = len(images) - self.val_size
        self.splits = {
            "train": (images[:cut], labels[:cut]),
            "val": (images[cut:], labels[cut:]),
            "test": to_tensors(*arrays["test"]),
        }

    def setup(self, stage: str | None = None) -> None:
        self.load()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if device.type != "cpu":  # keep the whole dataset where training runs
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def batches(self, split: str, shuffle: bool = False) -> TensorBatches:
        images, labels = self.splits[split]
        epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        return TensorBatches(images, labels, self.batch_size, shuffle, self.seed, epoch)

    def train_dataloader(self) -> TensorBatches:
        return self.batches("train", shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self.batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self.batches("test")
