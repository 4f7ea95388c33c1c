"""MLflow tracking: the store, one run per job, its params, per-epoch metrics and artifacts.

The default store is a SQLite database under ``mlruns/`` with artifacts beside it in
``mlruns/artifacts``; ``MLFLOW_TRACKING_URI`` wins over ``tracking.uri`` so a team can
point every job at a server. Runs are written through an explicit ``MlflowClient`` and run
id: no global "active run", so nothing opens a second run by accident.
"""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytorch_lightning as pl
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from omegaconf import DictConfig, OmegaConf

from vae_sweeps.config import flatten

log = logging.getLogger(__name__)

SWEEP_ID_ENV = "VAE_SWEEPS_SWEEP_ID"
# Not params: machine-specific paths, and the tracking URI (it may hold credentials).
NOT_PARAMS = ("hydra", "paths", "tracking", "tags", "data.root")


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
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
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
    return (f"{cfg.model.name}-{cfg.loss.name}-z{cfg.model.latent_dim}-c{cfg.loss.c:g}"
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


def new_sweep_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_run(client: MlflowClient, experiment_id: str, cfg: DictConfig, output_dir: Path) -> str:
    """Create the run of one job and log its params, tags and resolved config."""
    tags = {"mlflow.source.name": "vae_sweeps", "output_dir": str(output_dir), **git_tags(),
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


class MLflowMetrics(pl.Callback):
    """Logs the epoch means of ``train/*``, ``val/*`` and ``test/*`` in one batch each, at
    step = number of completed epochs (so test metrics sit at the last training step)."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def _log(self, trainer: pl.Trainer, prefix: str, step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in trainer.callback_metrics.items()
                   if k.startswith(prefix)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, "train/", trainer.current_epoch + 1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, "val/", trainer.current_epoch + 1)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log(trainer, "test/", trainer.current_epoch)


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
