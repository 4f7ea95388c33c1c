"""Faults that must not lose or mix up work: jobs started in the same second, a foreign
checkpoint, a process killed with SIGKILL, a full disk, a store that fails during the clean-up,
a second launch of a configuration that is running (or starting at the same moment), and the
exit status of an interrupt."""

import datetime
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import all_runs, job_env, prepared_store, run_cli, slowed_cli, tmp_store, tiny_overrides
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pytorch_lightning.plugins.io import TorchCheckpointIO
from sqlalchemy.engine.default import DefaultDialect
from test_resilience import SMALL, history, wait_for

from vae_sweeps import faults, identity, runs, store, tracking
from vae_sweeps.module import NonFiniteLoss
from vae_sweeps.runs import EpochEnd, keep_checkpoint
from vae_sweeps.train import train

QUICK = (*SMALL, "eval.iw_samples=1", "eval.judge_epochs=1")  # a small model, a short evaluation
# python -m vae_sweeps with Hydra's ${now:...} frozen: every job it starts, starts in the same second
SAME_SECOND = ("import datetime, runpy, hydra.core.utils\n"
               "class Frozen(datetime.datetime):\n"
               "    @classmethod\n"
               "    def now(cls, tz=None):\n"
               "        return cls(2030, 1, 1)\n"
               "hydra.core.utils.datetime = Frozen\n"
               "runpy.run_module('vae_sweeps', run_name='__main__', alter_sys=True)")


def saved_key(path) -> str | None:
    """The identity key that a checkpoint file was saved with."""
    return torch.load(path, weights_only=True).get("vae_sweeps", {}).get("run_key")


def first_epoch_logged(tmp_path, client):
    runs = all_runs(tmp_path)
    return runs and history(client, runs[0])


def together(tmp_path, commands: list[list[str]]) -> None:
    """Start ``commands`` at once in tmp_path and wait until each has ended, with exit status 0."""
    jobs = [subprocess.Popen(command, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for command in commands]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]


def test_jobs_started_in_the_same_second_write_only_their_own_files(tmp_path, tiny_root):
    client = prepared_store(tmp_path)
    together(tmp_path, [[sys.executable, "-c", SAME_SECOND, *tiny_overrides(tmp_path, tiny_root), *QUICK,
                         "trainer.max_epochs=1", f"seed={seed}"] for seed in (0, 1)])
    done = all_runs(tmp_path)
    folders = {Path(run.data.tags["output_dir"]) for run in done}
    assert len(done) == 2 and len(folders) == 2
    assert all(folder.name.startswith("2030-01-01_00-00-00") for folder in folders)
    for run in done:  # its folder's checkpoint and the one it uploaded are its own
        uploaded = client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(tmp_path / run.info.run_id))
        local = runs.checkpoint_path(run.data.tags["output_dir"], run.info.run_id)
        assert saved_key(uploaded) == saved_key(local) == identity.key_of(run.data.params)


def test_two_configurations_launched_into_one_output_folder_keep_their_own_checkpoints(tmp_path, tiny_root):
    """The user's hydra.run.dir, given to two configurations at once: each run's checkpoint, on
    disk and uploaded, holds its own weights (before, the runs shared one file, and a run's
    stored checkpoint could be the other configuration's)."""
    client = prepared_store(tmp_path)
    together(tmp_path, [[*slowed_cli(0.5), *tiny_overrides(tmp_path, tiny_root), *QUICK, f"seed={seed}",
                         "hydra.run.dir=outputs/runs/same"] for seed in (11, 12)])
    done = all_runs(tmp_path)
    assert len(done) == 2 and all(run.info.status == "FINISHED" for run in done)
    assert {run.data.tags["output_dir"] for run in done} == {str(tmp_path / "outputs" / "runs" / "same")}
    uploads = []
    for run in done:
        key = identity.key_of(run.data.params)
        uploads.append(client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(tmp_path / run.info.run_id)))
        local = runs.checkpoint_path(run.data.tags["output_dir"], run.info.run_id)
        assert saved_key(uploads[-1]) == saved_key(local) == key
    assert Path(uploads[0]).read_bytes() != Path(uploads[1]).read_bytes()


