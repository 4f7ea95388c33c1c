"""The life of one job's MLflow run, in one place: ``with tracked_run(cfg, datamodule) as run:``.

The rules, in the order a launch meets them:

1. Under the configuration's lock (``store.lock``), so that of two launches of one configuration
   at once the second sees the first one's run (on a server or a database store, where that lock
   is this host's only, the store settles it: ``claimed``):
   - a configuration with a FINISHED run is skipped, and one with a live RUNNING run too
     (``already_taken``; ``force=true`` trains it again);
   - the data is loaded (missing or damaged files raise before a run exists);
   - RUNNING runs whose process on this host is gone are closed (``close_dead_runs``): KILLED and
     resumable if their checkpoint is on disk (``keep_checkpoint``), FAILED otherwise;
   - the newest KILLED run that saved a checkpoint is reopened and resumes after its last
     completed epoch (``resume``), or else a new run starts.
2. Each training epoch ends by saving the whole training state, then logging the epoch's means
   (``EpochEnd``): the store never runs ahead of the checkpoint.
3. The run ends FINISHED; or, on Ctrl-C, SIGTERM or a scheduler's stop, KILLED with its last
   completed epoch uploaded for resuming; or FAILED, with the reason in its ``error`` tag. The
   reason is first written into the output folder (``record_reason``), so that if the store
   cannot be written then, the next launch closes the run with it.

A checkpoint belongs to its run: it lives at ``<output folder>/checkpoints/<run id>/last.ckpt``
(``checkpoint_path``), where no other run writes, whatever output folder the user gives.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from vae_sweeps import figures, identity, store, tracking
from vae_sweeps.faults import INTERRUPTS, Interrupted, attempt, signals_as_interrupt

log = logging.getLogger(__name__)

# The key under which EpochEnd saves its record (identity, epochs, means) in a checkpoint.
CHECKPOINT_RECORD = "vae_sweeps"
# A RUNNING run of another host counts as alive while its heartbeat (start, then each epoch's
# end) is younger than this, or than twice its longest epoch if that is longer (``alive``).
LIVE_FOR_S = 30 * 60
# On a server or a database store, how long a launch waits after starting or reopening its run
# before it looks whether a launch on another host did the same (``claimed``).
CLAIM_SETTLE_S = 2.0
# In a job's output folder: why its run ended, written before the run is closed in the store, so
# that the next launch can close the run with it if the store could not be written (``close_dead_runs``).
REASON_FILE = "error.txt"


def checkpoint_path(output_dir: str | Path, run_id: str) -> Path:
    """Where run ``run_id`` keeps its checkpoint in ``output_dir``: under its own id, so that two
    runs given one output folder never write each other's weights."""
    return Path(output_dir) / "checkpoints" / run_id / "last.ckpt"


# ---------------------------------------------------------------------------- is a run alive?


def process_alive(host: str | None, pid: str, heartbeat: float, longest_epoch_s: float = 0.0) -> bool:
    """Whether process ``pid`` of ``host`` may still be at work. On this host: the process exists.
    On another host, where its process cannot be seen: its ``heartbeat`` (a time in seconds) is
    younger than LIVE_FOR_S, or than twice its longest epoch if that is longer."""
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            pass
        return True
    return time.time() - float(heartbeat) < max(LIVE_FOR_S, 2 * float(longest_epoch_s or 0))


def alive(run) -> bool:
    """Whether a process may still be training the RUNNING ``run`` (``process_alive``; its
    heartbeat is set when it starts and after each epoch, else its start time counts)."""
    tags = run.data.tags
    return process_alive(tags.get("host"), tags.get("pid", ""), float(tags.get("heartbeat") or run.info.start_time / 1000),
                         float(tags.get("longest_epoch_s") or 0))


def live_run(client, experiment_id: str, key: str):
    """The newest RUNNING run with identity ``key`` that is ``alive``, or None."""
    return next((run for run in store.runs_of(client, experiment_id, key, "RUNNING") if alive(run)), None)


def record_reason(output_dir: str | Path, reason: str | None) -> None:
    """Write why a job's run ended into its output folder (REASON_FILE), or remove the reason of
    an earlier attempt (None); a full disk may prevent it, which is only logged."""
    path = Path(output_dir) / REASON_FILE
    try:
        if reason is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(reason)
    except OSError as err:
        log.warning("Could not write %s: %s", path, err)


def recorded_reason(output_dir: str | None) -> str | None:
    """The reason recorded in ``output_dir`` by ``record_reason``, if any."""
    try:
        return (Path(output_dir) / REASON_FILE).read_text() if output_dir else None
    except OSError:
        return None


