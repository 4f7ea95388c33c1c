"""The launcher of ``hydra/launcher=slurm`` and ``slurm_gpu``: hydra-submitit-launcher's
SlurmLauncher, with a wait for the jobs that always ends.

submitit waits for each job's result file, and asks ``sacct`` now and then whether the job
has ended. Without an accounting daemon, ``sacct`` cannot answer, so a job that ends without
writing its result (killed by SLURM or by hand, out of memory, its node lost) leaves the sweep
waiting forever. Here the jobs are followed with ``squeue`` instead, which every cluster has:
a job that squeue shows as ended, or no longer shows at all, has ended. If it left no result,
it counts as a FAILED job of the sweep, with its state and log file, and the sweep goes on
waiting for the others, then lists it among the failures. (A job whose requeues ran out did
return a result: its run is KILLED and resumable, see vae_sweeps/train.py.)

The jobs are submitted as hydra-submitit-launcher submits them (its executor, resources and
job arguments: ``SlurmLauncher.submit``), and followed as ``SqueueJob``s, submitit's SlurmJob
with the squeue watcher.

Hydra loads plugins only from the ``hydra_plugins`` package, hence this module's place;
``conf/hydra/launcher/slurm.yaml`` selects it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm import slurm

log = logging.getLogger(__name__)

# The states of a job that has ended for good. Any other state (pending, running, requeued,
# configuring, completing, suspended...) means that it may still run. GONE: squeue no longer
# lists the job (SLURM forgets ended jobs after MinJobAge, 300 s by default).
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
         "TIMEOUT", "GONE"}


class SqueueWatcher(slurm.SlurmInfoWatcher):
    """Follows this user's jobs with ``squeue`` instead of ``sacct``. Like submitit's, one call
    serves every job of the process, at 0, 2, 4, 8... seconds after a submission, then at
    least every ``delay_s``."""

    def _make_command(self) -> list[str] | None:
        if not self._registered - self._finished:
            return None
        return ["squeue", "--me", "--noheader", "--states=all", "--format=%i|%T"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        listed = super().read_info("JobID|State\n" + text)  # the array tasks, ranges expanded
        gone = {job: {"State": "GONE"} for job in self._registered - self._finished if job not in listed}
        return {**listed, **gone}

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode).upper() in ENDED


class SqueueJob(slurm.SlurmJob):
    """A SLURM job that submitit follows with squeue (SqueueWatcher) instead of sacct: submitit
    looks the watcher up on the job's class, and one watcher serves every job of the process."""

    watcher = SqueueWatcher(delay_s=60)


def results_or_error(job: slurm.SlurmJob) -> list[Any]:
    """``job.results()``, or ``[an error]`` if the job failed outside the task (the error
    holds its traceback) or ended without a result (killed, out of memory, its node lost...)."""
    try:
        return job.results()
    except FailedJobError as err:
        return [err]
    except UncompletedJobError:
        state = job.state
        state = "no longer listed by squeue" if state == "GONE" else state
        return [UncompletedJobError(f"SLURM job {job.job_id} ended without a result ({state}); "
                                    f"its log: {job.paths.stderr}")]


def failed_job(error: BaseException, overrides: Sequence[str], num: int) -> JobReturn:
    """The JobReturn of a job that ended without returning one."""
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error,
                     hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": num}}}))


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[SqueueJob]:
        """Submit the jobs, one job array, as hydra-submitit-launcher's ``launch`` does (1.2.0:
        the executor, its resources, the sweep folder and each job's arguments), and return
        them as SqueueJobs, without waiting. (submitit makes the jobs of an array SlurmJobs,
        whatever its executor's job class: each is the same job, followed by another watcher.)"""
        import submitit  # as hydra-submitit-launcher: Hydra's plugin discovery stays fast

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})

        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        arguments = []
        for num, overrides in enumerate(job_overrides, initial_job_idx):
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            arguments.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*arguments))
        return [SqueueJob(folder=executor.folder, job_id=job.job_id, tasks=range(job.num_tasks)) for job in jobs]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # an error taken for a result, so that the other jobs' results are still waited for
        returns = [results_or_error(job)[0] for job in self.submit(job_overrides, initial_job_idx)]
        return [failed_job(r, overrides, initial_job_idx + i) if isinstance(r, BaseException) else r
                for i, (r, overrides) in enumerate(zip(returns, job_overrides))]
