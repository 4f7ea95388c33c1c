"""One job: check the config, load the data, train, test, and track it all in MLflow."""

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
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Checkpoint

from vae_sweeps import backfill, devices, figures, identity, options, tracking
from vae_sweeps.config import validate
from vae_sweeps.data import ImageData
from vae_sweeps.faults import INTERRUPTS, Interrupted, attempt, signals_as_interrupt
from vae_sweeps.module import VAEModule

log = logging.getLogger(__name__)

RECORD = "vae_sweeps"  # the key of EpochEnd's record in a checkpoint


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())
# Lightning 2.6 with torch >= 2.10 warns about its own use of a torch API; nothing to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def make_datamodule(cfg: DictConfig) -> ImageData:
    """The data option's DataModule (conf/data/), its batches drawn in an order set by the seed."""
    return options.build("data", cfg.data, seed=cfg.seed)


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


def progress_bar(cfg: DictConfig) -> bool:
    """``trainer.enable_progress_bar``, where null means: in a terminal, not in a log."""
    shown = cfg.trainer.get("enable_progress_bar")
    return sys.stderr.isatty() if shown is None else bool(shown)


def make_trainer(cfg: DictConfig, callbacks: list[pl.Callback], output_dir: Path) -> pl.Trainer:
    options = plain(cfg.trainer)
    options["enable_progress_bar"] = progress_bar(cfg)
    if not os.environ.get("SLURM_JOB_ID"):
        # Lightning's hint to run under srun, given wherever SLURM is installed, is for jobs of a
        # SLURM allocation; not for one started on this machine (hydra/launcher=slurm runs its
        # jobs in allocations, which set SLURM_JOB_ID)
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    # on a machine with several GPUs, job n of a sweep trains on GPU n mod GPUs, not all on the first
    options = devices.pin_to_gpu(options, devices.job_number(), devices.gpu_count())
    # EpochEnd is the Checkpoint callback: Lightning adds none of its own
    return pl.Trainer(**options, callbacks=callbacks, logger=False, default_root_dir=output_dir)


class EpochLines(Checkpoint):
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


