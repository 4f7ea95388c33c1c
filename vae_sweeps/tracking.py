"""MLflow tracking: the store, one run per job, its params, per-epoch metrics and artifacts.

The default store is a SQLite database under ``mlruns/`` with artifacts beside it in
``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` wins over ``tracking.uri`` so a team can
point every job at a server. Runs are written through an explicit ``MlflowClient`` and run
id: no global "active run", so nothing opens a second run by accident.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from vae_sweeps import identity

log = logging.getLogger(__name__)

SWEEP_ID_ENV = "VAE_SWEEPS_SWEEP_ID"
# The experiment tag that MLflow 3's UI reads to open an experiment on its runs (a model
# training experiment) rather than on GenAI traces; the values are the UI's ExperimentKind.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}  # as the runs table shows them
# (table, key column, artifact location column) of a SQLite store's absolute artifact locations
ARTIFACT_COLUMNS = (("experiments", "experiment_id", "artifact_location"), ("runs", "run_uuid", "artifact_uri"),
                    ("logged_models", "model_id", "artifact_location"))


# ---------------------------------------------------------------------------- the store


def resolve_uri(configured: str) -> str:
    """The tracking URI to use: MLFLOW_TRACKING_URI if set, else ``configured``; a relative
    SQLite path is made absolute so that every job finds the same database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


class RetryingClient:
    """An MlflowClient whose calls are retried while SQLite answers "database is locked".

    MLflow already waits up to 20 s for SQLite's lock; many parallel jobs on one database
    can wait longer, and a failed write would lose a metric or leave a run RUNNING. A write
    that failed this way was rolled back, so it is safe to repeat.
    """

    def __init__(self, client: MlflowClient, attempts: int = 6, wait: float = 1.0):
        self.client, self.attempts, self.wait = client, attempts, wait

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def call(*args, **kwargs):
            for attempt in range(1, self.attempts + 1):
                try:
                    return method(*args, **kwargs)
                except Exception as err:
                    if "database is locked" not in str(err) or attempt == self.attempts:
                        raise
                    delay = self.wait * 2 ** (attempt - 1)
                    log.warning("MLflow store is locked (%s); retrying in %.0f s", name, delay)
                    time.sleep(delay)

        return call


