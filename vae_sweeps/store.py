"""The MLflow store: where it is, opening it (created if new, checked first), its locks, reading
its runs, and the repair of a SQLite store that was moved with its artifacts.

The default store is a SQLite database under ``mlruns/`` with artifacts beside it in
``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` wins over ``tracking.uri`` so a team can
point every job at a server. What a run records in it is tracking.py's; a run's life, runs.py's.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import sqlite3
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow import MlflowClient

from vae_sweeps import identity
from vae_sweeps.errors import UserError, redact
from vae_sweeps.faults import uninterrupted

log = logging.getLogger(__name__)

# The experiment tag by which MLflow 3 marks a model-training experiment (values: its UI's
# ExperimentKind). UIs without the sidebar's "GenAI / Model training" switch open such an
# experiment on its runs; in MLflow 3.17 the switch decides (docs/tracking-ui.md).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# (table, key column, artifact location column) of a SQLite store's absolute artifact locations
ARTIFACT_COLUMNS = (("experiments", "experiment_id", "artifact_location"), ("runs", "run_uuid", "artifact_uri"),
                    ("logged_models", "model_id", "artifact_location"))


def resolve_uri(configured: str) -> str:
    """A job's tracking URI: MLFLOW_TRACKING_URI if set, else ``configured`` (``absolute_uri``)."""
    return absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or configured)


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute, so that every job finds the same database."""
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
    that failed this way was rolled back, so it is safe to repeat. A signal during a call is
    raised when the call returns (``faults.uninterrupted``).
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
                    with uninterrupted():  # a signal mid-commit would leave SQLite locked by us
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


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise UserError unless the tracking server at ``uri`` answers within ``timeout`` seconds:
    one plain request to its /health, where MLflow would retry for minutes. Any answer will do
    (an HTTP error, or a TLS certificate that MLflow's own settings may accept). Stores that
    are not servers pass."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    health = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/") + "/health"))
    try:
        urllib.request.urlopen(health, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, http.client.HTTPException) as err:  # refused, unknown host, timed out, a bad port
        reason = getattr(err, "reason", err)
        if not isinstance(reason, ssl.SSLError):
            raise UserError(f"The MLflow tracking server at {redact(uri)} does not answer ({reason}), so nothing "
                            "was trained. Start one with make server (http://127.0.0.1:5000) and point tracking.uri "
                            "or MLFLOW_TRACKING_URI at it, or use the local store: leave MLFLOW_TRACKING_URI unset "
                            "and tracking.uri at its default, sqlite:///mlruns/mlflow.db.") from err


def check_writable(db: Path) -> None:
    """Create the folder of the SQLite store ``db`` if new, and raise UserError unless this user
    can write it, the database and the store's lock file: MLflow would find out only at its
    first write ("attempt to write a readonly database"), in a cascade of tracebacks."""
    elsewhere = "log into another store: tracking.uri=sqlite:////path/to/mlflow.db, or a server (make server)"
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"The MLflow store {db} cannot be created ({err}); {elsewhere}.") from err
    for path in (db.parent, db, store_lock(db)):
        if path.exists() and not os.access(path, os.W_OK):
            raise UserError(f"The MLflow store {db} is read-only: this user cannot write {path}, so no run can be "
                            f"logged there. Make it writable, or {elsewhere}.")


def quiet_downloads() -> None:
    """No progress bar for each checkpoint or figure fetched from the store (a resume, the
    judge, a back-fill, a report): in a log, two bars per run are noise. The user's
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings them back."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def open_store(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client of the store at ``uri`` and the id of ``experiment``, both created if new.

    A new experiment in a SQLite store keeps its artifacts in ``artifacts/`` beside the
    database; on a server the server decides. A SQLite store that was moved or copied
    with its ``artifacts/`` is pointed at them again (``follow_moved_artifacts``). The
    experiment is tagged as a model-training one (EXPERIMENT_KIND) for the MLflow UI. A server
    that does not answer, or a SQLite store that cannot be written, is a UserError up front.
    """
    check_reachable(uri)
    db = sqlite_path(uri)
    artifact_location = None
    if db is not None:
        check_writable(db)
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
    the store's lock; other writers (an MLflow server) wait for SQLite's own write lock. A
    process that already wrote or read a run's artifacts goes on using their old place for that
    run (MLflow caches it per process, by run id); the next process finds them here.
    """
    if not db.is_file():
        return
    db = db.resolve()  # locations are absolute: a relative db would seem to have moved
    with closing(sqlite3.connect(db, timeout=60, isolation_level=None)) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:  # not created yet
            return
        locations = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
        roots = {root for root in (_old_root(location, db) for location in locations) if root is not None}
        if not roots:
            return
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


@contextmanager
def lock(uri: str, name: str):
    """Hold the lock named ``name`` of the store at ``uri``: a configuration's (its run key) while a
    job looks for its runs and starts or resumes one, so that of two launches of one configuration
    at the same moment the second sees the first one's run; a judge's while it is trained. The
    lock is a file beside a SQLite store, or in this host's temporary folder for a server, where
    launches on two hosts are kept apart in the store itself (runs.claimed)."""
    db = sqlite_path(uri)
    if db is not None:
        folder = db.parent / "locks"
    else:
        user = os.getuid() if hasattr(os, "getuid") else ""
        folder = Path(tempfile.gettempdir()) / f"vae_sweeps-{user}-locks" / hashlib.sha256(uri.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / f"{name}.lock"):
        yield



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


def runs_of(client: MlflowClient, experiment_id: str, key: str, status: str) -> list:
    """The runs of ``experiment_id`` with ``status`` whose identity is ``key``, newest first.
    The identity comes from each run's params (identity.key_of), so runs logged by an older
    vae_sweeps are found too."""
    runs = every_run_in(client, experiment_id, f"attributes.status = '{status}'")
    return sorted((run for run in runs if identity.key_of(run.data.params) == key),
                  key=lambda run: run.info.start_time, reverse=True)


def latest_run(client: MlflowClient, experiment_id: str, key: str, status: str):
    """The newest run of ``experiment_id`` with identity ``key`` and ``status``, or None."""
    runs = runs_of(client, experiment_id, key, status)
    return runs[0] if runs else None


def finished_keys(uri: str, experiment: str) -> set[str]:
    """The identities of every FINISHED run of ``experiment``, from their params (creates no store)."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return set()
    client = RetryingClient(MlflowClient(tracking_uri=uri))
    return {identity.key_of(run.data.params) for run in every_run(client, experiment, "attributes.status = 'FINISHED'")}
