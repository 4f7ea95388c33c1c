"""What a run records in MLflow: its params, tags and resolved config when it starts, its dataset
and caption, its per-epoch and end-of-run metrics; and finding a configuration's runs by their
identity. Runs are written through an explicit ``MlflowClient`` and run id: no global "active
run", so nothing opens a second run by accident. The store itself is store.py's; a run's life
(skip, resume, checkpoint, the end), runs.py's.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from vae_sweeps.errors import redact

# Set by the sweep's Hydra callback (hydra_plugins/vae_sweeps_sweeper/prepare_tracking.py) for
# its jobs: the ``sweep_id`` tag of their runs.
SWEEP_ID_ENV = "VAE_SWEEPS_SWEEP_ID"


def config_yaml(cfg: DictConfig) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if "tracking" in resolved:
        resolved["tracking"]["uri"] = redact(str(resolved["tracking"]["uri"]))
    return OmegaConf.to_yaml(resolved)


def git_tags(here: Path = Path(__file__).resolve().parent) -> dict[str, str]:
    """The commit of the code that runs (the git work tree of ``here``), and whether it has
    uncommitted changes: a changed or untracked file that .gitignore does not ignore."""

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


def process_tags(longest_epoch_s: float = 0.0) -> dict[str, str]:
    """The tags that say which process trains a run, and that it is alive: its host and pid,
    its heartbeat (the time now) and its longest epoch so far (see ``alive``)."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": f"{time.time():.0f}",
            "longest_epoch_s": f"{longest_epoch_s:.0f}"}


def start_run(client: MlflowClient, experiment_id: str, output_dir: Path, name: str, params: dict[str, str],
              config: str, user_tags: Mapping | None = None) -> str:
    """Create the run of one job, named ``name``, and log its ``params`` (identity.params), its
    tags (``user_tags``: the config's ``tags``) and its resolved ``config`` (config_yaml)."""
    tags = {"mlflow.source.name": "vae_sweeps", "output_dir": str(output_dir),
            **process_tags(), **git_tags(), **{str(k): str(v) for k, v in (user_tags or {}).items()}}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in some containers
        pass
    if sweep_id := os.environ.get(SWEEP_ID_ENV):
        tags["sweep_id"] = sweep_id
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_text(run_id, config, "config.yaml")
    return run_id


def describe_run(client: MlflowClient, run_id: str, datamodule, caption: str) -> None:
    """What the MLflow UI shows of a run besides its params: its dataset as a dataset input
    (the runs table's Dataset column: name, split sizes, digest; ImageData.describe) and
    ``caption`` as its description. The digest hashes the dataset's name, split sizes and file
    checksums: cheap, and it changes with the validation split."""
    described = datamodule.describe()
    sizes = {split: len(labels) for split, (_, labels) in datamodule.splits.items()}
    digest = hashlib.sha256(json.dumps([described["name"], sizes, described["checksums"]]).encode()).hexdigest()[:8]
    source = {"url": described["url"]} if described.get("url") else {}
    dataset = Dataset(name=described["name"], digest=digest, source_type="http" if source else "local",
                      source=json.dumps(source), profile=json.dumps(sizes))
    client.log_inputs(run_id, [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
    client.set_tag(run_id, MLFLOW_RUN_NOTE, caption)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int,
                tags: dict[str, str] | None = None) -> None:
    """Log ``metrics`` in one batch, at ``step`` (the number of completed epochs), with ``tags``."""
    now = int(time.time() * 1000)
    if metrics or tags:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in (tags or {}).items()])


def log_evaluation(client: MlflowClient, run_id: str, metrics: dict[str, float], tags: dict[str, str],
                   step: int) -> None:
    """Log a trained run's end-of-run ``metrics`` (those that are not NaN) at ``step``, its last
    epoch, and set its ``tags``: at the end of training, and by a back-fill."""
    log_metrics(client, run_id, {k: v for k, v in metrics.items() if not math.isnan(v)}, step)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
