"""The dataset axis: MNIST and Fashion-MNIST from their IDX files, held in memory.

Files live in torchvision's layout, ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``,
gzipped or not. Missing files are downloaded from the canonical mirrors and checked
against their published MD5 before they are kept. The whole dataset is one float32 tensor
in [0, 1] (on the GPU when training runs there) and batches are sliced from it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import struct
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from vae_sweeps.errors import DataError

log = logging.getLogger(__name__)

# (images, labels) file stems of each split, as published.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIZE = 28


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # torchvision's folder name under the data root
    mirrors: tuple[str, ...]  # base URLs holding "<stem>.gz"
    md5: dict[str, str]  # MD5 of each published .gz file
    classes: tuple[str, ...]


DATASETS = {
    "mnist": DatasetSpec(
        folder="MNIST",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        classes=tuple(str(digit) for digit in range(10)),
    ),
    "fashion_mnist": DatasetSpec(
        folder="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
}


# ---------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into an array of its shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError) as err:
            raise DataError(f"{path} is a damaged gzip file ({err}); delete it and download it again.") from err
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than an IDX header.")
    if raw[:3] != b"\x00\x00\x08" or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes: its magic number is 0x{raw[:4].hex()}, "
            "expected 0x000008NN (NN = number of dimensions)."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header ({len(raw)} of {header} bytes).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw)} bytes, but a {shape} array needs {expected}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


# ---------------------------------------------------------------------------- finding and downloading


def raw_dir(name: str, root: str | Path) -> Path:
    return Path(root) / DATASETS[name].folder / "raw"


def find_file(folder: Path, stem: str) -> Path | None:
    """The file ``stem`` or ``stem.gz`` in ``folder``, whichever exists (plain first)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def download(urls: list[str], dest: Path, md5: str) -> None:
    """Fetch the first URL that works into ``dest``, kept only if its MD5 matches.

    The bytes go to a temporary file beside ``dest`` that is renamed into place once checked,
    so an interrupted or corrupt download never leaves a file that looks complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            log.info("Downloading %s", url)
            digest = hashlib.md5()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != md5:
                raise DataError(f"checksum mismatch: MD5 {digest.hexdigest()}, expected {md5}")
            os.replace(tmp, dest)
            return
        except (OSError, DataError) as err:  # URLError and timeouts are OSErrors
            failures.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(f"Could not download {dest.name}: " + "; ".join(failures))


def ensure_files(name: str, root: str | Path, download_missing: bool = True) -> dict[str, Path]:
    """Paths of the four files of dataset ``name`` under ``root``, downloading what is missing."""
    spec = DATASETS[name]
    folder = raw_dir(name, root)
    stems = [stem for pair in SPLIT_FILES.values() for stem in pair]
    missing = [stem for stem in stems if find_file(folder, stem) is None]
    failures = []
    if missing and download_missing:
        for stem in missing:
            try:
                download([f"{base}{stem}.gz" for base in spec.mirrors], folder / f"{stem}.gz", spec.md5[stem])
            except DataError as err:
                failures.append(str(err))
        missing = [stem for stem in missing if find_file(folder, stem) is None]
    if missing:
        why = f" Downloading failed: {' '.join(failures)}" if failures else " Downloading is off (data.download=false)."
        raise DataError(
            f"The {name} files {', '.join(missing)} (with or without .gz) are missing from {folder.resolve()}."
            f"{why} If you have a local copy, point the data root at the folder that holds "
            f"{spec.folder}/raw/: data.root=/path/to/datasets on the command line, or "
            "VAE_SWEEPS_DATA_DIR=/path/to/datasets in the environment."
        )
    return {stem: find_file(folder, stem) for stem in stems}


def load_arrays(name: str, root: str | Path, download_missing: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": (images, labels)} as uint8 arrays, shapes checked."""
    files = ensure_files(name, root, download_missing)
    splits = {}
    for split, (image_stem, label_stem) in SPLIT_FILES.items():
        images, labels = read_idx(files[image_stem]), read_idx(files[label_stem])
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{files[image_stem]} holds an array of shape {images.shape}, expected (N, 28, 28).")
        if labels.shape != (len(images),):
            raise DataError(
                f"{files[label_stem]} holds labels of shape {labels.shape}, expected ({len(images)},) "
                f"to match {files[image_stem].name}."
            )
        splits[split] = (images, labels)
    return splits


# ---------------------------------------------------------------------------- batches and the DataModule


class TensorBatches:
    """Batches sliced from tensors already in memory: no Dataset, no collation, no workers.

    Shuffling draws one permutation per pass from its own seeded generator, so the order of
    batches depends only on the seed.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 shuffle: bool = False, generator: torch.Generator | None = None):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        n, size = len(self.images), self.batch_size
        if not self.shuffle:
            for start in range(0, n, size):
                yield self.images[start:start + size], self.labels[start:start + size]
            return
        order = torch.randperm(n, generator=self.generator).to(self.images.device)
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
        self.batch_size, self.val_size = batch_size, val_size
        self.generator = torch.Generator().manual_seed(seed)
        self.classes = DATASETS[name].classes
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare_data(self) -> None:
        ensure_files(self.name, self.root, self.download)

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
        return TensorBatches(images, labels, self.batch_size, shuffle, self.generator)

    def train_dataloader(self) -> TensorBatches:
        return self.batches("train", shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self.batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self.batches("test")