def test_a_config_composed_outside_the_command_line_has_a_launch_folder_that_its_jobs_share(monkeypatch):
    """Composed with Hydra's compose API (tests, a user's own script), the config resolves its
    output folders without the command line; two launches in the same second get two folders,
    and each job of a sweep, whose config Hydra composes again, gets its launch's."""
    import hydra.core.utils
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    class Frozen(datetime.datetime):  # the same second for every launch
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 1)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    with initialize_config_dir(config_dir=str(identity.CONF_DIR), version_base="1.3"):
        first, second = (compose(config_name="config", return_hydra_config=True)
                         for _ in range(2))
        folders = [Path(cfg.hydra.sweep.dir) for cfg in (first, second)]
        assert folders[0] != folders[1] and all(f.name.startswith("2030-01-01_00-00-00-") for f in folders)
        assert Path(first.hydra.run.dir).name == folders[0].name  # one id for the launch
        # a sweep's job: its config composed again from the launch's (as every launcher does)
        job = GlobalHydra.instance().config_loader().load_sweep_config(first, ["seed=1"])
        assert Path(job.hydra.sweep.dir) == folders[0]


def test_a_checkpoint_of_another_configuration_is_not_resumed(make_cfg, tmp_path, monkeypatch):
    other = train(make_cfg("trainer.max_epochs=1", "seed=1", *QUICK))  # uploads its checkpoint at its end
    original = EpochEnd.save

    def stop_after_epoch_1(self, trainer):
        original(self, trainer)
        raise KeyboardInterrupt

    monkeypatch.setattr(EpochEnd, "save", stop_after_epoch_1)
    cfg = make_cfg(*QUICK)  # seed 0, 2 epochs
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train(cfg)
    monkeypatch.undo()
    client = tmp_store(tmp_path)
    (killed,) = [run for run in all_runs(tmp_path) if run.info.status == "KILLED"]
    assert killed.data.tags["resume_from_epoch"] == "1"
    # the other configuration's checkpoint in its place, as when two jobs shared one folder
    foreign = client.download_artifacts(other["run_id"], "checkpoints/last.ckpt", str(tmp_path / "foreign"))
    client.log_artifact(killed.info.run_id, foreign, "checkpoints")

    result = train(cfg)
    assert result["run_id"] not in (killed.info.run_id, other["run_id"])  # a new run, from epoch 0
    fresh, refused = client.get_run(result["run_id"]), client.get_run(killed.info.run_id)
    assert fresh.info.status == "FINISHED" and history(client, fresh) == [1, 2]
    assert refused.info.status == "KILLED" and "resume_from_epoch" not in refused.data.tags
    assert "another configuration" in refused.data.tags["error"]


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path, tiny_root):
    args = ("trainer.max_epochs=5", *QUICK)
    client = prepared_store(tmp_path)
    job = subprocess.Popen([*slowed_cli(1.0), *tiny_overrides(tmp_path, tiny_root), *args], cwd=tmp_path,
                           env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: first_epoch_logged(tmp_path, client), 180, "the first epoch")
    job.kill()
    job.wait(timeout=60)
    (run,) = all_runs(tmp_path)
    assert run.info.status == "RUNNING"  # nothing could close it

    again = run_cli(tmp_path, tiny_root, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    (resumed,) = all_runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert int(resumed.data.tags["resumed_from_epoch"]) >= 1
    assert history(client, resumed) == [1, 2, 3, 4, 5]
    assert history(client, resumed, "val/loss") == [1, 2, 3, 4, 5]


def test_a_full_disk_fails_the_run_with_its_reason_and_leaves_no_partial_file(make_cfg, tmp_path, monkeypatch):
    def disk_full(self, checkpoint, path, storage_options=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(bytes(1000))  # what was written before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    with pytest.raises(OSError) as raised:
        train(make_cfg(*QUICK))
    assert raised.value.errno == errno.ENOSPC
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    assert [path for path in (tmp_path / "out" / "checkpoints").rglob("*") if path.is_file()] == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs; skips where this user may not mount one."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                              capture_output=True, text=True)
    except OSError as err:
        pytest.skip(f"no mount command to make a 3 MB tmpfs: {err}")
    if done.returncode != 0:
        pytest.skip(f"mounting a 3 MB tmpfs is not permitted here (it needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_job_whose_output_folder_fills_up_fails_and_frees_the_space(make_cfg, tmp_path, small_disk):
    cfg = make_cfg("model=mlp2", "model.hidden=[512]")  # a checkpoint of 10 MB: weights and Adam's state
    cfg.paths.output_dir = str(small_disk)
    with pytest.raises(OSError) as raised:
        train(cfg)
    assert raised.value.errno == errno.ENOSPC
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["error"]
    assert not list(small_disk.rglob("*.partial"))
    assert shutil.disk_usage(small_disk).used < 100_000


def test_a_store_failing_during_the_clean_up_hides_no_error_and_the_next_launch_closes_the_run(
        make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("trainer.max_epochs=1", "loss.c=1e38", *QUICK)  # NonFiniteLoss at the first step
    attempts = []
    set_tag = MlflowClient.set_tag

    def store_down(*args):
        attempts.append(args)
        raise MlflowException("(sqlite3.OperationalError) database or disk is full")

    def set_tag_but_error(self, run_id, key, value, *args, **kwargs):  # the clean-up's tag fails
        return store_down(key) if key == "error" else set_tag(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(faults, "CLEANUP_WAIT_S", 0.0)
    monkeypatch.setattr(MlflowClient, "set_tag", set_tag_but_error)
    monkeypatch.setattr(MlflowClient, "set_terminated", lambda self, run_id, status: store_down(status))
    with pytest.raises(NonFiniteLoss):
        train(cfg)
    monkeypatch.undo()
    assert attempts == [("error",), ("FAILED",), ("FAILED",), ("FAILED",)]  # the status update is retried
    (run,) = all_runs(tmp_path)
    assert run.info.status == "RUNNING" and "error" not in run.data.tags

    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client.set_tag(run.info.run_id, "pid", gone.stdout.strip())  # its process has ended
    runs.close_dead_runs(client, experiment_id, identity.run_key(cfg))
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLoss: train/loss is inf")  # the reason it recorded


def test_two_identical_commands_started_together_train_once(tmp_path, tiny_root):
    """The configuration's lock (store.lock): the second launch waits while the first looks
    for runs and starts its own, then sees that RUNNING run and skips. Each launch pauses 3 s
    between finding no run and starting one, so that without the lock both would train."""
    prepared_store(tmp_path)
    pause = ("import time, vae_sweeps.runs as job; found = job.already_taken; "
             "job.already_taken = lambda *args: (found(*args), time.sleep(3))[0]")
    args = [*slowed_cli(0.5, pause), *tiny_overrides(tmp_path, tiny_root), *QUICK, "trainer.max_epochs=8"]
    jobs = [subprocess.Popen(args, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in outputs]
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    skipped = [out for out, _ in outputs if ": this configuration has a RUNNING run" in out]
    trained = [out for out, _ in outputs if "test/loss" in out]
    assert len(skipped) == len(trained) == 1
    assert f"({run.info.run_id}" in skipped[0] and f"MLflow run id: {run.info.run_id}" in trained[0]


def test_a_run_on_another_host_is_live_while_its_heartbeat_is_recent():
    def running(**tags):
        info = type("Info", (), {"start_time": int(time.time() * 1000) - 3_600_000})  # started an hour ago
        return type("Run", (), {"info": info, "data": type("Data", (), {"tags": {"host": "another-node", **tags}})})

    now = time.time()
    assert runs.alive(running(heartbeat=str(now - 60)))
    assert not runs.alive(running(heartbeat=str(now - 3600)))
    assert runs.alive(running(heartbeat=str(now - 3600), longest_epoch_s="2400"))  # slow epochs
    assert not runs.alive(running())  # no heartbeat since it started, an hour ago
    assert runs.alive(running(host=socket.gethostname(), pid=str(os.getpid())))


def test_ctrl_c_stops_a_sweep_with_status_130_and_starts_no_other_job(tmp_path, tiny_root):
    client = prepared_store(tmp_path)
    job = subprocess.Popen([*slowed_cli(0.5), "-m", *tiny_overrides(tmp_path, tiny_root), "seed=0,1",
                            "trainer.max_epochs=30", *QUICK], cwd=tmp_path, env=job_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: first_epoch_logged(tmp_path, client), 180, "the first epoch")
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-2000:]
    (run,) = all_runs(tmp_path)  # the second job never started
    assert (run.data.params["seed"], run.info.status) == ("0", "KILLED")
    assert run.data.tags["error"] == "interrupted (SIGINT)"


@pytest.fixture
def sigint_as_in_a_terminal():
    """SIGINT's default handler in this process, as a terminal gives it, also where the suite runs
    as a background job of a non-interactive shell (SIGINT ignored: signals_as_interrupt keeps it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def signal_inside_commits(monkeypatch, times: int = 1) -> None:
    """Every SQLite commit of the store first sends this process SIGINT ``times`` times: the
    handler runs inside the commit, as a Ctrl-C does that lands there by chance."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "use sigint_as_in_a_terminal"
    original = DefaultDialect.do_commit

    def interrupted_commit(self, connection):
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # Python runs the handler here
        return original(self, connection)

    monkeypatch.setattr(DefaultDialect, "do_commit", interrupted_commit)


@pytest.mark.usefixtures("sigint_as_in_a_terminal")
def test_a_signal_inside_a_store_commit_comes_after_it_and_leaves_the_store_unlocked(tmp_path, monkeypatch):
    # Raised inside the commit, the interrupt left this process holding SQLite's write lock:
    # the clean-up's calls then waited for it in vain and the run stayed RUNNING.
    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlflow.db", "vae_sweeps")
    run_id = client.create_run(experiment_id).info.run_id
    signal_inside_commits(monkeypatch)
    with faults.signals_as_interrupt(), pytest.raises(faults.Interrupted) as stop:
        client.set_tag(run_id, "epoch", "1")
    monkeypatch.undo()
    assert stop.value.signum == signal.SIGINT
    checker = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert checker.get_run(run_id).data.tags["epoch"] == "1"  # the write was finished first
    started = time.monotonic()
    client.set_terminated(run_id, "KILLED")  # the clean-up, as train does it
    assert checker.get_run(run_id).info.status == "KILLED" and time.monotonic() - started < 5


@pytest.mark.usefixtures("sigint_as_in_a_terminal")
def test_a_second_signal_during_a_store_call_stops_at_once(tmp_path, monkeypatch):
    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlflow.db", "vae_sweeps")
    run_id = client.create_run(experiment_id).info.run_id
    signal_inside_commits(monkeypatch, times=2)  # Ctrl-C twice: a store that does not answer
    with faults.signals_as_interrupt(), pytest.raises(faults.Interrupted):
        client.set_tag(run_id, "epoch", "1")
    monkeypatch.undo()
    assert "epoch" not in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.tags


def test_an_interrupt_just_after_a_checkpoint_was_replaced_loses_no_epoch(make_cfg, tmp_path, monkeypatch):
    # the signal came after the file took epoch 2 and before EpochEnd noted it (as under SLURM)
    original = EpochEnd.save

    def stop_after_replacing_epoch_2(self, trainer):
        noted = self.saved
        original(self, trainer)
        if self.saved == 2:
            self.saved = noted
            raise KeyboardInterrupt

    monkeypatch.setattr(EpochEnd, "save", stop_after_replacing_epoch_2)
    cfg = make_cfg("trainer.max_epochs=3", *QUICK)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train(cfg)
    monkeypatch.undo()
    client = tmp_store(tmp_path)
    (killed,) = all_runs(tmp_path)
    assert killed.info.status == "KILLED" and killed.data.tags["resume_from_epoch"] == "2"
    assert history(client, killed) == [1, 2]  # epoch 2's means, from the checkpoint's record

    result = train(cfg)
    (run,) = all_runs(tmp_path)
    assert run.info.run_id == result["run_id"] == killed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == "2"
    assert history(client, run) == [1, 2, 3]


def test_keeping_a_checkpoint_logs_its_epoch_once_and_only_its_own_configuration(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=2", *QUICK)
    trained = train(cfg)
    client = tmp_store(tmp_path)
    saved = runs.checkpoint_path(tmp_path / "out", trained["run_id"])  # epoch 2, means {train/loss: ..., val/...}
    record = torch.load(saved, weights_only=True)["vae_sweeps"]
    assert record["epochs"] == 2 and record["means"]["train/loss"] > 0
    run_id = client.create_run(client.get_experiment_by_name("vae_sweeps").experiment_id).info.run_id
    for epoch, loss in ((1, 200.0), (2, 150.0)):  # the store took epoch 2 before the process stopped
        tracking.log_metrics(client, run_id, {"train/loss": loss}, epoch)
    key = identity.run_key(cfg)
    assert keep_checkpoint(client, run_id, saved, key) == 2
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 200.0), (2, 150.0)]
    assert client.get_run(run_id).data.tags["resume_from_epoch"] == "2"

    behind = client.create_run(client.get_experiment_by_name("vae_sweeps").experiment_id).info.run_id
    tracking.log_metrics(client, behind, {"train/loss": 200.0}, 1)  # the file is an epoch ahead of the store
    assert keep_checkpoint(client, behind, saved, key) == 2
    logged = client.get_metric_history(behind, "train/loss")
    assert [(m.step, m.value) for m in logged] == [(1, 200.0), (2, pytest.approx(record["means"]["train/loss"]))]
    assert [a.path for a in client.list_artifacts(behind, "checkpoints")] == ["checkpoints/last.ckpt"]

    other = client.create_run(client.get_experiment_by_name("vae_sweeps").experiment_id).info.run_id
    assert keep_checkpoint(client, other, saved, "another-key") == 0  # a foreign file: nothing done
    assert keep_checkpoint(client, other, tmp_path / "missing.ckpt", key) == 0
    assert client.get_metric_history(other, "train/loss") == [] and not client.list_artifacts(other)
    assert "resume_from_epoch" not in client.get_run(other).data.tags
