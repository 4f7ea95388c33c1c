"""The whole path on the real MNIST files, with short budgets: a sweep with a failing job, an
interrupted and resumed run, a re-run that skips finished work. Skipped where the files are
not at $VAE_SWEEPS_DATA_DIR (else ../shared/datasets)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import JOB_THREADS, all_runs, job_env, prepared_store, slowed_cli, tmp_store

from vae_sweeps import evaluation, judge
from vae_sweeps.data import MNIST, load_arrays, to_tensors

DATA = Path(os.environ.get("VAE_SWEEPS_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
pytestmark = pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST files in {DATA}")

# Short budgets: a small model, 10 training batches an epoch, 2 importance samples (one torch thread).
SHORT = [JOB_THREADS, "model=mlp2", "model.hidden=[64]", "+trainer.limit_train_batches=10",
         "+trainer.limit_val_batches=2", "eval.iw_samples=2", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def tiny_judge(tmp_path):
    """A judge trained on 1,000 real images (seconds), stored where the runs look for theirs:
    the real judge (60,000 images, 5 epochs, minutes) is not trained in the tests."""
    x, y = to_tensors(*load_arrays("mnist", DATA, download_missing=False)["train"])
    splits = {"train": (x[:800], y[:800]), "val": (x[800:1000], y[800:1000]), "test": (x[1000:1200], y[1000:1200])}
    client, experiment = evaluation.judges_experiment(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")
    key = judge.data_key("mnist", MNIST(root=str(DATA), download=False))  # the runs' judge
    judge.load_or_train(client, experiment, key, splits, epochs=5)  # eval.judge_epochs' default


def command(tmp_path: Path, *args: str, flags=(), cli=(sys.executable, "-m", "vae_sweeps")) -> list[str]:
    return [*cli, *flags, f"data.root={DATA}", "data.download=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", *SHORT, *args]


def run(tmp_path: Path, *args: str, flags=()) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp_path, *args, flags=flags), cwd=tmp_path, env=job_env(),
                          capture_output=True, text=True, timeout=600)


def test_a_sweep_with_a_failing_job_then_a_rerun_that_skips(tmp_path):
    # c = 1e38 is a valid weight, but c * Recon overflows float32 at the first step
    done = run(tmp_path, "loss.c=1e38,1", "trainer.max_epochs=2", flags=("-m",))
    assert done.returncode == 1
    assert "error: 1 of 2 job(s) failed:" in done.stderr
    assert "  #0 loss.c=1e+38: NonFiniteLoss: train/loss is inf at epoch 1, step 1" in done.stderr
    runs = {r.data.params["loss.c"]: r for r in all_runs(tmp_path)}
    assert {c: r.info.status for c, r in runs.items()} == {"1e+38": "FAILED", "1.0": "FINISHED"}
    assert runs["1e+38"].data.tags["error"] == "NonFiniteLoss: train/loss is inf at epoch 1, step 1"
    finished = runs["1.0"]  # the job after the failure ran in full
    assert [m.step for m in tmp_store(tmp_path).get_metric_history(finished.info.run_id, "val/loss")] == [1, 2]
    assert finished.data.params["data.name"] == "mnist"
    assert finished.data.metrics["test/loss"] < 600 and 0 < finished.data.metrics["test/knn_accuracy"] <= 1
    again = run(tmp_path, "loss.c=1e38,1", "trainer.max_epochs=2", flags=("-m",))
    assert "Skipping 1 of 2 job(s) that already have a FINISHED run" in again.stdout
    assert again.returncode == 1  # the failing job ran again, and failed again
    assert len(all_runs(tmp_path)) == 3


def test_sigterm_then_resume_on_the_real_data(tmp_path):
    client = prepared_store(tmp_path)
    slow = command(tmp_path, "trainer.max_epochs=20", cli=slowed_cli(0.3))
    job = subprocess.Popen(slow, cwd=tmp_path, env=job_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = all_runs(tmp_path)
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 2:
            break
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 128 + signal.SIGTERM, err[-2000:]  # 143, as a shell expects
    (run_,) = all_runs(tmp_path)
    assert run_.info.status == "KILLED" and run_.data.tags["error"] == "interrupted (SIGTERM)", err[-2000:]
    epochs = int(run_.data.tags["resume_from_epoch"])
    assert 2 <= epochs < 20
    done = run(tmp_path, "trainer.max_epochs=20")
    assert done.returncode == 0, done.stderr[-2000:]
    (resumed,) = all_runs(tmp_path)
    assert resumed.info.run_id == run_.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")] == list(range(1, 21))
