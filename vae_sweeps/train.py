"""One job: instantiate the data and the model, fit, test and evaluate, tracked in MLflow
(``train``); its run's life, from skip or resume to the end, is runs.py's."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vae_sweeps import devices, evaluation, options, runs
from vae_sweeps.module import VAEModule
from vae_sweeps.options import plain

log = logging.getLogger(__name__)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def quiet_lightning() -> None:
    """Lightning's messages that a job has nothing to act on, left out of its log: its tips, its
    warning about its own use of a torch API (Lightning 2.6 with torch >= 2.10), and its hint to
    run under srun, given wherever SLURM is installed, but meant for jobs of a SLURM allocation,
    not for one started on this machine (hydra/launcher=slurm runs its jobs in allocations, which
    set SLURM_JOB_ID). Called for each trainer; adding a filter twice keeps one."""
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in lightning_log.filters):
        lightning_log.addFilter(_NoAdverts())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    if not os.environ.get("SLURM_JOB_ID"):
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


def torch_threads(cfg: DictConfig) -> int:
    """``threads`` if set, else this job's share of the usable cores: a SLURM or submitit
    job's cpus_per_task, or the cores divided by joblib's n_jobs (GPUs x ``jobs_per_gpu``
    with ``hydra/launcher=joblib_gpu``)."""
    if cfg.get("threads"):
        return cfg.threads
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    if launcher.get("cpus_per_task"):
        return launcher.cpus_per_task
    return max(1, devices.usable_cores() // max(1, devices.joblib_jobs(launcher.get("n_jobs") or 1)))


def progress_bar(cfg: DictConfig) -> bool:
    """``trainer.enable_progress_bar``, where null means: in a terminal, not in a log."""
    shown = cfg.trainer.get("enable_progress_bar")
    return sys.stderr.isatty() if shown is None else bool(shown)


def make_trainer(cfg: DictConfig, callbacks: list[pl.Callback], output_dir: Path) -> pl.Trainer:
    """The ``trainer`` settings' Lightning Trainer with ``callbacks`` (runs.EpochEnd is the
    Checkpoint callback: Lightning adds none of its own)."""
    quiet_lightning()
    settings = plain(cfg.trainer)
    settings["enable_progress_bar"] = progress_bar(cfg)
    # on a machine with several GPUs, job n of a sweep trains on GPU n mod GPUs, not all on the first
    settings = devices.pin_to_gpu(settings, devices.job_number(), devices.gpu_count())
    return pl.Trainer(**settings, callbacks=callbacks, logger=False, default_root_dir=output_dir)


class EpochLines(pl.callbacks.Checkpoint):
    """Where there is no progress bar (a log file, CI, nohup, a SLURM log): one log line at the
    end of each training epoch, with its train and validation loss and its time. It saves
    nothing: a Checkpoint subclass, as EpochEnd is, because Lightning calls those after the
    LightningModule's own ``on_train_epoch_end``, where the epoch's train means are logged."""

    def __init__(self):
        self.began = time.monotonic()
        self.validated = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.began, self.validated = time.monotonic(), False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validated = self.validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        shown = ("train/loss", "val/loss") if self.validated else ("train/loss",)
        losses = "".join(f", {key} {float(metrics[key]):.2f}" for key in shown if key in metrics)
        log.info("epoch %d of %d%s (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs, losses,
                 time.monotonic() - self.began)


def build_module(cfg: DictConfig, datamodule) -> VAEModule:
    """The LightningModule of ``cfg``'s model, loss, optimiser and prior, for the data's images."""
    return VAEModule(model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim),
                     prior=plain(cfg.prior), image_shape=tuple(datamodule.image_shape))


def train(cfg: DictConfig) -> dict:
    """Train, test and evaluate one job of the study, tracked in MLflow; returns its test metrics
    and run id. ``cfg`` has been checked (config.validate, where the job entered: __main__.py).

    The run's life is runs.tracked_run's: a configuration with a FINISHED or a live run is skipped
    (its result says why), an interrupted one resumes after its last completed epoch, and the run
    ends FINISHED, FAILED with the reason in its ``error`` tag, or KILLED and resumable.
    """
    torch.set_num_threads(torch_threads(cfg))
    datamodule = options.build("data", cfg.data, seed=cfg.seed)  # batches drawn in an order set by the seed
    with runs.tracked_run(cfg, datamodule) as run:
        if run.skipped:
            return run.result
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = build_module(cfg, datamodule)
        lines = [] if progress_bar(cfg) else [EpochLines()]  # without a bar, a log line per epoch
        trainer = make_trainer(cfg, [run.epoch_end, *lines], Path(cfg.paths.output_dir))
        lightning_data = datamodule.lightning()
        trainer.fit(module, datamodule=lightning_data, ckpt_path=run.resume_from, weights_only=True)
        test = trainer.test(module, datamodule=lightning_data, verbose=False)[0]
        metrics, tags = evaluation.compute(list(evaluation.PARTS), module.vae, datamodule, run.params, run.uri,
                                           run.experiment)
        run.finish({**test, **metrics}, tags, module.vae, datamodule)
    return run.result
