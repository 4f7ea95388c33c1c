"""The dataset axis: MNIST and Fashion-MNIST through torchvision, held in memory.

torchvision finds, downloads (from its mirrors, each file checked against its published MD5)
and parses the files, in its layout ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``.
On top of it this module keeps the project's one-paragraph errors: a ``.gz`` whose plain copy
is missing is decompressed (torchvision reads only the plain files), every file's IDX header is
checked against its size and its content against the published file's SHA-256 (``SHA256``; the
digests are cached per file), and any failure names the file, where we looked and how to point at
a copy. The whole dataset is then one float32 tensor in [0, 1] (on the GPU when training runs
there) and batches are sliced from it.

Lightning is imported only where the Trainer's DataModule is made (``ImageData.lightning``): a
data option is built, and its settings checked, before a job imports Lightning (config.validate).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from vae_sweeps.errors import BadValue, DataError, positive_int

log = logging.getLogger(__name__)

# The torchvision datasets of ImageDataModule (conf/data/mnist.yaml, fashion_mnist.yaml), with
# MNIST's file layout, and their names as the MLflow runs table shows them.
DATASETS = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
# (images, labels) file names of each split, as published (torchvision keeps them decompressed).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STEMS = tuple(stem for pair in SPLIT_FILES.values() for stem in pair)
IMAGE_SIZE = 28
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)  # (channels, height, width)
TRAIN_IMAGES = 60000  # in the training file of each dataset
# The data root when neither data.root nor VAE_SWEEPS_DATA_DIR names one (conf/data/*.yaml): a
# folder in the working folder, made on the first download. A root that the user names must exist.
DEFAULT_ROOT = "data"
# The SHA-256 of each decompressed file as published (what torchvision reads): files already on
# disk are checked against it, so that one dataset's files in another's folder are refused.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digest_cache() -> Path:
    """The file digests' cache: the user's, not a file beside the data, whose folder may be a
    team's read-only copy (which root could still write to)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae_sweeps" / "sha256.json"