def close_dead_runs(client, experiment_id: str, key: str) -> None:
    """Close the RUNNING runs of this configuration whose process, on this host, is gone: killed
    with SIGKILL, on a machine that crashed, or unable to write to the store when it ended. The
    reason is the one the process recorded in its output folder (``record_reason``), if it got
    that far. A run whose checkpoint is still in that folder ends KILLED and resumable
    (``keep_checkpoint``), as after Ctrl-C; otherwise FAILED. Other hosts' runs are left alone:
    their processes and folders are not here."""
    for run in store.runs_of(client, experiment_id, key, "RUNNING"):
        tags, run_id = run.data.tags, run.info.run_id
        if tags.get("host") != socket.gethostname() or alive(run):
            continue
        output_dir = tags.get("output_dir")
        reason = recorded_reason(output_dir) or f"its process {tags.get('pid')} ended without closing the run"
        epochs = keep_checkpoint(client, run_id, checkpoint_path(output_dir, run_id), key) if output_dir else 0
        client.set_tag(run_id, "error", reason[:5000])
        client.set_terminated(run_id, "KILLED" if epochs else "FAILED")
        log.warning("Run %s was left RUNNING by a process that is gone (%s); %s", run_id, reason,
                    f"KILLED, resumable from epoch {epochs}" if epochs else "marked FAILED")


# ---------------------------------------------------------------------------- the checkpoint


class EpochEnd(pl.callbacks.Checkpoint):
    """The end of each training epoch, in the order that keeps a run resumable: save the
    whole training state (replacing the file atomically, so an interrupt while saving
    leaves the previous epoch's file whole), then log the epoch's ``train/*`` and ``val/*``
    means to MLflow. The logged epochs never run ahead of the checkpoint, so a resumed run
    logs every epoch exactly once.

    A Checkpoint subclass because Lightning calls those after the LightningModule's own
    ``on_train_epoch_end``, where the epoch means are logged.

    The checkpoint also holds its CHECKPOINT_RECORD: the run's identity ``key`` (a resumed run
    refuses a checkpoint of another configuration), its completed epochs and the last one's
    means. That file is the truth of what a stopped run completed: the clean-up after an
    interrupt, the next launch after a kill, and a resume log the means if the store lacks them
    (``keep_checkpoint``, ``log_saved_epoch``), for a signal may come between any two of these
    steps. Each epoch's metrics come with the run's heartbeat (``alive``).
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
        checkpoint[CHECKPOINT_RECORD] = {"run_key": self.key, "epochs": trainer.current_epoch + 1, "means": self.means}

    def save(self, trainer: pl.Trainer) -> None:
        """Save the epoch's checkpoint; if that fails (a full disk), leave no partial file."""
        stages = ("train/", "val/") if self.validated else ("train/",)
        self.means = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(stages)}
        self.validated = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
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


def saved_record(checkpoint: Path) -> dict:
    """The CHECKPOINT_RECORD that EpochEnd saved in ``checkpoint`` ({} if it has none)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True).get(CHECKPOINT_RECORD) or {}


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
    another configuration than ``key``. After an interrupt, and for ``close_dead_runs``."""
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


# ---------------------------------------------------------------------------- skip, resume or start


def already_taken(client, experiment_id: str, key: str) -> dict | None:
    """The result of a job whose configuration must not train now, with ``skipped`` saying why:
    it has a FINISHED run (whose test metrics are returned), or a RUNNING run that is alive
    (``alive``: its process on this host, or a recent heartbeat from another host)."""
    finished = store.latest_run(client, experiment_id, key, "FINISHED")
    if finished is not None:
        test = {k: v for k, v in finished.data.metrics.items() if k.startswith("test/")}
        return {"run_id": finished.info.run_id, **test, "skipped": "this configuration already has a FINISHED run "
                f"({finished.info.run_id}; force=true trains it again)"}
    running = live_run(client, experiment_id, key)
    if running is not None:
        tags = running.data.tags
        return {"run_id": running.info.run_id, "skipped": f"this configuration has a RUNNING run ({running.info.run_id}, "
                f"process {tags.get('pid')} on {tags.get('host')}; force=true starts another)"}
    return None


def _refuse_resume(client, run_id: str, reason: str) -> None:
    """Leave the KILLED run ``run_id`` as it is, no longer resumable, with ``reason`` in its ``error``
    tag: failing instead would stop every later launch of its configuration at the same place."""
    client.delete_tag(run_id, "resume_from_epoch")
    client.set_tag(run_id, "error", reason[:5000])


