"""IDX files, downloads with checksums, and the in-memory DataModule."""

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BATCH, N_TEST, N_TRAIN, VAL_SIZE, idx_bytes, write_idx

from vae_sweeps import data
from vae_sweeps.data import DATASETS, DatasetSpec, ImageDataModule, TensorBatches, download, ensure_files, read_idx
from vae_sweeps.errors import DataError

REAL_ROOT = Path(os.environ.get("VAE_SWEEPS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


# ---------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_plain_and_gzipped(tmp_path, suffix):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"images{suffix}", array)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_reads_the_published_layout(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 2, 1]))
    result = read_idx(path)
    assert result.shape == (3,) and result.tolist() == [7, 2, 1]


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_a_clear_error(tmp_path, gz):
    full = idx_bytes(np.ones((4, 28, 28)))
    cut = full[:-100]
    path = tmp_path / ("short.gz" if gz else "short")
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataError, match=r"truncated: 3052 bytes, but a \(4, 28, 28\) array needs 3152"):
        read_idx(path)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.ones((4, 28, 28))))[:-20])
    with pytest.raises(DataError, match="damaged gzip file"):
        read_idx(path)


def test_bad_magic_is_a_clear_error(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="magic number is 0x504b0304"):
        read_idx(path)


def test_header_cut_short_is_a_clear_error(tmp_path):
    path = tmp_path / "header"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 60000))
    with pytest.raises(DataError, match="truncated inside its header"):
        read_idx(path)


# ---------------------------------------------------------------------------- download


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local mirror (file:// URLs) serving tiny gz files; DATASETS["mnist"] points at it."""
    served = tmp_path / "mirror"
    md5 = {}
    for stem, shape in [("train-images-idx3-ubyte", (8, 28, 28)), ("train-labels-idx1-ubyte", (8,)),
                        ("t10k-images-idx3-ubyte", (4, 28, 28)), ("t10k-labels-idx1-ubyte", (4,))]:
        path = write_idx(served / f"{stem}.gz", np.zeros(shape))
        md5[stem] = hashlib.md5(path.read_bytes()).hexdigest()
    spec = DatasetSpec("MNIST", (served.as_uri() + "/",), md5, DATASETS["mnist"].classes)
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    return served


def test_missing_files_are_downloaded_and_checked(tmp_path, mirror):
    root = tmp_path / "root"
    files = ensure_files("mnist", root)
    assert sorted(p.name for p in files.values()) == sorted(p.name for p in mirror.iterdir())
    assert read_idx(files["train-images-idx3-ubyte"]).shape == (8, 28, 28)
    assert not list((root / "MNIST" / "raw").glob(".*part"))


def test_a_download_that_fails_its_checksum_leaves_no_file(tmp_path, mirror):
    good = mirror / "t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / "root" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match="checksum mismatch"):
        download([good.as_uri()], dest, md5="0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_the_next_mirror_is_tried_after_a_failure(tmp_path, mirror):
    good = mirror / "t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / "root" / good.name
    download([(tmp_path / "nowhere.gz").as_uri(), good.as_uri()], dest, hashlib.md5(good.read_bytes()).hexdigest())
    assert dest.read_bytes() == good.read_bytes()


def test_unreachable_mirrors_name_the_missing_files_the_folder_and_the_fix(tmp_path, monkeypatch):
    spec = DatasetSpec("MNIST", ((tmp_path / "offline").as_uri() + "/",), DATASETS["mnist"].md5, ())
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    root = tmp_path / "root"
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(8))
    with pytest.raises(DataError) as err:
        ensure_files("mnist", root)
    message = str(err.value)
    for expected in ["train-images-idx3-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
                     str((root / "MNIST" / "raw").resolve()), "Downloading failed", "data.root=",
                     "VAE_SWEEPS_DATA_DIR"]:
        assert expected in message
    assert "train-labels" not in message.split("are missing")[0]
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == ["train-labels-idx1-ubyte"]


def test_download_off_says_so(tmp_path):
    with pytest.raises(DataError, match=r"Downloading is off \(data.download=false\)"):
        ensure_files("fashion_mnist", tmp_path, download_missing=False)


# ---------------------------------------------------------------------------- the DataModule


def test_datamodule_splits_and_pixels(tiny_root):
    dm = ImageDataModule("mnist", str(tiny_root), download=False, batch_size=BATCH, val_size=VAL_SIZE)
    dm.setup()
    train_x, train_y = dm.splits["train"]
    val_x, val_y = dm.splits["val"]
    test_x, _ = dm.splits["test"]
    assert train_x.shape == (N_TRAIN - VAL_SIZE, 1, 28, 28) and train_x.dtype == torch.float32
    assert val_x.shape == (VAL_SIZE, 1, 28, 28) and test_x.shape == (N_TEST, 1, 28, 28)
    raw = read_idx(tiny_root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")
    labels = read_idx(tiny_root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz")
    # validation = the last VAL_SIZE training images, scaled to [0, 1]
    np.testing.assert_allclose(val_x[:, 0].numpy(), raw[-VAL_SIZE:] / 255.0, rtol=1e-6)
    assert val_y.tolist() == labels[-VAL_SIZE:].tolist()
    assert train_x.min() >= 0.0 and train_x.max() == 1.0
    assert dm.classes[3] == "3"


def test_shuffled_batches_hold_every_row_once_in_a_seeded_order():
    rows = torch.arange(10)
    images = rows.float().view(10, 1, 1, 1)

    def passes(seed, n=2):
        batches = TensorBatches(images, rows, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed))
        assert len(batches) == 4
        out = []
        for _ in range(n):
            pass_ = list(batches)
            assert [len(y) for _, y in pass_] == [3, 3, 3, 1]
            order = torch.cat([y for _, y in pass_])
            assert torch.equal(torch.cat([x for x, _ in pass_]).view(-1).long(), order)  # rows stay paired
            assert sorted(order.tolist()) == list(range(10))
            out.append(order)
        return out

    first, again = passes(0), passes(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # a new permutation each pass
    assert not torch.equal(first[0], passes(1)[0])


def test_datamodule_training_order_depends_only_on_the_seed(tiny_root):
    def labels(seed):
        dm = ImageDataModule("mnist", str(tiny_root), download=False, batch_size=BATCH, val_size=VAL_SIZE, seed=seed)
        dm.setup()
        return torch.cat([y for _, y in dm.train_dataloader()])

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))


def test_validation_and_test_batches_keep_file_order_and_last_batch(tiny_root):
    dm = ImageDataModule("fashion_mnist", str(tiny_root), download=False, batch_size=10, val_size=VAL_SIZE)
    dm.setup()
    sizes = [len(x) for x, _ in dm.test_dataloader()]
    assert sizes == [10, 10, 10, 2]
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), dm.splits["test"][1])
    assert dm.classes[9] == "Ankle boot"


def test_val_size_must_leave_training_images(tiny_root):
    dm = ImageDataModule("mnist", str(tiny_root), download=False, val_size=N_TRAIN)
    with pytest.raises(DataError, match=f"data.val_size={N_TRAIN} is not allowed: it must be between 1 and {N_TRAIN - 1}"):
        dm.setup()


@pytest.mark.skipif(not (REAL_ROOT / "MNIST" / "raw").is_dir(), reason="the real MNIST is not at VAE_SWEEPS_DATA_DIR")
def test_the_real_mnist():
    arrays = data.load_arrays("mnist", REAL_ROOT, download_missing=False)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9] and test_y[:3].tolist() == [7, 2, 1]
    assert np.bincount(train_y).tolist()[:2] == [5923, 6742]