@contextmanager
def exclusive(path: Path | None):
    """Hold an exclusive lock on ``path`` (POSIX; nothing elsewhere or for None): two
    processes creating one new SQLite store at once would crash in its schema migration."""
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def store_lock(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


def open_store(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client of the store at ``uri`` and the id of ``experiment``, both created if new.

    A new experiment in a SQLite store keeps its artifacts in ``artifacts/`` beside the
    database; on a server the server decides. A SQLite store that was moved or copied
    with its ``artifacts/`` is pointed at them again (``follow_moved_artifacts``). The
    experiment is tagged as a model-training one, so that the MLflow UI opens on its runs.
    """
    db = sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent / "artifacts").as_uri()
    with exclusive(store_lock(db) if db is not None else None):
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        found = client.get_experiment_by_name(experiment)  # creates and migrates a new store
        if db is not None:
            follow_moved_artifacts(db)
    if found is None:
        try:
            return client, client.create_experiment(experiment, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND: MODEL_TRAINING})
        except Exception:  # created by a concurrent job in the meantime
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        log.warning("Restoring the deleted MLflow experiment %r to log into it.", experiment)
        client.restore_experiment(found.experiment_id)
    if EXPERIMENT_KIND not in found.tags:  # made before this tag was set
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return client, found.experiment_id


def _file_path(uri: str) -> Path | None:
    """The local path of a ``file:`` URI (None for other schemes)."""
    parts = urlsplit(uri)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def _old_root(location: str, db: Path) -> Path | None:
    """The folder that held the store whose artifact location is ``location``, if that store
    now lives beside ``db``: the location is outside ``db``'s folder, its trailing part
    (``artifacts``, say) is found there, and the old location is gone or belongs to another
    store (a copy's original: its folder holds a database of the same name)."""
    path = _file_path(location)
    if path is None or path.is_relative_to(db.parent):
        return None
    for k in range(1, len(path.parts)):
        root = Path(*path.parts[:-k])
        if db.parent.joinpath(*path.parts[-k:]).exists():
            return root if not path.exists() or (root / db.name).is_file() else None
    return None


def follow_moved_artifacts(db: Path) -> None:
    """Point the artifact locations of the SQLite store ``db`` at its own folder again after
    the store (database and ``artifacts/`` together) was moved or copied elsewhere.

    MLflow keeps absolute ``file://`` locations per experiment and per run and has no API to
    change them, so this rewrites them in the database (one transaction). The caller holds
    the store's lock; other writers (an MLflow server) wait for SQLite's own write lock.
    """
    if not db.is_file():
        return
    with closing(sqlite3.connect(db, timeout=60, isolation_level=None)) as con:
        locations = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
        roots = {root for root in (_old_root(location, db) for location in locations) if root is not None}
        if not roots:
            return
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        con.execute("BEGIN IMMEDIATE")
        try:
            changed = {}
            for table, key, column in ARTIFACT_COLUMNS:
                if table not in tables:
                    continue
                rows = con.execute(f"SELECT {key}, {column} FROM {table}").fetchall()
                updates = [(moved, row_id) for row_id, location in rows
                           if (moved := _moved_uri(location, roots, db.parent)) is not None]
                con.executemany(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", updates)
                changed[table] = len(updates)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    log.warning("The MLflow store %s was moved or copied from %s; its artifact locations now point beside it "
                "(%s; rewritten in the database with SQL, as MLflow has no API for this).", db,
                ", ".join(map(str, sorted(roots))), ", ".join(f"{n} {table}" for table, n in changed.items()))


def _moved_uri(location: str | None, roots: set[Path], here: Path) -> str | None:
    """``location`` under ``here`` instead of one of ``roots`` (None if under none of them)."""
    path = _file_path(location) if location else None
    for root in roots:
        if path is not None and path.is_relative_to(root):
            return (here / path.relative_to(root)).as_uri()
    return None


def repair_moved_store(uri: str) -> None:
    """``follow_moved_artifacts`` for a reader of an existing SQLite store (the report),
    under the store's lock; nothing for other stores or a database that does not exist."""
    db = sqlite_path(uri)
    if db is not None and db.is_file():
        with exclusive(store_lock(db)):
            follow_moved_artifacts(db)


# ---------------------------------------------------------------------------- a run's record


def redact(uri: str) -> str:
    """``uri`` without its password, if it has one."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def config_yaml(cfg: DictConfig) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if "tracking" in resolved:
        resolved["tracking"]["uri"] = redact(str(resolved["tracking"]["uri"]))
    return OmegaConf.to_yaml(resolved)


def git_tags() -> dict[str, str]:
    """The commit of the code that runs, and whether it has uncommitted changes."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(git("status", "--porcelain")))}


def runs_of(client: MlflowClient, experiment_id: str, key: str, status: str) -> list:
    """The runs of ``experiment_id`` with ``status`` whose identity is ``key``, newest first.
    The identity comes from each run's params (identity.key_of), not from its ``config_hash``
    tag, so runs logged by an older vae_sweeps are found too."""
    runs = every_run_in(client, experiment_id, f"attributes.status = '{status}'")
    return sorted((run for run in runs if identity.key_of(run.data.params) == key),
                  key=lambda run: run.info.start_time, reverse=True)


def latest_run(client: MlflowClient, experiment_id: str, key: str, status: str):
    """The newest run of ``experiment_id`` with identity ``key`` and ``status``, or None."""
    runs = runs_of(client, experiment_id, key, status)
    return runs[0] if runs else None


def close_dead_runs(client: MlflowClient, experiment_id: str, key: str) -> None:
    """Mark FAILED the RUNNING runs of this configuration whose process, on this host, is
    gone (killed with SIGKILL, say, which leaves no chance to close the run)."""
    for run in runs_of(client, experiment_id, key, "RUNNING"):
        tags = run.data.tags
        if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
            continue  # another machine's run: it may well be alive
        try:
            os.kill(int(tags["pid"]), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        client.set_tag(run.info.run_id, "error", f"its process {tags['pid']} ended without closing the run")
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("Run %s was left RUNNING by a process that is gone; marked FAILED", run.info.run_id)


def every_run_in(client: MlflowClient, experiment_id: str, filter_string: str = ""):
    """Every run of the experiment ``experiment_id`` that matches ``filter_string``, page by page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def every_run(client: MlflowClient, experiment: str, filter_string: str = ""):
    """Every run of the experiment named ``experiment`` that matches ``filter_string`` (none if
    there is no such experiment)."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        yield from every_run_in(client, found.experiment_id, filter_string)


def finished_keys(uri: str, experiment: str) -> set[str]:
    """The identities of every FINISHED run of ``experiment``, from their params (creates no store)."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return set()
    client = RetryingClient(MlflowClient(tracking_uri=uri))
    return {identity.key_of(run.data.params) for run in every_run(client, experiment, "attributes.status = 'FINISHED'")}


def new_sweep_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_run(client: MlflowClient, experiment_id: str, cfg: DictConfig, output_dir: Path) -> str:
    """Create the run of one job and log its params, tags and resolved config."""
    tags = {"mlflow.source.name": "vae_sweeps", "config_hash": identity.run_key(cfg), "output_dir": str(output_dir),
            "host": socket.gethostname(), "pid": str(os.getpid()), **git_tags(),
            **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in some containers
        pass
    if sweep_id := os.environ.get(SWEEP_ID_ENV):
        tags["sweep_id"] = sweep_id
    run_id = client.create_run(experiment_id, run_name=identity.run_name(cfg), tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in identity.params(cfg).items()])
    client.log_text(run_id, config_yaml(cfg), "config.yaml")
    return run_id


def describe_run(client: MlflowClient, run_id: str, datamodule, caption: str) -> None:
    """What the MLflow UI shows of a run besides its params: its dataset as a dataset input
    (the runs table's Dataset column: name, split sizes, digest) and ``caption`` as its
    description. The digest hashes the dataset's name, split sizes and published file
    checksums: cheap, and it changes with the validation split."""
    from vae_sweeps.data import DATASETS  # torchvision: a job has loaded it already

    source = DATASETS[datamodule.name]
    sizes = {split: len(labels) for split, (_, labels) in datamodule.splits.items()}
    checksums = [md5 for _, md5 in source.resources]
    digest = hashlib.sha256(json.dumps([datamodule.name, sizes, checksums]).encode()).hexdigest()[:8]
    dataset = Dataset(name=DATASET_NAMES.get(datamodule.name, datamodule.name), digest=digest, source_type="http",
                      source=json.dumps({"url": source.mirrors[0]}), profile=json.dumps(sizes))
    client.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
    client.set_tag(run_id, MLFLOW_RUN_NOTE, caption)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` in one batch, at ``step`` (the number of completed epochs)."""
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class PrepareTracking(Callback):
    """Hydra callback: before the jobs of a multirun start, create the store and the
    experiment once (SQLite's schema migration is not safe to run from jobs in parallel)
    and give the sweep an id that every job tags its run with."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.sweeper.get("dry_run"):
            return
        open_store(resolve_uri(config.tracking.uri), config.tracking.experiment)
        os.environ[SWEEP_ID_ENV] = new_sweep_id()
        log.info("Sweep id %s", os.environ[SWEEP_ID_ENV])

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(SWEEP_ID_ENV, None)
