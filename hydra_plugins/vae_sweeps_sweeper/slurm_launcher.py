"""The launcher of ``hydra/launcher=slurm`` and ``slurm_gpu``: hydra-submitit-launcher's
SlurmLauncher, with a wait for the jobs that always ends.

submitit waits for each job's result file, and asks ``sacct`` now and then whether the job
has ended. Without an accounting daemon, ``sacct`` cannot answer, so a job that ends without
writing its result (killed by SLURM or by hand, out of memory, its node lost) leaves the sweep
waiting forever. Here the jobs are followed with ``squeue`` instead, which every cluster has:
a job that squeue shows as ended, or no longer shows at all, has ended. If it left no result,
it counts as a FAILED job of the sweep, with the reason, and the sweep goes on waiting for the
others, then lists it among the failures.

Hydra loads plugins only from the ``hydra_plugins`` package, hence this module's place;
``conf/hydra/launcher/slurm.yaml`` selects it.
"""

from __future__ import annotations

from typing import Any, Sequence
from unittest import mock

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf
from submitit.core import core
from submitit.core.utils import UncompletedJobError
from submitit.slurm import slurm

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


def results_or_error(job: slurm.SlurmJob) -> list[Any]:
    """``job.results()``, or ``[the error]`` if the job ended without results: it was killed
    or lost, or it failed outside the task (the error then holds its traceback)."""
    try:
        return core.Job.results(job)
    except UncompletedJobError as err:
        return [err]


def failed_job(error: BaseException, overrides: Sequence[str], num: int) -> JobReturn:
    """The JobReturn of a job that ended without returning one."""
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error,
                     hydra_cfg=OmegaConf.create({"hydra": {"job": {"num": num}}}))


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        # every job of the sweep is a submitit SlurmJob: follow them with squeue, and take an
        # error for a result so that the other jobs' results are still waited for
        with mock.patch.multiple(slurm.SlurmJob, watcher=SqueueWatcher(delay_s=60), results=results_or_error):
            returns = super().launch(job_overrides, initial_job_idx)
        return [failed_job(r, overrides, initial_job_idx + i) if isinstance(r, BaseException) else r
                for i, (r, overrides) in enumerate(zip(returns, job_overrides))]