class EpochEnd(Checkpoint):
    """The end of each training epoch, in the order that keeps a run resumable: save the
    whole training state (replacing the file atomically, so an interrupt while saving
    leaves the previous epoch's file whole), then log the epoch's ``train/*`` and ``val/*``
    means to MLflow. The logged epochs never run ahead of the checkpoint, so a resumed run
    logs every epoch exactly once.

    A Checkpoint subclass because Lightning calls those after the LightningModule's own
    ``on_train_epoch_end``, where the epoch means are logged.

    The checkpoint also holds its RECORD: the run's identity ``key`` (a resumed run refuses a
    checkpoint of another configuration), its completed epochs and the last one's means. That
    file is the truth of what a stopped run completed: the clean-up after an interrupt, the next
    launch after a kill, and a resume log the means if the store lacks them (``keep_checkpoint``,
    ``log_saved_epoch``), for a signal may come between any two of these steps. Each epoch's
    metrics come with the run's heartbeat (tracking.alive).
    """

    def __init__(self, path: Path, client, run_id: str, epochs: int = 0, key: str | None = None):
        self.path, self.client, self.run_id, self.key = path, client, run_id, key
        self.saved = self.logged = epochs  # completed epochs in the file / in MLflow
        self.validated = False
        self.means: dict[str, float] = {}  # of the last saved epoch
        self.epoch_began, self.longest = time.monotonic(), 0.0  # for the heartbeat

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)
        self.log_epoch()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[RECORD] = {"run_key": self.key, "epochs": trainer.current_epoch + 1, "means": self.means}

    def save(self, trainer: pl.Trainer) -> None:
        """Save the epoch's checkpoint; if that fails (a full disk), leave no partial file."""
        stages = ("train/", "val/") if self.validated else ("train/",)
        self.means = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(stages)}
        self.validated = False
        partial = self.path.with_suffix(".partial")
        try:
            trainer.save_checkpoint(partial, weights_only=False)
            os.replace(partial, self.path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.saved = trainer.current_epoch + 1
        now = time.monotonic()
        self.longest, self.epoch_began = max(self.longest, now - self.epoch_began), now

    def log_epoch(self) -> None:
        """Log the saved epoch's means, unless they already are."""
        if self.saved > self.logged:
            tracking.log_metrics(self.client, self.run_id, self.means, self.saved, tracking.process_tags(self.longest))
            self.logged = self.saved


def log_figures(client, run_id: str, module: VAEModule, datamodule: ImageData, text: str) -> None:
    curves = {stage: [(m.step, m.value) for m in client.get_metric_history(run_id, f"{stage}/loss")]
              for stage in ("train", "val")}
    images, labels = datamodule.splits["test"]
    for name, fig in figures.run_figures(module.vae, images, labels, datamodule.classes, curves, text).items():
        client.log_figure(run_id, fig, f"figures/{name}.png")


def saved_record(checkpoint: Path) -> dict:
    """The RECORD that EpochEnd saved in ``checkpoint`` ({} if it has none)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True).get(RECORD) or {}


def log_saved_epoch(client, run_id: str, record: dict) -> None:
    """Log the means of the last epoch in a checkpoint's ``record`` unless the store has that
    epoch: a process stopped between saving an epoch and logging it, or between saving it and
    noting that it had (EpochEnd.saved), left the file one epoch ahead of the store."""
    epochs = record["epochs"]
    if epochs not in [m.step for m in client.get_metric_history(run_id, "train/loss")]:
        tracking.log_metrics(client, run_id, record["means"], epochs)


def keep_checkpoint(client, run_id: str, checkpoint: Path, key: str) -> int:
    """Make a stopped run resumable from ``checkpoint``, the one truth of the epochs it completed:
    its last epoch logged (``log_saved_epoch``), the file uploaded and ``resume_from_epoch`` set.
    Returns those epochs; 0, doing nothing, for a missing or unreadable file or one saved by
    another configuration than ``key``. After an interrupt, and for tracking.close_dead_runs."""
    if not checkpoint.is_file():
        return 0
    try:
        record = saved_record(checkpoint)
    except Exception as err:  # cut short by a crash
        log.warning("The checkpoint %s of run %s cannot be read (%s); not resumed", checkpoint, run_id, err)
        return 0
    if record.get("run_key") != key:
        log.warning("The checkpoint %s is not of run %s's configuration; not resumed", checkpoint, run_id)
        return 0
    log_saved_epoch(client, run_id, record)
    client.log_artifact(run_id, str(checkpoint), "checkpoints")
    client.set_tag(run_id, "resume_from_epoch", str(record["epochs"]))
    return record["epochs"]


def salvage(client, key: str, run) -> int:
    """For tracking.close_dead_runs: ``keep_checkpoint`` of the checkpoint that the dead ``run``
    left in its output folder."""
    output_dir = run.data.tags.get("output_dir")
    return keep_checkpoint(client, run.info.run_id, Path(output_dir) / "checkpoints" / "last.ckpt", key
                           ) if output_dir else 0


def resume_or_start(client, experiment_id: str, cfg: DictConfig, key: str, checkpoint: Path
                    ) -> tuple[str, int]:
    """(run id, completed epochs in ``checkpoint``): the newest KILLED run of this
    configuration that saved a checkpoint, reopened with its checkpoint downloaded to
    ``checkpoint``, or else a new run (0 epochs).

    A checkpoint that is not of this configuration (its RECORD holds another identity, or none)
    is refused: its run loses ``resume_from_epoch``, says why in its ``error`` tag, and a new run
    starts from epoch 0. Failing instead would stop every later launch of this configuration at
    the same checkpoint, and the foreign weights are of no use to it."""
    killed = None if cfg.force else tracking.latest_run(client, experiment_id, key, "KILLED")
    if killed is None:
        return tracking.start_run(client, experiment_id, cfg, checkpoint.parents[1]), 0
    if "resume_from_epoch" not in killed.data.tags:
        why = killed.data.tags.get("error", "")
        if not why.startswith("its checkpoint"):  # not refused by an earlier launch (below): stopped too soon
            why = "no checkpoint was saved before the stop"
        log.warning("%s%s: training anew; the KILLED run %s stays", why[0].upper(), why[1:], killed.info.run_id)
        return tracking.start_run(client, experiment_id, cfg, checkpoint.parents[1]), 0
    run_id = killed.info.run_id
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(client.download_artifacts(run_id, "checkpoints/last.ckpt", str(checkpoint.parent)), checkpoint)
    except Exception as err:  # a store restored from its published records (study_store) has no artifacts
        log.warning("Run %s stopped after epoch %s, but its checkpoint is gone (%s): training anew; the KILLED "
                    "run stays", run_id, killed.data.tags["resume_from_epoch"], err)
        client.delete_tag(run_id, "resume_from_epoch")
        client.set_tag(run_id, "error", f"its checkpoint was gone when the next launch came: {err}"[:5000])
        return tracking.start_run(client, experiment_id, cfg, checkpoint.parents[1]), 0
    record = saved_record(checkpoint)
    saved_key = record.get("run_key")
    if saved_key != key:
        reason = f"its checkpoint is of another configuration ({saved_key}, not {key}), so it was not resumed"
        log.warning("Run %s: %s; starting a new run", run_id, reason)
        client.delete_tag(run_id, "resume_from_epoch")
        client.set_tag(run_id, "error", reason)
        checkpoint.unlink()
        return tracking.start_run(client, experiment_id, cfg, checkpoint.parents[1]), 0
    epochs = record["epochs"]  # the file's, which a run stopped by an older version may have tagged one short
    log_saved_epoch(client, run_id, record)
    client.update_run(run_id, status="RUNNING")
    tags = {"resumed_from_epoch": epochs, "output_dir": checkpoint.parents[1], **tracking.process_tags()}
    for name, value in tags.items():
        client.set_tag(run_id, name, str(value))
    for stale in ("resume_from_epoch", "error"):
        client.delete_tag(run_id, stale)
    log.info("Resuming run %s after epoch %d", run_id, epochs)
    return run_id, epochs


def already_taken(client, experiment_id: str, key: str) -> dict | None:
    """The result of a job whose configuration must not train now, with ``skipped`` saying why:
    it has a FINISHED run (whose test metrics are returned), or a RUNNING run that is alive
    (tracking.alive: its process on this host, or a recent heartbeat from another host)."""
    finished = tracking.latest_run(client, experiment_id, key, "FINISHED")
    if finished is not None:
        test = {k: v for k, v in finished.data.metrics.items() if k.startswith("test/")}
        return {"run_id": finished.info.run_id, **test, "skipped": "this configuration already has a FINISHED run "
                f"({finished.info.run_id}; force=true trains it again)"}
    running = tracking.live_run(client, experiment_id, key)
    if running is not None:
        tags = running.data.tags
        return {"run_id": running.info.run_id, "skipped": f"this configuration has a RUNNING run ({running.info.run_id}, "
                f"process {tags.get('pid')} on {tags.get('host')}; force=true starts another)"}
    return None


def train(cfg: DictConfig) -> dict:
    """Run one job of the study; returns its test metrics and MLflow run id.

    Bad config values and missing or damaged data raise (ConfigError, DataError) before an
    MLflow run exists. A configuration that already has a FINISHED run is skipped (its
    metrics are returned, with ``skipped``), and one whose last run was interrupted resumes
    that run from its last completed epoch, unless ``force``. Once the run exists, it ends
    FINISHED, FAILED with the reason in its ``error`` tag, or KILLED on Ctrl-C or SIGTERM,
    with the checkpoint of its last completed epoch saved for resuming. A configuration with a
    live RUNNING run is skipped too (``already_taken``), and a run left RUNNING by a process that
    is gone is closed first (tracking.close_dead_runs), resumable if its checkpoint is on disk.
    If the store cannot be written when the run stops, the reason is left in the output folder
    for the next launch to close the run with.
    """
    validate(cfg)
    tracking.quiet_downloads()
    output_dir = Path(cfg.paths.output_dir)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    client, experiment_id = tracking.open_store(uri, cfg.tracking.experiment)
    key = identity.run_key(cfg)
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    with tracking.claim(uri, key):  # of two launches of this configuration at once, the second sees the first's run
        skipped = None if cfg.force else already_taken(client, experiment_id, key)
        if skipped is not None:
            log.info("Skipped %s: %s", identity.run_name(cfg), skipped["skipped"])
            return skipped
        datamodule = make_datamodule(cfg)
        datamodule.load()
        tracking.close_dead_runs(client, experiment_id, key, lambda run: salvage(client, key, run))
        run_id, done = resume_or_start(client, experiment_id, cfg, key, checkpoint)
    tracking.record_reason(output_dir, None)  # an earlier attempt's, where a folder is used again
    torch.set_num_threads(torch_threads(cfg))
    tracking.describe_run(client, run_id, datamodule, identity.caption(cfg, run_id))
    provenance = {"torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                  "cpu_count": os.cpu_count(),  # the machine behind the numbers
                  "command": os.environ.get("VAE_SWEEPS_COMMAND")}  # and the launch (__main__.py), if any
    for name, value in provenance.items():
        if value is not None:
            client.set_tag(run_id, name, str(value))
    log.info("MLflow run %s (%s)", run_id, identity.run_name(cfg))
    epoch_end = EpochEnd(checkpoint, client, run_id, epochs=done, key=key)
    trainer = None
    with signals_as_interrupt() as signals:
        try:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
            module = VAEModule(model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim),
                               prior=plain(cfg.prior), image_shape=tuple(datamodule.image_shape))
            lines = [] if progress_bar(cfg) else [EpochLines()]  # without a bar, a log line per epoch
            trainer = make_trainer(cfg, [epoch_end, *lines], output_dir)
            trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint if done else None, weights_only=True)
            test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
            metrics, tags = backfill.compute(list(backfill.PARTS), module.vae, datamodule, identity.params(cfg),
                                             uri, cfg.tracking.experiment)
            test.update(metrics)
            backfill.log_evaluation(client, run_id, test, tags, epoch_end.saved)
            client.log_artifact(run_id, str(checkpoint), "checkpoints")
            log_figures(client, run_id, module, datamodule, identity.caption(cfg, run_id))
        except BaseException as err:
            signals.shield()  # let the clean-up finish
            stop = Interrupted(signals.received) if signals.received else None
            interrupted = stop is not None or isinstance(err, INTERRUPTS)
            reason = str(stop or f"{type(err).__name__}: {err}")
            tracking.record_reason(output_dir, reason)  # for the next launch, should the store fail below
            if interrupted and epoch_end.saved:  # the checkpoint file is this run's
                attempt(keep_checkpoint, client, run_id, checkpoint, key)
            attempt(client.set_tag, run_id, "error", reason[:5000])
            attempt(client.set_terminated, run_id, "KILLED" if interrupted else "FAILED", tries=3)
            if stop is not None and not isinstance(err, Interrupted):
                raise stop from err  # not Lightning's SystemExit(1): the CLI exits with 128 + the signal
            raise
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, **{k: float(v) for k, v in test.items()}}
