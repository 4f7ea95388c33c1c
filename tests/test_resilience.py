"""Sweeps that survive: failing jobs, interrupts and resuming, re-runs, parallel jobs,
submitit, a tracking server, and what never reaches the params."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
from conftest import (CONF_DIR, ROOT, all_runs, compose_tiny, job_env, prepared_store, run_cli, slowed_cli,
                      tmp_store, tiny_overrides)
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from mlflow.entities import Param

from vae_sweeps import identity, store, tracking
from vae_sweeps.report import build_report
from vae_sweeps.runs import EpochEnd
from vae_sweeps.train import train


# A small model where the model does not matter: fast epochs, small checkpoints.
SMALL = ("model=mlp2", "model.hidden=[64]")


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def history(client, run, key="train/loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def test_an_interrupted_run_is_killed_then_resumed_to_the_full_epoch_count(tmp_path, tiny_root):
    # Ctrl-C; SIGTERM takes the same path (test_real_mnist.py, scripts/slurm-local.sh)
    sig, epochs = signal.SIGINT, 12
    args = (f"trainer.max_epochs={epochs}", *SMALL)
    command = [*slowed_cli(0.3), *tiny_overrides(tmp_path, tiny_root), *args]
    client = prepared_store(tmp_path)
    # A background job of a non-interactive shell (as CI may be) inherits SIGINT ignored;
    # the job gets the default action back, as it has in a terminal.
    job = subprocess.Popen(command, cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def three_epochs_done():
        runs = all_runs(tmp_path)
        return runs and len(history(client, runs[0])) >= 3

    wait_for(three_epochs_done, 120, "three epochs")
    job.send_signal(sig)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 128 + sig, err[-2000:]  # as a shell expects: 130
    (run,) = all_runs(tmp_path)
    assert run.info.status == "KILLED", err[-2000:]
    assert run.data.tags["error"] == f"interrupted ({sig.name})"
    epochs_done = int(run.data.tags["resume_from_epoch"])
    assert 3 <= epochs_done < epochs
    assert history(client, run)[-1] == epochs_done  # the checkpoint is of the last logged epoch
    assert "checkpoints/last.ckpt" in [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]

    again = run_cli(tmp_path, tiny_root, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    (resumed,) = all_runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from_epoch"] == str(epochs_done)
    assert "resume_from_epoch" not in resumed.data.tags and "error" not in resumed.data.tags
    assert history(client, resumed) == list(range(1, epochs + 1))
    assert history(client, resumed, "val/loss") == list(range(1, epochs + 1))
    assert history(client, resumed, "test/loss") == [epochs]


def test_interrupts_at_awkward_moments_keep_the_run_resumable(make_cfg, tmp_path, monkeypatch):
    calls = iter(range(3))

    def cfg():  # a new output folder each time, as a new job has: resuming downloads the checkpoint
        config = make_cfg("trainer.max_epochs=3", *SMALL)
        config.paths.output_dir = str(tmp_path / f"job{next(calls)}")
        return config

    keep_sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C once it caught one
    original = EpochEnd.save

    def stop_after_saving_epoch_2(self, trainer):
        original(self, trainer)
        if self.saved == 2:
            raise KeyboardInterrupt  # between the checkpoint and the epoch's metrics

    monkeypatch.setattr(EpochEnd, "save", stop_after_saving_epoch_2)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train(cfg())
    monkeypatch.undo()
    client = tmp_store(tmp_path)
    (run,) = all_runs(tmp_path)
    assert (run.info.status, run.data.tags["resume_from_epoch"]) == ("KILLED", "2")
    assert history(client, run) == [1, 2] and history(client, run, "val/loss") == [1, 2]

    def interrupted_at_once(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.Trainer, "fit", interrupted_at_once)  # before a new epoch completes
    with pytest.raises(KeyboardInterrupt):
        train(cfg())
    monkeypatch.undo()
    (run,) = all_runs(tmp_path)
    assert (run.info.status, run.data.tags["resume_from_epoch"]) == ("KILLED", "2")

    result = train(cfg())
    signal.signal(signal.SIGINT, keep_sigint)
    (run,) = all_runs(tmp_path)
    assert result["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert history(client, run) == [1, 2, 3] and history(client, run, "val/loss") == [1, 2, 3]


def test_a_run_left_running_by_a_dead_process_is_closed(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=1", *SMALL)
    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    params = [Param(k, v) for k, v in identity.params(cfg).items()]
    orphan = client.create_run(experiment_id, tags={"host": socket.gethostname(), "pid": dead.stdout.strip()}).info.run_id
    # silent for an hour (runs.alive): not live, so not in the way, but not closed from here either
    elsewhere = client.create_run(experiment_id, tags={"host": "another-node", "pid": "1",
                                                       "heartbeat": str(time.time() - 3600)}).info.run_id
    for run_id in (orphan, elsewhere):
        client.log_batch(run_id, params=params)
    result = train(cfg)
    assert client.get_run(orphan).info.status == "FAILED"
    assert "ended without closing the run" in client.get_run(orphan).data.tags["error"]
    assert client.get_run(elsewhere).info.status == "RUNNING"  # may be alive on its machine
    assert client.get_run(result["run_id"]).info.status == "FINISHED"


def test_a_job_failing_outside_the_main_thread_ends_failed_with_its_reason(make_cfg, tmp_path):
    # Signal handlers belong to the main thread; a job run in another (a thread-based
    # launcher) must still close its run, and raise its own error.
    cfg = make_cfg("trainer.max_epochs=1", "loss.c=1e38", *SMALL)
    errors = []

    def job():
        try:
            train(cfg)
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=job)
    worker.start()
    worker.join(timeout=120)
    assert [type(err).__name__ for err in errors] == ["NonFiniteLoss"]
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("NonFiniteLoss")


def test_a_sweep_run_twice_trains_nothing_the_second_time(tmp_path, tiny_root):
    first = run_cli(tmp_path, tiny_root, "seed=0,1", "trainer.max_epochs=1", *SMALL, flags=("-m",))
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(all_runs(tmp_path)) == 2
    second = run_cli(tmp_path, tiny_root, "seed=0,1", "trainer.max_epochs=1", *SMALL, flags=("-m",))
    assert second.returncode == 0
    assert "Skipping 2 of 2 job(s) that already have a FINISHED run (force=true runs them again):" in second.stdout
    assert "0 job(s) to run" in second.stdout
    assert len(all_runs(tmp_path)) == 2
    forced = run_cli(tmp_path, tiny_root, "seed=0,1", "trainer.max_epochs=1", *SMALL, "force=true",
                     "hydra.sweeper.dry_run=true", flags=("-m",))
    assert forced.returncode == 0 and "Skipping" not in forced.stdout
    assert "Dry run: 2 job(s) to run (every job: " in forced.stdout  # force=true plans them again


def test_a_single_finished_run_is_skipped_with_its_metrics(make_cfg, tmp_path):
    first = train(make_cfg("trainer.max_epochs=1"))
    again = train(make_cfg("trainer.max_epochs=1", "trainer.enable_model_summary=true"))  # display only
    assert again["skipped"] and again["run_id"] == first["run_id"]
    assert again["test/loss"] == pytest.approx(first["test/loss"])
    assert len(all_runs(tmp_path)) == 1
    other = train(make_cfg("trainer.max_epochs=1", "seed=1"))
    assert not other.get("skipped") and len(all_runs(tmp_path)) == 2


def test_parallel_joblib_jobs_lose_no_metric(tmp_path, tiny_root):
    epochs = 15  # two jobs at a time, each writing 6 metrics an epoch into one SQLite store
    done = run_cli(tmp_path, tiny_root, "seed=0,1,2,3", f"trainer.max_epochs={epochs}", *SMALL,
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=null", flags=("-m",))
    assert done.returncode == 0, done.stderr[-2000:]
    runs = all_runs(tmp_path)
    client = tmp_store(tmp_path)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl"):
            assert history(client, run, key) == list(range(1, epochs + 1)), key
    cores = len(os.sched_getaffinity(0))
    assert {r.data.tags["torch_threads"] for r in runs} == {str(max(1, cores // 2))}
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1


def test_a_submitit_local_sweep_is_tracked(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "seed=0,1", "trainer.max_epochs=1", *SMALL, "hydra/launcher=submitit_local",
                   "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", "threads=null",
                   flags=("-m",))
    assert done.returncode == 0, done.stderr[-2000:]
    runs = all_runs(tmp_path)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert {r.data.tags["torch_threads"] for r in runs} == {"1"}


def test_the_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task) == ("gpu", 1, 8)
    assert launcher.max_num_timeout > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.fresh_store
def test_runs_log_to_the_make_server_over_http(tmp_path, tiny_root, monkeypatch):
    port = free_port()
    server = subprocess.Popen(
        ["make", "-C", str(ROOT), "server", f"PY={sys.executable}", f"PORT={port}",
         f"BACKEND=sqlite:///{tmp_path}/server/mlflow.db", f"ARTIFACTS={tmp_path}/server/artifacts",
         "SERVER_ARGS=--workers 1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def healthy():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, 120, "the MLflow server", every=0.5)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        result = train(compose_tiny(tmp_path, tiny_root, "trainer.max_epochs=1", "model.hidden=[64,32]"))

        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert run.data.metrics["test/loss"] == pytest.approx(result["test/loss"])
        assert "figures/samples.png" in [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert (tmp_path / "server" / "artifacts").is_dir()  # the server stored them
        assert not (tmp_path / "mlruns").exists()  # nothing went to the local store
        built = build_report(client, "vae_sweeps", tmp_path / "report")
        assert built["tables"]["table1"].set_index("model.name").loc["mlp3", "n"] == 1
        assert "fig4b_latent2" in built["figures"]  # its panel downloaded through the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_no_secret_or_environment_value_becomes_a_param(make_cfg, tmp_path, tiny_root, monkeypatch):
    monkeypatch.setenv("VAE_SWEEPS_DATA_DIR", str(tiny_root))
    cfg = make_cfg("tracking.uri=postgresql://alice:s3cret-pw@db.example/mlflow", "data.root=${oc.env:VAE_SWEEPS_DATA_DIR}")
    params = identity.params(cfg)
    assert not any("s3cret" in v or str(tiny_root) in v for v in params.values())
    assert not any(k.startswith(("tracking", "paths")) or k in ("data.root", "force") for k in params)
    text = tracking.config_yaml(cfg)
    assert "s3cret" not in text and "postgresql://alice:***@db.example/mlflow" in text


@pytest.mark.fresh_store
def test_processes_creating_one_new_store_at_once_all_succeed(tmp_path):
    # Each process imports mlflow, says it is ready, then waits for one common "go".
    go = tmp_path / "go"
    code = ("import os, sys, time; from pathlib import Path; from vae_sweeps.store import open_store; "
            "Path(sys.argv[1]).touch()\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
            f"print(open_store('sqlite:///{tmp_path}/mlruns/mlflow.db', 'vae_sweeps')[1])")
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(flag)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.time() + 120
    while not all(flag.exists() for flag in ready) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, the same id for all


def test_retrying_client_repeats_only_locked_writes():
    calls = []

    class Flaky:
        def log_batch(self, *args):
            calls.append(args)
            if len(calls) < 3:
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return "logged"

        def get_run(self, run_id):
            calls.append(run_id)
            raise RuntimeError("RESOURCE_DOES_NOT_EXIST")

    client = store.RetryingClient(Flaky(), attempts=4, wait=0.0)
    assert client.log_batch("run") == "logged" and len(calls) == 3
    calls.clear()
    with pytest.raises(RuntimeError, match="RESOURCE_DOES_NOT_EXIST"):
        client.get_run("x")
    assert len(calls) == 1  # other errors are not retried
    always_locked = store.RetryingClient(Flaky(), attempts=2, wait=0.0)
    calls.clear()
    with pytest.raises(RuntimeError, match="database is locked"):
        always_locked.log_batch("run")
    assert len(calls) == 2


def test_every_run_reads_every_page_and_passes_the_filter():
    class Page(list):
        def __init__(self, runs, token):
            super().__init__(runs)
            self.token = token

    class Paged:
        def __init__(self):
            self.calls = []

        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="7") if name == "vae_sweeps" else None

        def search_runs(self, ids, filter_string, max_results, page_token):
            self.calls.append((ids, filter_string, page_token))
            return Page(["a", "b"], "next") if page_token is None else Page(["c"], None)

    client = Paged()
    assert list(store.every_run(client, "vae_sweeps", "attributes.status = 'FINISHED'")) == ["a", "b", "c"]
    assert client.calls == [(["7"], "attributes.status = 'FINISHED'", None),
                            (["7"], "attributes.status = 'FINISHED'", "next")]
    assert list(store.every_run(client, "no such experiment")) == []
