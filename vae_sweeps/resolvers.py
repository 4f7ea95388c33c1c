"""The project's own resolvers in its config: ``${launch_id:}`` and ``${jobs_at_once:...}``.

``register`` is called once, before Hydra composes the config: by the command line
(vae_sweeps/__main__.py), and by whoever composes the config with Hydra's compose API and reads
what these resolve (the tests: tests/conftest.py). Hydra hands the registered resolvers on to
each job that it starts in another process (joblib's workers, submitit's jobs: its singleton
state), so they resolve there too. The project's own compose (identity.compose) needs none of
them: the config it returns has no ``hydra`` node, where they are used.
"""

from __future__ import annotations

import uuid

from omegaconf import OmegaConf

from vae_sweeps import devices


def launch_id() -> str:
    """A new id for each launch, in its output folder's name (hydra.run.dir, hydra.sweep.dir in
    conf/config.yaml), so that two launches in the same second never share a folder, nor write
    each other's checkpoint. Cached like Hydra's ``${now:...}``: one id for the whole config,
    which Hydra copies into the config of each job of a sweep, so every job has its launch's."""
    return uuid.uuid4().hex[:6]


def jobs_at_once(jobs_per_gpu: int) -> int:
    """joblib's n_jobs with hydra/launcher=joblib_gpu: ``jobs_per_gpu`` on each of this machine's
    GPUs (devices.py)."""
    return devices.jobs_at_once(jobs_per_gpu, devices.gpu_count())


def register() -> None:
    """Register the resolvers; a second call changes nothing."""
    for name, resolver, cached in (("launch_id", launch_id, True), ("jobs_at_once", jobs_at_once, False)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver, use_cache=cached)