def resume(client, experiment_id: str, key: str, output_dir: Path) -> tuple[str | None, int]:
    """(run id, completed epochs in its checkpoint) of the newest KILLED run of this configuration
    that saved a checkpoint, reopened with its checkpoint downloaded to ``checkpoint_path``;
    (None, 0) where there is none: a new run starts.

    A checkpoint that is gone (a store restored from its published records has no artifacts), or
    that is not of this configuration (its record holds another identity, or none), is refused:
    its run loses ``resume_from_epoch``, says why in its ``error`` tag, and a new run starts from
    epoch 0, as the foreign weights are of no use to it."""
    killed = store.latest_run(client, experiment_id, key, "KILLED")
    if killed is None:
        return None, 0
    run_id = killed.info.run_id
    if "resume_from_epoch" not in killed.data.tags:
        why = killed.data.tags.get("error", "")
        if not why.startswith("its checkpoint"):  # not refused by an earlier launch (below): stopped too soon
            why = "no checkpoint was saved before the stop"
        log.warning("%s%s: training anew; the KILLED run %s stays", why[0].upper(), why[1:], run_id)
        return None, 0
    checkpoint = checkpoint_path(output_dir, run_id)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(client.download_artifacts(run_id, "checkpoints/last.ckpt", str(checkpoint.parent)), checkpoint)
    except Exception as err:
        log.warning("Run %s stopped after epoch %s, but its checkpoint is gone (%s): training anew; the KILLED "
                    "run stays", run_id, killed.data.tags["resume_from_epoch"], err)
        _refuse_resume(client, run_id, f"its checkpoint was gone when the next launch came: {err}")
        return None, 0
    record = saved_record(checkpoint)
    if record.get("run_key") != key:
        reason = f"its checkpoint is of another configuration ({record.get('run_key')}, not {key}), so it was not resumed"
        log.warning("Run %s: %s; starting a new run", run_id, reason)
        _refuse_resume(client, run_id, reason)
        checkpoint.unlink()
        return None, 0
    epochs = record["epochs"]  # the file's, which a run stopped by an older version may have tagged one short
    log_saved_epoch(client, run_id, record)
    client.update_run(run_id, status="RUNNING")
    for name, value in {"resumed_from_epoch": epochs, "output_dir": output_dir, **tracking.process_tags()}.items():
        client.set_tag(run_id, name, str(value))
    for stale in ("resume_from_epoch", "error"):
        client.delete_tag(run_id, stale)
    log.info("Resuming run %s after epoch %d", run_id, epochs)
    return run_id, epochs


def claimed(client, experiment_id: str, key: str, run_id: str, settle_s: float = CLAIM_SETTLE_S) -> bool:
    """Whether this process owns the run ``run_id`` it just started or reopened, where launches
    on other hosts may have done the same at the same moment: on a server or a database store,
    the configuration's lock (``store.lock``) is a file of this host only, so the claim is settled
    in the store, which every host sees. After ``settle_s`` (both launches have written by then):
    a reopened run is ours if its host and pid tags are still ours (the last to reopen it owns it);
    a new run if no other live RUNNING run of the configuration started before it (the earlier
    start, then the smaller run id, wins)."""
    time.sleep(settle_s)
    tags = client.get_run(run_id).data.tags
    if (tags.get("host"), tags.get("pid")) != (socket.gethostname(), str(os.getpid())):
        return False
    rivals = [run for run in store.runs_of(client, experiment_id, key, "RUNNING") if alive(run)]
    first = min(rivals, key=lambda run: (run.info.start_time, run.info.run_id), default=None)
    return first is None or first.info.run_id == run_id


# ---------------------------------------------------------------------------- the run, start to end


@dataclass
class Run:
    """One job's run as ``tracked_run`` hands it over: ``skipped`` (with its ``result``) if the
    configuration must not train now; else its MLflow ``client`` and ``id``, the ``epoch_end``
    callback that checkpoints and logs each epoch, and ``resume_from``, the checkpoint to go on
    from (None for a new run)."""

    uri: str
    experiment: str
    params: dict = field(default_factory=dict)  # identity.params: what the run logged as its params
    result: dict = field(default_factory=dict)
    client: object = None
    id: str | None = None
    epoch_end: EpochEnd | None = None
    resume_from: Path | None = None
    caption: str = ""

    @property
    def skipped(self) -> bool:
        return "skipped" in self.result

    def finish(self, metrics: dict[str, float], tags: dict[str, str], vae, datamodule) -> None:
        """Log the end-of-run ``metrics`` and ``tags`` at the last epoch's step, upload the
        checkpoint and the run's figures; the run is FINISHED when ``tracked_run`` exits."""
        tracking.log_evaluation(self.client, self.id, metrics, tags, self.epoch_end.saved)
        self.client.log_artifact(self.id, str(self.epoch_end.path), "checkpoints")
        curves = {stage: [(m.step, m.value) for m in self.client.get_metric_history(self.id, f"{stage}/loss")]
                  for stage in ("train", "val")}
        images, labels = datamodule.splits["test"]
        for name, fig in figures.run_figures(vae, images, labels, datamodule.classes, curves, self.caption).items():
            self.client.log_figure(self.id, fig, f"figures/{name}.png")
        self.result = {"run_id": self.id, **{k: float(v) for k, v in metrics.items()}}


