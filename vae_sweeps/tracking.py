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
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from omegaconf import DictConfig, OmegaConf

from vae_sweeps.config import flatten, result_settings

log = logging.getLogger(__name__)

SWEEP_ID_ENV = "VAE_SWEEPS_SWEEP_ID"
# Not params: machine-specific paths, and the tracking URI (it may hold credentials).
NOT_PARAMS = ("hydra", "paths", "tracking", "tags", "force", "data.root")


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


def open_store(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client of the store at ``uri`` and the id of ``experiment``, both created if new.

    A new experiment in a SQLite store keeps its artifacts in ``artifacts/`` beside the
    database; on a server the server decides.
    """
    db = sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent / "artifacts").as_uri()
    with exclusive(db.with_name(db.name + ".lock") if db is not None else None):
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        found = client.get_experiment_by_name(experiment)  # creates and migrates a new store
    if found is None:
        try:
            return client, client.create_experiment(experiment, artifact_location=artifact_location)
        except Exception:  # created by a concurrent job in the meantime
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        log.warning("Restoring the deleted MLflow experiment %r to log into it.", experiment)
        client.restore_experiment(found.experiment_id)
    return client, found.experiment_id


# ---------------------------------------------------------------------------- a run's record


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as flat ``group.key`` params, without paths and tracking settings."""
    return flatten(cfg, NOT_PARAMS)


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


def run_name(cfg: DictConfig) -> str:
    prior = cfg.prior.name + (f"_{cfg.prior.kl}" if cfg.prior.name == "gmm" else "")
    prior = "" if prior == "standard" else f"-{prior}"
    return (f"{cfg.model.name}-{cfg.loss.name}-z{cfg.model.latent_dim}-c{cfg.loss.c:g}{prior}"
            f"-{cfg.data.name}-s{cfg.seed}")


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


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the settings that change a run's results (seed included; not paths,
    tracking or display settings): runs with the same hash compute the same thing."""
    settings = json.dumps(result_settings(cfg), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def latest_run(client: MlflowClient, experiment_id: str, digest: str, status: str):
    """The newest run of ``experiment_id`` with config hash ``digest`` and ``status``, or None."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.config_hash = '{digest}' and attributes.status = '{status}'")
    return runs[0] if runs else None


def close_dead_runs(client: MlflowClient, experiment_id: str, digest: str) -> None:
    """Mark FAILED the RUNNING runs of this configuration whose process, on this host, is
    gone (killed with SIGKILL, say, which leaves no chance to close the run)."""
    running = client.search_runs([experiment_id], filter_string=f"tags.config_hash = '{digest}' and "
                                 "attributes.status = 'RUNNING'")
    for run in running:
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


def every_run(client: MlflowClient, experiment: str, filter_string: str = ""):
    """Every run of the experiment named ``experiment`` that matches ``filter_string``, page
    by page (none if there is no such experiment)."""
    found = client.get_experiment_by_name(experiment)
    token = None
    while found is not None:
        page = client.search_runs([found.experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def finished_hashes(uri: str, experiment: str) -> set[str]:
    """The config hashes of every FINISHED run of ``experiment`` (creates no store)."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return set()
    client = RetryingClient(MlflowClient(tracking_uri=uri))
    runs = every_run(client, experiment, "attributes.status = 'FINISHED'")
    return {run.data.tags["config_hash"] for run in runs if "config_hash" in run.data.tags}


def new_sweep_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_run(client: MlflowClient, experiment_id: str, cfg: DictConfig, output_dir: Path) -> str:
    """Create the run of one job and log its params, tags and resolved config."""
    tags = {"mlflow.source.name": "vae_sweeps", "config_hash": config_hash(cfg), "output_dir": str(output_dir),
            "host": socket.gethostname(), "pid": str(os.getpid()), **git_tags(),
            **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in some containers
        pass
    if sweep_id := os.environ.get(SWEEP_ID_ENV):
        tags["sweep_id"] = sweep_id
    run_id = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(cfg).items()])
    client.log_text(run_id, config_yaml(cfg), "config.yaml")
    return run_id


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
