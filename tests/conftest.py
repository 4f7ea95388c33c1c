"""Shared fixtures: tiny generated datasets in torchvision's layout, composed configs, and
a helper to run the CLI in a subprocess against a temporary MLflow store."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from vae_sweeps import resolvers

# Tests never phone home (MLflow 3 sends usage telemetry by default).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# Tiny datasets: 96 training images (the last 16 for validation), 32 test images.
N_TRAIN, N_TEST, VAL_SIZE, BATCH = 96, 32, 16, 16


# ---------------------------------------------------------------------------- how two workers share the tests

# `make test` runs two tests at once (pytest-xdist, --dist loadscope), each sent to whichever
# worker is free, but the tests that share a costly fixture to one worker, so that it is built
# once: a module-scoped fixture (the modules that have one), or an experiment's composed plan
# (test_experiments.py's tests parametrized by the experiment). The tests that start the most jobs
# go first, so that the last ones to run are short and the two workers end together.
SHARED_FIXTURE_MODULES = tuple(sorted(path.name for path in Path(__file__).parent.glob("test_*.py")
                                      if 'scope="module"' in path.read_text()))
LONGEST_FIRST = ("test_real_mnist.py", "test_tuning.py", "test_resilience.py", "test_faults.py")


def scope_of(nodeid: str) -> str:
    """The unit of tests that one worker runs (see above): a module, an experiment's tests, or a test."""
    module, _, name = nodeid.partition("::")
    if Path(module).name in SHARED_FIXTURE_MODULES:
        return module
    if Path(module).name == "test_experiments.py" and "[" in name:
        return f"{module}[{name.split('[', 1)[1]}"
    return nodeid


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: Path(item.nodeid.partition("::")[0]).name not in LONGEST_FIRST)  # a stable sort


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return SharedFixtureScheduling(config, log)


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 array as IDX bytes: magic 0x0000 08 <ndim>, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of class k: a bright 8x8 square at a class-dependent place, over faint noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for image, k in zip(images, labels):
        row, col = 2 + (k // 5) * 14, 2 + (k % 5) * 5
        image[row:row + 8, col:col + 8] = 255
    return images, labels.astype(np.uint8)


def write_dataset(root: Path, folder: str, gz: bool = True) -> Path:
    raw = root / folder / "raw"
    suffix = ".gz" if gz else ""
    for prefix, n, seed in (("train", N_TRAIN, 0), ("t10k", N_TEST, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root


@pytest.fixture(autouse=True, scope="session")
def _resolvers_registered():
    """The config's resolvers (${launch_id:}, ${jobs_at_once:...}), registered as the command line
    registers them before Hydra composes: the tests compose the config themselves."""
    resolvers.register()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' own torch work on one thread, as their jobs' (JOB_THREADS)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """A new SQLite store with MLflow's tables made and no experiment of ours: MLflow's schema
    migrations take about 4 s per new store, which most tests need not pay again."""
    db = tmp_path_factory.mktemp("migrated") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(autouse=True)
def _store_made(request):
    """The store of a test that has a tmp_path (tmp_path/mlruns/mlflow.db) starts as a copy of
    ``migrated_db``, unless the test is marked ``fresh_store``: those test the making of a new
    store, or that none is made. Every other store in a test is made as a user's is."""
    if "tmp_path" not in request.fixturenames or request.node.get_closest_marker("fresh_store"):
        return
    db = request.getfixturevalue("tmp_path") / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(request.getfixturevalue("migrated_db"), db)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A data root with tiny MNIST (gzipped) and Fashion-MNIST (plain) files."""
    root = tmp_path_factory.mktemp("datasets")
    write_dataset(root, "MNIST", gz=True)
    write_dataset(root, "FashionMNIST", gz=False)
    return root


# One torch thread per job: `make test` runs two tests at once, and a job of either would otherwise
# take every usable core (threads=null), so 2 cores ran 4 threads or more, which spin-wait on each
# other: two tiny jobs at once took 1.23 times as long (docs/code-layout.md). A test of how
# `threads` is derived passes threads=null after these overrides (the last value wins).
JOB_THREADS = "threads=1"


def tiny_overrides(tmp_path: Path, tiny_root: Path) -> list[str]:
    """Overrides that make a job train for 2 short epochs on the tiny data, into tmp_path, on one
    torch thread (JOB_THREADS)."""
    return [
        JOB_THREADS,
        f"data.root={tiny_root}",
        f"data.val_size={VAL_SIZE}",
        f"data.batch_size={BATCH}",
        "data.download=false",
        "data.verify=false",  # generated files, not the published ones
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
    ]


def compose_tiny(tmp_path: Path, tiny_root: Path, *overrides: str):
    """The project's config composed as the CLI would, for a tiny job writing into tmp_path."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[
            *tiny_overrides(tmp_path, tiny_root), f"paths.output_dir={tmp_path / 'out'}", *overrides])


@pytest.fixture
def make_cfg(tmp_path, tiny_root, monkeypatch):
    """compose_tiny into this test's tmp_path, with MLFLOW_TRACKING_URI unset."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return lambda *overrides: compose_tiny(tmp_path, tiny_root, *overrides)


def tmp_store(tmp_path: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def prepared_store(tmp_path: Path) -> MlflowClient:
    """The tmp store, created (as a sweep's callback does) before a job that the test will
    poll starts: two processes must not create one new SQLite store at once."""
    from vae_sweeps.store import open_store

    return open_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")[0]


def all_runs(tmp_path: Path) -> list:
    """Every run in the tmp store, of every experiment but the judges' (judge.py); [] if no
    store was created."""
    if not (tmp_path / "mlruns" / "mlflow.db").exists():
        return []
    client = tmp_store(tmp_path)
    ids = [e.experiment_id for e in client.search_experiments() if not e.name.endswith("-judges")]
    return client.search_runs(ids) if ids else []


def finished_run(client: MlflowClient, experiment: str, settings: dict, *, metrics: dict | None = None,
             val_losses: tuple[float, ...] = (), tags: dict | None = None, end_time: int | None = None) -> str:
    """A FINISHED run of the MLflow experiment ``experiment`` (made if new) with a real run's
    params (``settings``, every other result setting at its default: identity.completed), its
    ``val/loss`` per epoch (``val_losses``, epochs 1, 2, ...), last ``metrics`` and ``tags``."""
    from mlflow.entities import Metric, Param, RunTag

    from vae_sweeps import identity

    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, start_time=(end_time or 10 ** 12) - 1000)
    params = identity.completed({k: str(v) for k, v in settings.items()})
    last = max(len(val_losses), 1)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[*(Metric("val/loss", value, 0, epoch) for epoch, value in enumerate(val_losses, start=1)),
                              *(Metric(k, v, 0, last) for k, v in (metrics or {}).items())],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    client.set_terminated(run.info.run_id, "FINISHED", end_time=end_time)
    return run.info.run_id


def fake_trial(client: MlflowClient, study: str, trial: int, state: str, value: float, epochs: int, end_time: int,
               searched: dict, experiment: str = "vae_sweeps", **settings) -> str:
    """A tuning trial's run as vae_sweeps/trials.py records it, in ``experiment``'s trials
    experiment: the study ``tune_table1/model=<model>`` (the part before the "/" is its tuning
    experiment), a seed of its own (100), its ``searched`` settings and the other ``settings``
    as params, ``epochs`` val/loss values ending at ``value``, the tuning tags."""
    from vae_sweeps import trials

    tags = {trials.EXPERIMENT: study.split("/")[0], trials.STUDY: study, trials.TRIAL: trial, trials.STATE: state,
            trials.EPOCHS: epochs, trials.VALUE: value, trials.KEYS: ",".join(searched)}
    return finished_run(client, trials.trials_experiment(experiment), {"seed": 100, **settings, **searched},
                    val_losses=(value + 10.0,) * (epochs - 1) + (value,), tags=tags, end_time=end_time)


def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG file, after checking its signature and header chunk."""
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def slowed_cli(seconds_per_epoch: float, patch: str = "") -> list[str]:
    """``python -m vae_sweeps`` in which every training epoch lasts at least
    ``seconds_per_epoch``, so that a test which interrupts a run mid-training is not outrun
    by tiny epochs on a fast machine; ``patch``: Python statements run first."""
    code = (f"{patch}\nimport runpy, time; from vae_sweeps.module import VAEModule; "
            f"VAEModule.on_train_epoch_start = lambda self: time.sleep({seconds_per_epoch}); "
            "runpy.run_module('vae_sweeps', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]


def job_env() -> dict[str, str]:
    """The environment of a job the test starts: this one, unbuffered, without
    MLFLOW_TRACKING_URI (the job's own ``tracking.uri`` names the tmp store)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(tmp_path: Path, tiny_root: Path, *args: str, flags: tuple[str, ...] = (),
            timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m vae_sweeps <flags> <tiny overrides> <args>`` in tmp_path (outputs/ go there)."""
    return subprocess.run(
        [sys.executable, "-m", "vae_sweeps", *flags, *tiny_overrides(tmp_path, tiny_root), *args],
        cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=timeout,
    )
