"""Loading through torchvision with the project's checks and errors, and the in-memory DataModule."""

import functools
import gzip
import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BATCH, N_TEST, N_TRAIN, VAL_SIZE, fake_digits, idx_bytes, write_idx
from torchvision import datasets

from vae_sweeps import data
from vae_sweeps.data import ImageDataModule, TensorBatches, load_arrays
from vae_sweeps.errors import DataError

REAL_ROOT = Path(os.environ.get("VAE_SWEEPS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
STEMS = data.STEMS


def write_mnist(root: Path, gz: bool = False, n_train: int = 8, n_test: int = 4) -> Path:
    """Tiny MNIST files under root/MNIST/raw (plain, or gzipped only)."""
    raw = root / "MNIST" / "raw"
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}", labels)
    return raw


# ---------------------------------------------------------------------------- files torchvision reads


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped only"])
def test_files_plain_or_gzipped_load_through_torchvision(tmp_path, gz):
    raw = write_mnist(tmp_path, gz=gz)
    arrays = load_arrays("mnist", tmp_path, download_missing=False, verify=False)
    images, labels = fake_digits(8, 0)
    np.testing.assert_array_equal(arrays["train"][0], images)
    assert arrays["train"][1].tolist() == labels.tolist() and arrays["test"][0].shape == (4, 28, 28)
    assert all((raw / stem).is_file() for stem in STEMS)  # torchvision's layout: the plain files
    assert not list(raw.glob(".*part"))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_a_truncated_file_is_a_clear_error(tmp_path, gz):
    raw = write_mnist(tmp_path)
    cut = idx_bytes(np.ones((4, 28, 28)))[:-100]
    target = raw / "t10k-images-idx3-ubyte"
    if gz:
        target.unlink()
        target = raw / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated: 3052 bytes, but a \(4, 28, 28\) "
                                        r"array needs 3152"):
        load_arrays("mnist", tmp_path, download_missing=False)


@pytest.mark.parametrize("cut", [-20, 30], ids=["end", "start"])
def test_a_damaged_gzip_stream_is_a_clear_error_and_leaves_nothing(tmp_path, cut):
    raw = write_mnist(tmp_path, gz=True)
    packed = gzip.compress(idx_bytes(np.ones((4, 28, 28))))
    damaged = packed[:cut] if cut < 0 else packed[:cut] + bytes(len(packed) - cut)  # zeros from byte 30 on
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(damaged)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is a damaged gzip file"):
        load_arrays("mnist", tmp_path, download_missing=False)
    assert not (raw / "t10k-images-idx3-ubyte").exists() and not list(raw.glob(".*part"))


def test_a_foreign_file_is_a_clear_error(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte is not an IDX file of unsigned bytes: its magic "
                                        "number is 0x504b0304"):
        load_arrays("mnist", tmp_path, download_missing=False)


def test_a_header_cut_short_is_a_clear_error(tmp_path):
    raw = write_mnist(tmp_path)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (60000).to_bytes(4, "big"))
    with pytest.raises(DataError, match="truncated inside its header"):
        load_arrays("mnist", tmp_path, download_missing=False)


def test_labels_that_do_not_match_the_images_are_a_clear_error(tmp_path):
    raw = write_mnist(tmp_path)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(7))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte holds labels of shape \(7,\), expected \(8,\)"):
        load_arrays("mnist", tmp_path, download_missing=False)


# ---------------------------------------------------------------------------- downloads (torchvision's)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP mirror (127.0.0.1) of tiny gz files, with their MD5s as torchvision's resources."""
    served = tmp_path / "mirror"
    write_mnist(served, gz=True)
    files = served / "MNIST" / "raw"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    resources = [(f"{stem}.gz", hashlib.md5((files / f"{stem}.gz").read_bytes()).hexdigest()) for stem in STEMS]
    monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(datasets.MNIST, "resources", resources)
    yield files
    server.shutdown()


def test_missing_files_are_downloaded_and_checked(tmp_path, mirror):
    root = tmp_path / "root"
    arrays = load_arrays("mnist", root, verify=False)
    assert arrays["train"][0].shape == (8, 28, 28)
    assert all((root / "MNIST" / "raw" / stem).is_file() for stem in STEMS)


