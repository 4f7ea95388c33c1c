"""hydra/launcher=slurm without a cluster: the profiles, the interrupt that ends a job's last
requeue, and how the launcher follows jobs with squeue. scripts/slurm-local.sh runs the same
on a real single-node SLURM."""

from types import SimpleNamespace

import pytest
from conftest import CONF_DIR, all_runs, tmp_store
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
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
    class FinishedJob:
        def results(self):
            return [JobReturn(status=JobStatus.COMPLETED)]

    class FailingJob:  # a job that SLURM no longer lists, and that left no result
        job_id, state, _sub_jobs = "41_1", "GONE", []
        paths = SimpleNamespace(stderr="/sweep/.submitit/41_1/41_1_0_log.err")
        results = slurm.SlurmJob.results  # submitit's own

        def wait(self):
            pass

        def _get_outcome_and_result(self):
            raise UncompletedJobError("Job 41_1 (task: 0) has not produced any output (state: GONE)")

    launcher = slurm_launcher.SlurmLauncher
    assert launcher.__bases__[0].__name__ == submitit_launcher.SlurmLauncher.__name__
    submitted = lambda self, job_overrides, initial_job_idx: [FinishedJob(), FailingJob()]  # noqa: E731
    monkeypatch.setattr(launcher, "submit", submitted)  # stands for submitit and SLURM
    default = slurm.SlurmJob.watcher
    returns = launcher().launch([["seed=0"], ["seed=1"]], initial_job_idx=4)
    assert isinstance(slurm_launcher.SqueueJob.watcher, slurm_launcher.SqueueWatcher)
    assert issubclass(slurm_launcher.SqueueJob, slurm.SlurmJob)
    assert slurm.SlurmJob.watcher is default  # submitit's own class is left as it is
    assert returns[0].status == JobStatus.COMPLETED
    lost = returns[1]
    assert (lost.status, lost.overrides, lost.hydra_cfg.hydra.job.num) == (JobStatus.FAILED, ["seed=1"], 5)
    assert isinstance(lost._return_value, UncompletedJobError)
    assert str(lost._return_value) == ("SLURM job 41_1 ended without a result (no longer listed by squeue); "
                                       "its log: /sweep/.submitit/41_1/41_1_0_log.err")


class RecordingExecutor:
    """Stands for submitit's AutoExecutor: records what it is given; its jobs have a result."""

    made: list = []

    def __init__(self, **init):  # the cluster, the folder and the requeues
        self.folder = init["folder"]
        self.calls = [("init", init)]
        RecordingExecutor.made.append(self)

    def update_parameters(self, **parameters):
        self.calls.append(("parameters", parameters))

    def map_array(self, fn, *arguments):
        # each job's (overrides, folder key, number, id); not Hydra's state, which is new each time
        self.calls.append(("jobs", [tuple(a[:4]) for a in zip(*arguments)], fn))
        return [SimpleNamespace(job_id=f"41_{i}", num_tasks=1, results=lambda: [JobReturn()])
                for i in range(len(arguments[0]))]


def test_the_jobs_are_submitted_as_hydra_submitit_launcher_submits_them(monkeypatch, tmp_path):
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", RecordingExecutor)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    params = {k: v for k, v in OmegaConf.to_container(cfg.hydra.launcher, resolve=True).items() if k != "_target_"}
    jobs = [["seed=0", "hydra.verbose=true"], ["seed=1"]]
    calls = {}
    for launcher in (submitit_launcher.SlurmLauncher(**params), slurm_launcher.SlurmLauncher(**params)):
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        RecordingExecutor.made.clear()
        if isinstance(launcher, slurm_launcher.SlurmLauncher):
            followed = launcher.submit(jobs, initial_job_idx=3)
            assert [(type(job), job.job_id) for job in followed] == [(slurm_launcher.SqueueJob, "41_0"),
                                                                    (slurm_launcher.SqueueJob, "41_1")]
        else:
            launcher.launch(jobs, initial_job_idx=3)  # hydra-submitit-launcher's own
        (executor,) = RecordingExecutor.made
        assert executor.calls[-1][2] is launcher  # each job calls the launcher, as Hydra's does
        calls[type(launcher).__module__] = [call[:2] for call in executor.calls]
    ours, theirs = calls[slurm_launcher.__name__], calls[submitit_launcher.__name__]
    assert ours == theirs
    assert ours[0] == ("init", {"cluster": "slurm", "folder": f"{tmp_path}/sweep/.submitit/%j",
                                "slurm_max_num_timeout": 3})
    assert ours[1][1]["slurm_partition"] == "gpu" and ours[1][1]["gpus_per_node"] == 1
    assert ours[2] == ("jobs", [(jobs[0], "hydra.sweep.dir", 3, "job_id_for_3"),
                                (jobs[1], "hydra.sweep.dir", 4, "job_id_for_4")])
    assert (tmp_path / "sweep").is_dir()
