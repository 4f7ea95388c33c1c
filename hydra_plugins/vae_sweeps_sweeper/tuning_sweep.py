"""The study sweeper's tuning: equal-budget tuning, one Optuna study per arm, for an experiment
with ``tune`` settings (conf/tune/; conf/experiment/tune_table1.yaml).

The arms are the rows of a part of the study (``part``: the cells of its tables in
experiments/tables.yaml, without their seeds) or a product of swept values (``params``, and the
command line's ``key=a,b``). Before anything trains, the ``tune`` settings are checked
(vae_sweeps.tuning.check) and every arm's config at each end of the search space
(tuning.endpoints), so that a bad key or value is refused in seconds, naming the arm. Then it
launches ``tune.workers`` jobs per arm through the launcher (in this process by default; joblib or
SLURM run them at once): each is a worker of its arm's study (tuning.work), until the budget is
spent. A second launch of the same command continues the same studies (tuning.py's rules).
"""

from __future__ import annotations

import logging
from typing import Sequence

from hydra.core.utils import JobReturn, JobStatus

from vae_sweeps.errors import ConfigError, SweepFailed

log = logging.getLogger(__name__)


def arm_overrides(part: str | None, params: dict, arguments: Sequence[str], config_loader=None) -> list[list[str]]:
    """Each arm's overrides: the part's cells without their seeds (distinct, in order), or one
    empty grid, times ``params`` and the command line's ``arguments``."""
    from hydra_plugins.vae_sweeps_sweeper.study_sweeper import expand_jobs, study_grids

    grids = []
    for grid in study_grids(part, []):
        grid = {key: value for key, value in grid.items() if key != "seed"}
        if grid not in grids:
            grids.append(grid)
    return expand_jobs(params, grids, arguments, config_loader)


class TuningSweep:
    """The tuning of one launch, with the study sweeper's config, launcher and settings (its
    ``params``, ``part`` and ``dry_run``; a plugin module holds no Plugin but the sweeper)."""

    def __init__(self, sweeper):
        self.sweeper, self.config, self.launcher = sweeper, sweeper.config, sweeper.launcher
        self.params, self.part, self.dry_run = sweeper.params, sweeper.part, sweeper.dry_run
        if sweeper.grids:
            raise SweepFailed("hydra.sweeper.grids cannot be tuned: the arms are a part's rows "
                              "(hydra.sweeper.part) or a product (hydra.sweeper.params).", status=2)

    def compose(self, overrides: Sequence[str]):
        return self.sweeper.compose(overrides)

    def plan(self, arguments: Sequence[str]) -> list[tuple[list[str], str]]:
        """(overrides, study name) of each arm, every arm's config checked at the space's ends."""
        from vae_sweeps import tuning
        from vae_sweeps.config import validate
        from vae_sweeps.identity import run_name

        arms, bad, names = [], [], set()
        for overrides in arm_overrides(self.part, self.params, arguments, self.sweeper.hydra_context.config_loader):
            cfg = self.compose(overrides)
            if not cfg.get("tune"):
                raise ConfigError(f"tune is not set for the arm {' '.join(overrides)}: a tuning's arms must all have "
                                  "tune settings.")
            name = tuning.study_name(str(cfg.tags.get("part") or "tune"), run_name(cfg).replace(f"-s{cfg.seed}", "", 1))
            if name in names:  # rows made alike by the command line's values (model=mlp2,mlp3 over table1's rows)
                continue
            names.add(name)
            tuning.check(cfg)
            try:
                for ends in tuning.endpoints(cfg.tune.space):
                    validate(self.compose([*overrides, *(f"{key}={value}" for key, value in ends.items())]))
            except ConfigError as err:
                bad.append(f"  {' '.join(overrides) or '(no overrides)'}: {err}")
                continue
            arms.append((overrides, name))
        if bad:
            raise ConfigError(f"{len(bad)} arm(s) of this tuning have bad values within tune.space, so none was "
                              "started:\n" + "\n".join(bad))
        return arms

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        try:
            arms = self.plan(arguments)
        except ConfigError as err:
            raise SweepFailed(str(err), status=2) from err
        tune = self.config.tune
        listing = "\n".join(f"  {name}: {' '.join(overrides)}" for overrides, name in arms)
        print(f"{'Dry run: ' if self.dry_run else ''}{len(arms)} tuning stud{'y' if len(arms) == 1 else 'ies'}, "
              f"{tune.budget} training epochs each, {tune.workers} worker(s) each:\n{listing}")
        if self.dry_run:
            return []
        from sqlalchemy.exc import SQLAlchemyError

        from vae_sweeps import tuning
        from vae_sweeps.errors import redact

        url = tuning.storage_url(self.config)
        try:
            tuning.open_storage(url, tries=1)  # its tables made here, not by workers starting at once
        except SQLAlchemyError as err:
            raise SweepFailed(f"The tuning storage {redact(url)} (tune.storage) cannot be opened, so no worker was "
                              f"started: {type(err).__name__}: {str(err).splitlines()[0]}", status=2) from err
        jobs = [[*overrides, f"tune.study='{name}'"] for overrides, name in arms for _ in range(tune.workers)]
        returns = self.launcher.launch(jobs, initial_job_idx=0)
        failed = [(job, ret) for job, ret in zip(jobs, returns) if ret.status == JobStatus.FAILED]
        for ret in returns:
            if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, dict):
                value = ret.return_value
                best = (f"best {value['best']:.3f} (trial {value['best_trial']}: {value['best_params']})"
                        if "best" in value else "no COMPLETE trial yet")
                print(f"{value['study']}: {value['trials']} trial(s) trained by this worker, "
                      f"{value['epochs']} of {tune.budget} epochs spent, {best}")
        if failed:
            from hydra_plugins.vae_sweeps_sweeper.study_sweeper import job_error

            lines = [f"  {' '.join(job)}: {type(job_error(ret)).__name__}: {job_error(ret)}" for job, ret in failed]
            raise SweepFailed(f"{len(failed)} of {len(jobs)} tuning worker(s) failed:\n" + "\n".join(lines),
                              status=1, returns=[returns])
        return [returns]
