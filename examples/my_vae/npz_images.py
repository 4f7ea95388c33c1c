"""Images of your own from one .npz file: the dataset of examples/conf/data/npz_images.yaml
(data=npz_images data.path=FILE).

The file holds ``x_train`` and ``x_test``, uint8 grey images (N, 28, 28), and ``y_train`` and
``y_test``, their integer labels 0 .. K-1 (N,); optionally ``classes``, the K label names (else
"0" .. "K-1"). ``python examples/my_vae/make_npz.py FILE`` writes a demo one.

vae_sweeps constructs ``NpzImages`` with the option's settings and ``seed`` when it checks the
config (nothing is read then), and calls ``arrays`` once before the run starts; the
validation split (the last ``val_size`` training images), the batches and the GPU copy are
``ImageData``'s.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from vae_sweeps.data import ImageData
from vae_sweeps.errors import BadValue, DataError

SIDE = 28  # the demo's images are 28 x 28 grey, as MNIST's
KEYS = ("x_train", "y_train", "x_test", "y_test")
FORMAT = ("arrays x_train and x_test (uint8 images, N x 28 x 28) and y_train and y_test (integer labels "
          "0 .. K-1, one per image)")


class NpzImages(ImageData):
    """28 x 28 grey images and their labels, read from the .npz file ``path``."""

    image_shape = (1, SIDE, SIDE)

    def __init__(self, path: str, batch_size: int = 128, val_size: int = 500, seed: int = 0):
        super().__init__(batch_size, val_size, seed)  # checks batch_size and val_size
        if not isinstance(path, str) or not path.strip():
            raise BadValue("path", path, "it must be the path of an .npz file, e.g. data.path=examples/shapes.npz")
        self.path = path
        self.sha256: str | None = None

    def _fail(self, problem: str) -> DataError:
        """One paragraph: the file, what is wrong with it, and the fix."""
        demo = "" if Path(self.path).exists() else f", or write a demo one: python examples/my_vae/make_npz.py {self.path}"
        return DataError(f"{Path(self.path).absolute()} {problem}. data.path must name an .npz file holding {FORMAT}; "
                         f"a relative path is taken from the folder the command runs in. Point data.path at such a "
                         f"file{demo}.")

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        path = Path(self.path)
        if not path.is_file():
            raise self._fail("does not exist" if not path.exists() else "is not a file")
        if not zipfile.is_zipfile(path):  # np.load would take it for a pickle
            raise self._fail("is not an .npz file (not a zip archive)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [key for key in KEYS if key not in npz.files]
                if missing:
                    raise self._fail(f"has no array {', '.join(missing)} (it has {', '.join(npz.files) or 'none'})")
                found = {key: npz[key] for key in KEYS}
                names = npz["classes"] if "classes" in npz.files else None
        except DataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not an .npz, cut short, object arrays
            raise self._fail(f"cannot be read as an .npz file ({type(err).__name__}: {' '.join(str(err).split())})") \
                from err
        splits = {}
        for split in ("train", "test"):
            images, labels = found[f"x_{split}"], found[f"y_{split}"]
            if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or not len(images):
                raise self._fail(f"holds x_{split} of shape {images.shape} and type {images.dtype}, "
                                 f"not uint8 images (N, {SIDE}, {SIDE})")
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
                raise self._fail(f"holds y_{split} of shape {labels.shape} and type {labels.dtype}, not "
                                 f"{len(images)} integer labels >= 0 for its {len(images)} images")
            splits[split] = (images, labels.astype(np.int64))
        count = int(max(labels.max() for _, labels in splits.values())) + 1
        if names is not None and len(names) != count:
            raise self._fail(f"names {len(names)} classes, but its labels go up to {count - 1}")
        self.classes = tuple(str(name) for name in names) if names is not None else tuple(map(str, range(count)))
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        return splits

    def describe(self) -> dict:
        """The run's dataset in the MLflow UI: the file's name, and its SHA-256 in the digest."""
        return {"name": f"npz_images ({Path(self.path).name})", "url": None, "checksums": [self.sha256]}
