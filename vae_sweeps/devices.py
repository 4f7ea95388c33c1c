"""Parallel jobs on the GPUs of one machine: how many run at once, and which GPU each uses.

With ``hydra/launcher=joblib_gpu`` a machine with G GPUs runs G x ``jobs_per_gpu`` jobs at
once (joblib's ``n_jobs``, through the ``${jobs_at_once:...}`` resolver: resolvers.py), and
the job numbered n in the sweep (``hydra.job.num``) trains on GPU n mod G. Jobs start in
number order and each new one takes the place of one that ended, so a GPU holds about
``jobs_per_gpu`` jobs (one more or fewer for a while when jobs differ in length). Each job's
torch threads are the cores divided by the jobs at once, as for any joblib sweep. Without a
GPU, ``jobs_per_gpu`` changes nothing: one job at a time, on the CPU.

The functions taking ``gpus`` are pure, so they are tested with any count; ``gpu_count`` and
``job_number`` read the machine and Hydra.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

# The Trainer's accelerators that train on a CUDA GPU when there is one.
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def jobs_at_once(jobs_per_gpu: int, gpus: int) -> int:
    """joblib's n_jobs: ``jobs_per_gpu`` on each of ``gpus`` GPUs; 1 without a GPU."""
    if isinstance(jobs_per_gpu, bool) or not isinstance(jobs_per_gpu, int) or jobs_per_gpu < 1:
        raise ValueError(f"jobs_per_gpu={jobs_per_gpu!r} is not allowed: it must be a positive integer, "
                         "e.g. jobs_per_gpu=4")
    return gpus * jobs_per_gpu if gpus else 1


def job_gpu(job_number: int, gpus: int) -> int | None:
    """The GPU of the job numbered ``job_number`` in its sweep: round robin; None without a GPU."""
    return job_number % gpus if gpus else None


def pin_to_gpu(options: dict, job_number: int, gpus: int) -> dict:
    """The Trainer options with ``devices`` set to this job's GPU, for a job that would train
    on one GPU (the default ``devices: 1``); any other choice of devices, a CPU accelerator
    or a machine without a GPU leave the options as they are."""
    if not gpus or options.get("accelerator") not in GPU_ACCELERATORS or options.get("devices") != 1:
        return options
    return {**options, "devices": [job_gpu(job_number, gpus)]}


def gpu_count() -> int:
    """CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch  # here, not above: vae_sweeps.__main__ imports this module before Hydra runs

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def job_number() -> int:
    """``hydra.job.num`` of this job in its sweep; 0 for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 0
    return OmegaConf.select(HydraConfig.get(), "job.num", default=0, throw_on_missing=False) or 0


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def joblib_jobs(n_jobs: int) -> int:
    """joblib's ``n_jobs`` as a number of jobs at once: -1 is every usable core, -2 all but one..."""
    return usable_cores() + 1 + n_jobs if n_jobs < 0 else n_jobs
