"""hydra/launcher=slurm without a cluster: the profiles, the interrupt that ends a job's last
requeue, and how the launcher follows jobs with squeue. scripts/slurm-local.sh runs the same
on a real single-node SLURM."""

from types import SimpleNamespace

import pytest
from conftest import CONF_DIR, all_runs, tmp_store
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from submitit.core.utils import UncompletedJobError
from submitit.slurm import slurm

from hydra_plugins.vae_sweeps_sweeper import slurm_launcher
from vae_sweeps.faults import INTERRUPTS
from vae_sweeps.runs import EpochEnd
from vae_sweeps.train import train


def launcher_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True, overrides=list(overrides)).hydra.launcher


def test_the_cpu_profile_fits_a_small_node_and_the_gpu_profile_asks_for_a_gpu():
    cpu = launcher_config("hydra/launcher=slurm")
    assert cpu._target_ == "hydra_plugins.vae_sweeps_sweeper.slurm_launcher.SlurmLauncher"
    assert cpu.gpus_per_node is None and cpu.cpus_per_task <= 2 and cpu.mem_gb <= 4
    # SLURM checks time limits every 30 s, so the signal comes up to 30 s early: a job with
    # a 1-minute limit must still get it after it has started
    assert 0 < cpu.signal_delay_s <= 10 and cpu.max_num_timeout > 0
    gpu = launcher_config("hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu")
    assert (gpu._target_, gpu.partition, gpu.gpus_per_node) == (cpu._target_, "gpu", 1)
    assert gpu.signal_delay_s == cpu.signal_delay_s and gpu.max_num_timeout == cpu.max_num_timeout


def test_a_job_whose_requeues_ran_out_ends_killed_and_resumable(make_cfg, tmp_path, monkeypatch):
    # submitit's handler of the signal before the time limit raises UncompletedJobError in the
    # job once max_num_timeout requeues are used up
    assert issubclass(UncompletedJobError, INTERRUPTS)
    original = EpochEnd.save

    def signalled_after_epoch_2(self, trainer):
        original(self, trainer)
        if self.saved == 2:
            raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    monkeypatch.setattr(EpochEnd, "save", signalled_after_epoch_2)
    cfg = make_cfg("trainer.max_epochs=3", "model=mlp2", "model.hidden=[64]")
    with pytest.raises(UncompletedJobError):
        train(cfg)
    (run,) = all_runs(tmp_path)
    assert (run.info.status, run.data.tags["resume_from_epoch"]) == ("KILLED", "2")

    monkeypatch.undo()
    cfg.paths.output_dir = str(tmp_path / "relaunched")  # a new job: it downloads the checkpoint
    result = train(cfg)
    (run,) = all_runs(tmp_path)
    assert result["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == "2"
    assert [m.step for m in tmp_store(tmp_path).get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]


# Hydra's plugin scan runs the plugin modules again when a config is composed: their classes
# are looked up when used, as the launcher does.
def squeue_watcher(*jobs: str) -> slurm_launcher.SqueueWatcher:
    watcher = slurm_launcher.SqueueWatcher(delay_s=60)
    for job in jobs:
        watcher.register_job(job)
    return watcher


def test_squeue_tells_the_state_of_array_tasks_and_jobs_it_no_longer_lists():
    watcher = squeue_watcher("41_0", "41_1", "41_2", "41_3", "40_0", "39")
    # squeue --me --noheader --states=all --format=%i|%T: pending array tasks come as a range
    info = watcher.read_info(b"41_[2-3%32]|PENDING\n41_0|RUNNING\n41_1|CONFIGURING\n39|REQUEUED\n7|COMPLETED\n")
    watcher._info_dict.update(info)
    states = {job: watcher.get_state(job, mode="cache") for job in ("41_0", "41_1", "41_2", "41_3", "40_0", "39")}
    assert states == {"41_0": "RUNNING", "41_1": "CONFIGURING", "41_2": "PENDING", "41_3": "PENDING",
                      "40_0": "GONE", "39": "REQUEUED"}
    done = {job for job in states if watcher.is_done(job, mode="cache")}
    assert done == {"40_0"}  # forgotten by SLURM: ended (the job then counts as failed if it left no result)
    watcher._info_dict.update(watcher.read_info("41_0|COMPLETED\n41_1|NODE_FAIL\n41_2|TIMEOUT\n41_3|CANCELLED\n"))
    assert all(watcher.is_done(job, mode="cache") for job in ("41_0", "41_1", "41_2", "41_3"))


def test_the_watcher_asks_squeue_not_sacct():
    assert squeue_watcher()._make_command() is None  # nothing to follow
    assert squeue_watcher("41_0")._make_command()[0] == "squeue"


def test_a_job_that_ended_without_a_result_is_a_failed_job_of_the_sweep(monkeypatch):
    seen = {}

    def parent_launch(self, job_overrides, initial_job_idx):  # stands for submitit and SLURM
        seen["watcher"], seen["results"] = slurm.SlurmJob.watcher, slurm.SlurmJob.results
        return [JobReturn(status=JobStatus.COMPLETED), slurm.SlurmJob.results(FailingJob())[0]]

    class FailingJob:  # a job that SLURM no longer lists, and that left no result
        job_id, state, _sub_jobs = "41_1", "GONE", []
        paths = SimpleNamespace(stderr="/sweep/.submitit/41_1/41_1_0_log.err")

        def wait(self):
            pass

        def _get_outcome_and_result(self):
            raise UncompletedJobError("Job 41_1 (task: 0) has not produced any output (state: GONE)")

    launcher = slurm_launcher.SlurmLauncher
    assert launcher.__bases__[0].__name__ == submitit_launcher.SlurmLauncher.__name__
    monkeypatch.setattr(launcher.__bases__[0], "launch", parent_launch)
    default = slurm.SlurmJob.watcher
    returns = launcher().launch([["seed=0"], ["seed=1"]], initial_job_idx=4)
    assert isinstance(seen["watcher"], slurm_launcher.SqueueWatcher)
    assert slurm.SlurmJob.watcher is default and slurm.SlurmJob.results is not seen["results"]  # restored
    assert returns[0].status == JobStatus.COMPLETED
    lost = returns[1]
    assert (lost.status, lost.overrides, lost.hydra_cfg.hydra.job.num) == (JobStatus.FAILED, ["seed=1"], 5)
    assert isinstance(lost._return_value, UncompletedJobError)
    assert str(lost._return_value) == ("SLURM job 41_1 ended without a result (no longer listed by squeue); "
                                       "its log: /sweep/.submitit/41_1/41_1_0_log.err")