def save_json(path: Path, value) -> None:
    """Write ``value`` to ``path`` through a temporary file, so that a parallel job never reads
    half of it; where that fails, nothing is written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "w") as out:
            json.dump(value, out)
        os.replace(tmp, path)
    except OSError as err:
        log.debug("Could not write %s: %s", path, err)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def digests(paths: list[Path]) -> dict[Path, str]:
    """The SHA-256 of each file, read again only when the file changed since it was cached: its
    size, times or inode differ (the change time too: ``cp -p`` keeps the modification time)."""
    cache_file = digest_cache()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    found, changed = {}, False
    for path in paths:
        info = path.stat()
        key, stamp = str(path.resolve()), [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        if cache.get(key, [])[:4] != stamp:
            cache[key], changed = [*stamp, sha256(path)], True
        found[path] = cache[key][4]
    if changed:
        save_json(cache_file, cache)
    return found


def check_content(name: str, folder: Path) -> None:
    """Raise DataError unless every file in ``folder`` is the published file of dataset ``name``,
    by its SHA-256 (saying whose file it is when it belongs to another dataset)."""
    known = {digest: f"{other}'s {stem}" for other, files in SHA256.items() for stem, digest in files.items()}
    found = digests([folder / stem for stem in STEMS])
    for stem, expected in SHA256[name].items():
        path, digest = folder / stem, found[folder / stem]
        if digest != expected:
            what = (f"it holds {known[digest]}" if digest in known else
                    f"its SHA-256 is {digest[:12]}..., not the published file's {expected[:12]}...")
            raise DataError(f"{path} is not the {name} dataset's {stem}: {what} (checked by the SHA-256 of each file "
                            f"in {folder.resolve()}). Put {name}'s files there (delete the wrong ones, .gz included, and "
                            f"they are downloaded again), or use a good copy. {_where_to_point(name)} If these are your own "
                            "files on purpose, data.verify=false skips this check.")


def load_arrays(name: str, root: str | Path, download_missing: bool = True,
                verify: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": (images, labels)} as uint8 arrays, read by torchvision.

    Raises DataError, one paragraph naming the file and the fix, for missing files that cannot
    be downloaded, damaged gzip files, files whose IDX header does not match their size, and
    (``verify``) files whose content is not the published dataset's (check_content).
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
    if verify:
        check_content(name, folder)
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
    """uint8 (N, H, W) or (N, C, H, W) images -> float32 (N, C, H, W) in [0, 1]; labels -> int64."""
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    return (x.unsqueeze(1) if x.ndim == 3 else x), torch.from_numpy(labels.astype(np.int64))


class ImageData:
    """The data axis's interface: labelled images held in memory, train = the first N - val_size
    training images, val = the last val_size, test = the test split.

    A dataset option's class subclasses it and implements ``arrays`` (and sets ``image_shape``
    and ``classes``); everything else (splits, batches in a seeded order, the GPU copy) is here.
    It is plain Python, so that building an option to check its settings does not import
    Lightning; ``lightning()`` is the Trainer's LightningDataModule over it.
    """

    image_shape: tuple[int, ...] = IMAGE_SHAPE  # (channels, height, width): what the model is built for
    classes: tuple[str, ...] = tuple(str(k) for k in range(10))  # the label names, for the figures
    train_images: int | None = None  # in the training split, where known before loading (config checks)

    def __init__(self, batch_size: int = 128, val_size: int = 5000, seed: int = 0):
        self.batch_size = positive_int("batch_size", batch_size, "128")
        self.val_size = positive_int("val_size", val_size, "5000")
        self.seed = seed
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"train": (images, labels), "test": (images, labels)}: uint8 images (N, H, W) or
        (N, C, H, W) and integer labels; raise DataError (one paragraph: the file, the fix)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What the MLflow UI shows as the run's dataset: its ``name``, where it comes from
        (``url``) and ``checksums`` of its files (for the digest)."""
        return {"name": type(self).__name__, "url": None, "checksums": []}

    def load(self) -> None:
        """Read the files into memory once (idempotent); raises DataError on bad files."""
        if self.splits:
            return
        arrays = self.arrays()
        images, labels = to_tensors(*arrays["train"])
        if tuple(images.shape[1:]) != tuple(self.image_shape):
            raise DataError(f"The training images of {type(self).__name__} have the shape {tuple(images.shape[1:])}, "
                            f"but it declares image_shape = {tuple(self.image_shape)}.")
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

    def to(self, device: torch.device) -> None:
        """Keep the whole dataset on ``device``, where training runs."""
        if device.type != "cpu":
            self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in self.splits.items()}

    def batches(self, split: str, shuffle: bool = False, epoch=None) -> TensorBatches:
        """The batches of ``split``; shuffled ones in the order of the seed and ``epoch`` (a
        function that tells the current epoch; without it, passes are counted)."""
        images, labels = self.splits[split]
        return TensorBatches(images, labels, self.batch_size, shuffle, self.seed, epoch)

    def lightning(self):
        """These images as the Trainer's LightningDataModule: on setup it loads them (once) and
        moves them to the Trainer's device; its training batches follow the Trainer's epoch, so
        a resumed run sees the batches of one that never stopped (TensorBatches)."""
        import pytorch_lightning as pl  # here, where the job trains: see the module's docstring

        data = self

        class DataModule(pl.LightningDataModule):
            def setup(self, stage: str | None = None) -> None:
                data.load()
                data.to(self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu"))

            def train_dataloader(self) -> TensorBatches:
                return data.batches("train", shuffle=True, epoch=lambda: self.trainer.current_epoch)

            def val_dataloader(self) -> TensorBatches:
                return data.batches("val")

            def test_dataloader(self) -> TensorBatches:
                return data.batches("test")

        return DataModule()


def check_root(root: str, download: bool) -> None:
    """A data root must be a folder. One that does not exist is made for a download only where it
    is the default (DEFAULT_ROOT, in the working folder): a root the user names is never made, for
    a mistyped path would get a new folder and a download where a copy was meant. (Without
    downloading, a missing root is refused by load_arrays: its files are missing.) Raises BadValue."""
    path = Path(root)
    where = ("the one that holds MNIST/raw/ or FashionMNIST/raw/ (data.root=/path/to/datasets or "
             "VAE_SWEEPS_DATA_DIR=/path/to/datasets)")
    if path.exists() and not path.is_dir():
        raise BadValue("root", root, f"it must be a directory, {where}")
    if path.exists() or not download or root == DEFAULT_ROOT:
        return
    source = " (set by VAE_SWEEPS_DATA_DIR)" if os.environ.get("VAE_SWEEPS_DATA_DIR") == root else ""
    raise BadValue("root", root, f"there is no such folder{source}; give {where}, or make it first "
                   f"(mkdir -p {shlex.quote(root)}) for the files to be downloaded into it")


class ImageDataModule(ImageData):
    """MNIST or Fashion-MNIST (``name``, a key of DATASETS), read by torchvision from ``root``
    and checked (load_arrays)."""

    train_images = TRAIN_IMAGES

    def __init__(self, name: str = "mnist", root: str = "data", download: bool = True,
                 batch_size: int = 128, val_size: int = 5000, seed: int = 0, verify: bool = True):
        super().__init__(batch_size, val_size, seed)
        if name not in DATASETS:
            raise BadValue("name", name, f"choose one of {', '.join(DATASETS)}")
        check_root(str(root), download)
        self.name, self.root, self.download, self.verify = name, root, download, verify
        self.classes = classes(name)

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return load_arrays(self.name, self.root, self.download, self.verify)

    def describe(self) -> dict:
        source = DATASETS[self.name]
        return {"name": DATASET_TITLES[self.name], "url": source.mirrors[0],
                "checksums": [md5 for _, md5 in source.resources]}


class MNIST(ImageDataModule):
    """conf/data/mnist.yaml."""

    def __init__(self, **settings):
        super().__init__("mnist", **settings)


class FashionMNIST(ImageDataModule):
    """conf/data/fashion_mnist.yaml."""

    def __init__(self, **settings):
        super().__init__("fashion_mnist", **settings)