def provenance_tags() -> dict[str, str]:
    """The machine and the launch behind a run's numbers: torch's threads and version, the cores,
    and the command (__main__.py sets VAE_SWEEPS_COMMAND, if it launched the job)."""
    tags = {"torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "cpu_count": os.cpu_count(), "command": os.environ.get("VAE_SWEEPS_COMMAND")}
    return {name: str(value) for name, value in tags.items() if value is not None}


@contextmanager
def tracked_run(cfg: DictConfig, datamodule) -> Iterator[Run]:
    """The MLflow run of one job, from its start (or its skip, or its resume) to its end, by the
    rules of this module's docstring. ``datamodule`` is loaded here, once the job is known to
    train. The body trains while SIGINT and SIGTERM raise ``faults.Interrupted``; it calls
    ``run.finish`` and returns, or returns at once if ``run.skipped``."""
    uri = store.resolve_uri(cfg.tracking.uri)
    run = Run(uri, cfg.tracking.experiment)
    output_dir = Path(cfg.paths.output_dir)
    store.quiet_downloads()
    client, experiment_id = store.open_store(uri, run.experiment)
    key, name, params = identity.run_key(cfg), identity.run_name(cfg), identity.params(cfg)
    run.params = params
    with store.lock(uri, key):  # of two launches of this configuration at once, the second sees the first's run
        skipped = None if cfg.force else already_taken(client, experiment_id, key)
        if skipped is not None:
            log.info("Skipped %s: %s", name, skipped["skipped"])
            run.result = skipped
            yield run
            return
        datamodule.load()
        close_dead_runs(client, experiment_id, key)
        run_id, done = (None, 0) if cfg.force else resume(client, experiment_id, key, output_dir)
        reopened = run_id is not None
        if run_id is None:
            run_id = tracking.start_run(client, experiment_id, output_dir, name, params, tracking.config_yaml(cfg),
                                        cfg.get("tags"))
        if store.sqlite_path(uri) is None and not cfg.force and not claimed(client, experiment_id, key, run_id):
            if not reopened:
                client.delete_run(run_id)  # a duplicate of another host's run: nothing of it stays
            log.info("Skipped %s: a launch on another host took this configuration at the same moment", name)
            run.result = {"run_id": run_id, "skipped": "a launch on another host took this configuration at the "
                          "same moment"}
            yield run
            return
    record_reason(output_dir, None)  # an earlier attempt's, where a folder is used again
    run.client, run.id, run.caption = client, run_id, identity.caption(cfg, run_id)
    tracking.describe_run(client, run_id, datamodule, run.caption)
    for tag, value in provenance_tags().items():
        client.set_tag(run_id, tag, value)
    log.info("MLflow run %s (%s)", run_id, name)
    checkpoint = checkpoint_path(output_dir, run_id)
    run.epoch_end = EpochEnd(checkpoint, client, run_id, epochs=done, key=key)
    run.resume_from = checkpoint if done else None
    with signals_as_interrupt() as signals:
        try:
            yield run
        except BaseException as err:
            signals.shield()  # let the clean-up finish
            stop = Interrupted(signals.received) if signals.received else None
            interrupted = stop is not None or isinstance(err, INTERRUPTS)
            reason = str(stop or f"{type(err).__name__}: {err}")
            record_reason(output_dir, reason)  # for the next launch, should the store fail below
            if interrupted and run.epoch_end.saved:
                attempt(keep_checkpoint, client, run_id, checkpoint, key)
            attempt(client.set_tag, run_id, "error", reason[:5000])
            attempt(client.set_terminated, run_id, "KILLED" if interrupted else "FAILED", tries=3)
            if stop is not None and not isinstance(err, Interrupted):
                raise stop from err  # not Lightning's SystemExit(1): the CLI exits with 128 + the signal
            raise
    client.set_terminated(run_id, "FINISHED")
