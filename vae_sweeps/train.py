"""One job: check the config, load the data, train, test, and track it all in MLflow."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from vae_sweeps import devices, evaluation, figures, identity, tracking
from vae_sweeps.config import validate
from vae_sweeps.data import ImageDataModule
from vae_sweeps.module import VAEModule

log = logging.getLogger(__name__)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())
# Lightning 2.6 with torch >= 2.10 warns about its own use of a torch API; nothing to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def make_datamodule(cfg: DictConfig) -> ImageDataModule:
    data = cfg.data
    return ImageDataModule(name=data.name, root=str(data.root), download=data.download,
                           batch_size=data.batch_size, val_size=data.val_size, seed=cfg.seed)


def torch_threads(cfg: DictConfig) -> int:
    """``threads`` if set, else this job's share of the usable cores: a SLURM or submitit
    job's cpus_per_task, or the cores divided by joblib's n_jobs (GPUs x ``jobs_per_gpu``
    with ``hydra/launcher=joblib_gpu``)."""
    if cfg.get("threads"):
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    if launcher.get("cpus_per_task"):
        return launcher.cpus_per_task
    jobs = launcher.get("n_jobs") or 1
    jobs = cores + 1 + jobs if jobs < 0 else jobs  # joblib: -1 = every core, -2 = all but one
    return max(1, cores // max(1, jobs))


def make_trainer(cfg: DictConfig, callbacks: list[pl.Callback], output_dir: Path) -> pl.Trainer:
    options = plain(cfg.trainer)
    if options.get("enable_progress_bar") is None:  # a bar in a terminal, none in logs
        options["enable_progress_bar"] = sys.stderr.isatty()
    # on a machine with several GPUs, job n of a sweep trains on GPU n mod GPUs, not all on the first
    options = devices.pin_to_gpu(options, devices.job_number(), devices.gpu_count())
    # EpochEnd is the Checkpoint callback: Lightning adds none of its own
    return pl.Trainer(**options, callbacks=callbacks, logger=False, default_root_dir=output_dir)


class EpochEnd(Checkpoint):
    """The end of each training epoch, in the order that keeps a run resumable: save the
    whole training state (replacing the file atomically, so an interrupt while saving
    leaves the previous epoch's file whole), then log the epoch's ``train/*`` and ``val/*``
    means to MLflow. The logged epochs never run ahead of the checkpoint, so a resumed run
    logs every epoch exactly once.

    A Checkpoint subclass because Lightning calls those after the LightningModule's own
    ``on_train_epoch_end``, where the epoch means are logged.
    """

    def __init__(self, path: Path, client, run_id: str, epochs: int = 0):
        self.path, self.client, self.run_id = path, client, run_id
        self.saved = self.logged = epochs  # completed epochs in the file / in MLflow
        self.validated = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
        self.log_epoch(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        partial = self.path.with_suffix(".partial")
        trainer.save_checkpoint(partial, weights_only=False)
        os.replace(partial, self.path)
        self.saved = trainer.current_epoch + 1

    def log_epoch(self, trainer: pl.Trainer) -> None:
        """Log the saved epoch's means, unless they already are."""
        if self.saved > self.logged:
            stages = ("train/", "val/") if self.validated else ("train/",)
            means = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(stages)}
            tracking.log_metrics(self.client, self.run_id, means, self.saved)
            self.logged, self.validated = self.saved, False


# What ends a run KILLED and resumable rather than FAILED: Ctrl-C, SIGTERM (made a
# KeyboardInterrupt below), sys.exit, and submitit's UncompletedJobError, which its signal
# handler raises in a SLURM job signalled before its time limit once its requeues are used up.
try:
    from submitit.core.utils import UncompletedJobError
    INTERRUPTS = (KeyboardInterrupt, SystemExit, UncompletedJobError)
except ImportError:  # submitit is optional for a single run
    INTERRUPTS = (KeyboardInterrupt, SystemExit)


@contextmanager
def sigterm_as_interrupt():
    """Handle SIGTERM (a scheduler or ``kill`` stopping the job) like Ctrl-C, so that the run
    ends KILLED with its checkpoint saved instead of dying mid-write. Yields ``shield``,
    which ignores SIGTERM from then on, for a clean-up that must finish. Signals belong to
    the main thread: elsewhere both do nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGTERM, previous)


def log_figures(client, run_id: str, module: VAEModule, datamodule: ImageDataModule, text: str) -> None:
    curves = {stage: [(m.step, m.value) for m in client.get_metric_history(run_id, f"{stage}/loss")]
              for stage in ("train", "val")}
    images, labels = datamodule.splits["test"]
    for name, fig in figures.run_figures(module.vae, images, labels, datamodule.classes, curves, text).items():
        client.log_figure(run_id, fig, f"figures/{name}.png")


def resume_or_start(client, experiment_id: str, cfg: DictConfig, key: str, checkpoint: Path
                    ) -> tuple[str, int]:
    """(run id, completed epochs in ``checkpoint``): the newest KILLED run of this
    configuration that saved a checkpoint, reopened with its checkpoint downloaded to
    ``checkpoint``, or else a new run (0 epochs)."""
    killed = None if cfg.force else tracking.latest_run(client, experiment_id, key, "KILLED")
    if killed is None or "resume_from_epoch" not in killed.data.tags:
        return tracking.start_run(client, experiment_id, cfg, checkpoint.parents[1]), 0
    run_id, epochs = killed.info.run_id, int(killed.data.tags["resume_from_epoch"])
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    os.replace(client.download_artifacts(run_id, "checkpoints/last.ckpt", str(checkpoint.parent)), checkpoint)
    client.update_run(run_id, status="RUNNING")
    for key, value in {"resumed_from_epoch": epochs, "output_dir": checkpoint.parents[1], "pid": os.getpid()}.items():
        client.set_tag(run_id, key, str(value))
    for stale in ("resume_from_epoch", "error"):
        client.delete_tag(run_id, stale)
    log.info("Resuming run %s after epoch %d", run_id, epochs)
    return run_id, epochs


def train(cfg: DictConfig) -> dict:
    """Run one job of the study; returns its test metrics and MLflow run id.

    Bad config values and missing or damaged data raise (ConfigError, DataError) before an
    MLflow run exists. A configuration that already has a FINISHED run is skipped (its
    metrics are returned, with ``skipped``), and one whose last run was interrupted resumes
    that run from its last completed epoch, unless ``force``. Once the run exists, it ends
    FINISHED, FAILED with the reason in its ``error`` tag, or KILLED on Ctrl-C or SIGTERM,
    with the checkpoint of its last completed epoch saved for resuming.
    """
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    client, experiment_id = tracking.open_store(tracking.resolve_uri(cfg.tracking.uri), cfg.tracking.experiment)
    key = identity.run_key(cfg)
    finished = None if cfg.force else tracking.latest_run(client, experiment_id, key, "FINISHED")
    if finished is not None:
        log.info("Skipped %s: run %s already FINISHED (force=true trains it again)",
                 identity.run_name(cfg), finished.info.run_id)
        test = {k: v for k, v in finished.data.metrics.items() if k.startswith("test/")}
        return {"run_id": finished.info.run_id, "skipped": True, **test}

    datamodule = make_datamodule(cfg)
    datamodule.load()
    torch.set_num_threads(torch_threads(cfg))
    tracking.close_dead_runs(client, experiment_id, key)
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    run_id, done = resume_or_start(client, experiment_id, cfg, key, checkpoint)
    tracking.describe_run(client, run_id, datamodule, identity.caption(cfg, run_id))
    client.set_tag(run_id, "torch_threads", str(torch.get_num_threads()))
    log.info("MLflow run %s (%s)", run_id, identity.run_name(cfg))
    epoch_end = EpochEnd(checkpoint, client, run_id, epochs=done)
    trainer = None
    with sigterm_as_interrupt() as shield:
        try:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            module = VAEModule(model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim),
                               prior=plain(cfg.prior))
            trainer = make_trainer(cfg, [epoch_end], output_dir)
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint if done else None, weights_only=True)
            test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
            test.update(evaluation.evaluate(module.vae, datamodule.splits, cfg.eval.iw_samples, cfg.eval.knn_k))
            tracking.log_metrics(client, run_id, test, epoch_end.saved)
            client.log_artifact(run_id, str(checkpoint), "checkpoints")
            log_figures(client, run_id, module, datamodule, identity.caption(cfg, run_id))
        except BaseException as err:
            shield()  # let the clean-up finish
            interrupted = isinstance(err, INTERRUPTS)
            if interrupted and epoch_end.saved:
                if trainer is not None:
                    epoch_end.log_epoch(trainer)  # if stopped between the checkpoint and its metrics
                client.log_artifact(run_id, str(checkpoint), "checkpoints")
                client.set_tag(run_id, "resume_from_epoch", str(epoch_end.saved))
            client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
            raise
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, **{k: float(v) for k, v in test.items()}}
