"""Parallel jobs over GPUs (vae_sweeps/devices.py), on this CPU with a fake GPU count."""

import os

import pytest
import torch
from conftest import CONF_DIR, all_runs, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from vae_sweeps import devices
from vae_sweeps.identity import params, result_settings
from vae_sweeps.train import make_trainer, torch_threads

CORES = len(os.sched_getaffinity(0))


@pytest.fixture
def fake_gpus(monkeypatch):
    """fake_gpus(n): torch sees n CUDA GPUs (none when n is 0)."""
    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return fake


def compose_job(*overrides: str, job_num: int | None = None):
    """The config of one job of a sweep (with its Hydra node), made current as Hydra does."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    if job_num is not None:
        cfg.hydra.job.num = job_num
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def no_hydra_config_left(monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)


def test_jobs_at_once_is_jobs_per_gpu_on_each_gpu_and_one_without_a_gpu():
    assert devices.jobs_at_once(1, 1) == 1
    assert devices.jobs_at_once(4, 1) == 4
    assert devices.jobs_at_once(2, 4) == 8
    assert devices.jobs_at_once(4, 0) == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="jobs_per_gpu=.* must be a positive integer"):
            devices.jobs_at_once(bad, 2)


def test_the_jobs_running_at_once_are_spread_evenly_over_the_gpus():
    gpus, jobs_per_gpu = 4, 3
    first = [devices.job_gpu(n, gpus) for n in range(devices.jobs_at_once(jobs_per_gpu, gpus))]
    assert sorted(first) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert devices.job_gpu(5, 0) is None


def test_a_job_is_pinned_to_its_gpu_only_where_it_would_train_on_one_gpu():
    default = {"accelerator": "auto", "devices": 1, "max_epochs": 2}
    assert devices.pin_to_gpu(default, 6, 4) == {**default, "devices": [2]}
    assert devices.pin_to_gpu({**default, "accelerator": "gpu"}, 1, 2)["devices"] == [1]
    assert devices.pin_to_gpu(default, 6, 0) == default  # no GPU
    assert devices.pin_to_gpu({**default, "accelerator": "cpu"}, 6, 4)["devices"] == 1
    assert devices.pin_to_gpu({**default, "devices": [3]}, 6, 4)["devices"] == [3]  # the user's choice
    assert devices.pin_to_gpu({**default, "devices": 2}, 6, 4)["devices"] == 2


def test_gpu_count_reads_cuda(fake_gpus):
    fake_gpus(0)
    assert devices.gpu_count() == 0
    fake_gpus(3)
    assert devices.gpu_count() == 3


@pytest.mark.parametrize("gpus, jobs_per_gpu, n_jobs", [(2, 4, 8), (1, 2, 2), (0, 4, 1)])
def test_the_joblib_gpu_launcher_runs_gpus_times_jobs_per_gpu_jobs(fake_gpus, gpus, jobs_per_gpu, n_jobs):
    fake_gpus(gpus)
    cfg = compose_job("hydra/launcher=joblib_gpu", f"jobs_per_gpu={jobs_per_gpu}", job_num=0)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == n_jobs
    assert torch_threads(cfg) == max(1, CORES // n_jobs)


class Recorder:
    """Stands for pl.Trainer in make_trainer: keeps the options it was given."""

    def __init__(self, **options):
        self.options = options


def test_make_trainer_puts_job_n_on_gpu_n_mod_gpus(fake_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr("vae_sweeps.train.pl.Trainer", Recorder)
    fake_gpus(2)
    chosen = []
    for num in range(4):
        cfg = compose_job("hydra/launcher=joblib_gpu", "jobs_per_gpu=2", job_num=num)
        chosen.append(make_trainer(cfg, [], tmp_path).options["devices"])
    assert chosen == [[0], [1], [0], [1]]


def test_without_a_gpu_jobs_per_gpu_changes_nothing(fake_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr("vae_sweeps.train.pl.Trainer", Recorder)
    fake_gpus(0)
    plain = compose_job(job_num=3)
    plain_options, plain_threads = make_trainer(plain, [], tmp_path).options, torch_threads(plain)
    many = compose_job("jobs_per_gpu=8", job_num=3)
    assert make_trainer(many, [], tmp_path).options == plain_options
    assert plain_options["devices"] == 1
    assert torch_threads(many) == plain_threads
    assert params(many)["jobs_per_gpu"] == "8"  # logged, but not part of a run's identity:
    assert result_settings(params(many)) == result_settings(params(plain))


def test_a_joblib_gpu_sweep_runs_on_this_cpu(tmp_path, tiny_root):
    # the launcher resolves n_jobs here, and each joblib worker resolves it again for its threads
    done = run_cli(tmp_path, tiny_root, "seed=0,1", "trainer.max_epochs=1", "model=mlp2", "model.hidden=[64]",
                   "hydra/launcher=joblib_gpu", "jobs_per_gpu=2", "threads=null", flags=("-m",))
    assert done.returncode == 0, done.stderr[-2000:]
    at_once = devices.jobs_at_once(2, devices.gpu_count())  # 1 without a GPU: one job at a time
    assert f"Joblib.Parallel(n_jobs={at_once}," in done.stdout + done.stderr
    runs = all_runs(tmp_path)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["torch_threads"] for r in runs} == {str(max(1, CORES // at_once))}