def test_a_download_that_fails_its_checksum_is_a_clear_error(tmp_path, mirror, monkeypatch):
    monkeypatch.setattr(datasets.MNIST, "resources", [(f"{stem}.gz", "0" * 32) for stem in STEMS])
    root = tmp_path / "root"
    with pytest.raises(DataError) as err:
        load_arrays("mnist", root)
    assert "could not be loaded" in str(err.value) and "data.root=" in str(err.value)
    assert not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_unreachable_mirrors_name_the_missing_files_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    root = tmp_path / "root"
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(8))
    with pytest.raises(DataError) as err:
        load_arrays("mnist", root)
    message = str(err.value)
    assert "\n" not in message  # one paragraph
    for expected in ["train-images-idx3-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
                     str((root / "MNIST" / "raw").resolve()), "Error downloading", "data.root=",
                     "VAE_SWEEPS_DATA_DIR"]:
        assert expected in message
    assert "train-labels" not in message.split("could not be loaded")[0]


def test_download_off_says_so(tmp_path):
    with pytest.raises(DataError, match=r"Downloading is off \(data.download=false\)"):
        load_arrays("fashion_mnist", tmp_path, download_missing=False)


# ---------------------------------------------------------------------------- the files' content


@pytest.mark.skipif(not (REAL_ROOT / "MNIST" / "raw").is_dir(), reason="the real MNIST is not at VAE_SWEEPS_DATA_DIR")
def test_another_datasets_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in STEMS:  # MNIST's files where Fashion-MNIST's belong: the same names, sizes and format
        shutil.copy(REAL_ROOT / "MNIST" / "raw" / stem, raw)
    with pytest.raises(DataError) as err:
        load_arrays("fashion_mnist", tmp_path / "root", download_missing=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{raw / 'train-images-idx3-ubyte'} is not the fashion_mnist dataset's "
                              "train-images-idx3-ubyte: it holds mnist's train-images-idx3-ubyte")
    assert f"in {raw}" in message and "data.root=" in message and "data.verify=false" in message


def test_file_digests_are_read_again_only_for_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = write_mnist(tmp_path)
    digests = {stem: hashlib.sha256((raw / stem).read_bytes()).hexdigest() for stem in STEMS}
    monkeypatch.setitem(data.SHA256, "mnist", digests)  # the tiny files are the published ones
    hashed = []
    monkeypatch.setattr(data, "sha256", lambda path, real=data.sha256: hashed.append(path.name) or real(path))
    load_arrays("mnist", tmp_path, download_missing=False)
    assert sorted(hashed) == sorted(STEMS)
    hashed.clear()
    load_arrays("mnist", tmp_path, download_missing=False)
    assert hashed == []  # the cache answered
    write_idx(raw / "t10k-labels-idx1-ubyte", (fake_digits(4, 1)[1] + 1) % 10)  # the same size, other labels
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not the mnist dataset's t10k-labels-idx1-ubyte"):
        load_arrays("mnist", tmp_path, download_missing=False)
    assert hashed == ["t10k-labels-idx1-ubyte"]


# ---------------------------------------------------------------------------- the DataModule


def test_datamodule_splits_and_pixels(tiny_root):
    dm = ImageDataModule("mnist", str(tiny_root), download=False, batch_size=BATCH, val_size=VAL_SIZE, verify=False)
    dm.load()
    train_x, train_y = dm.splits["train"]
    val_x, val_y = dm.splits["val"]
    test_x, _ = dm.splits["test"]
    assert train_x.shape == (N_TRAIN - VAL_SIZE, 1, 28, 28) and train_x.dtype == torch.float32
    assert val_x.shape == (VAL_SIZE, 1, 28, 28) and test_x.shape == (N_TEST, 1, 28, 28)
    raw, labels = fake_digits(N_TRAIN, 0)
    # validation = the last VAL_SIZE training images, scaled to [0, 1]
    np.testing.assert_allclose(val_x[:, 0].numpy(), raw[-VAL_SIZE:] / 255.0, rtol=1e-6)
    assert val_y.tolist() == labels[-VAL_SIZE:].tolist()
    assert train_x.min() >= 0.0 and train_x.max() == 1.0
    assert dm.classes[3] == "3"


def test_shuffled_batches_hold_every_row_once_in_an_order_of_seed_and_epoch():
    rows = torch.arange(10)
    images = rows.float().view(10, 1, 1, 1)

    def orders(seed, epochs):
        batches = TensorBatches(images, rows, batch_size=3, shuffle=True, seed=seed, epoch=lambda: epochs.pop(0))
        assert len(batches) == 4
        out = []
        while epochs:
            pass_ = list(batches)
            assert [len(y) for _, y in pass_] == [3, 3, 3, 1]
            order = torch.cat([y for _, y in pass_])
            assert torch.equal(torch.cat([x for x, _ in pass_]).view(-1).long(), order)  # rows stay paired
            assert sorted(order.tolist()) == list(range(10))
            out.append(order)
        return out

    first = orders(0, [0, 1, 2])
    assert all(torch.equal(a, b) for a, b in zip(first, orders(0, [0, 1, 2])))
    assert not torch.equal(first[0], first[1])  # a new permutation each epoch
    assert torch.equal(orders(0, [2])[0], first[2])  # epoch 2 alone (a resumed run) = epoch 2 after 0 and 1
    assert not torch.equal(first[0], orders(1, [0])[0])


def test_datamodule_training_order_depends_only_on_the_seed(tiny_root):
    def labels(seed):
        dm = ImageDataModule("mnist", str(tiny_root), download=False, batch_size=BATCH, val_size=VAL_SIZE, seed=seed,
                             verify=False)
        dm.load()
        return torch.cat([y for _, y in dm.batches("train", shuffle=True)])

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))


def test_validation_and_test_batches_keep_file_order_and_last_batch(tiny_root):
    dm = ImageDataModule("fashion_mnist", str(tiny_root), download=False, batch_size=10, val_size=VAL_SIZE, verify=False)
    dm.load()
    sizes = [len(x) for x, _ in dm.batches("test")]
    assert sizes == [10, 10, 10, 2]
    assert torch.equal(torch.cat([y for _, y in dm.batches("test")]), dm.splits["test"][1])
    assert dm.classes[9] == "Ankle boot"


def test_val_size_must_leave_training_images(tiny_root):
    dm = ImageDataModule("mnist", str(tiny_root), download=False, val_size=N_TRAIN, verify=False)
    with pytest.raises(DataError, match=f"data.val_size={N_TRAIN} is not allowed: it must be between 1 and {N_TRAIN - 1}"):
        dm.load()


def test_the_trainers_datamodule_loads_the_images_and_follows_the_trainers_epoch(tiny_root):
    import pytorch_lightning as pl

    dm = ImageDataModule("mnist", str(tiny_root), download=False, batch_size=BATCH, val_size=VAL_SIZE, verify=False)
    module = dm.lightning()
    assert isinstance(module, pl.LightningDataModule) and not dm.splits
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), current_epoch=3)
    module.setup("fit")
    assert dm.splits["train"][0].shape == (N_TRAIN - VAL_SIZE, 1, 28, 28)
    epoch_3 = torch.cat([y for _, y in dm.batches("train", shuffle=True, epoch=lambda: 3)])
    assert torch.equal(torch.cat([y for _, y in module.train_dataloader()]), epoch_3)
    assert torch.equal(torch.cat([y for _, y in module.val_dataloader()]), dm.splits["val"][1])
    assert torch.equal(torch.cat([y for _, y in module.test_dataloader()]), dm.splits["test"][1])


@pytest.mark.skipif(not (REAL_ROOT / "MNIST" / "raw").is_dir(), reason="the real MNIST is not at VAE_SWEEPS_DATA_DIR")
def test_the_real_mnist():
    arrays = load_arrays("mnist", REAL_ROOT, download_missing=False)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9] and test_y[:3].tolist() == [7, 2, 1]
    assert np.bincount(train_y).tolist()[:2] == [5923, 6742]
