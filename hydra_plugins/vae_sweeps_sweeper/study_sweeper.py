"""The study sweeper: Hydra's basic sweeper, plus what a study needs.

- ``grids``: a sweep can be a union of grids. Each grid is a product, like
  ``hydra.sweeper.params``, and the sweep runs every distinct job of all of them. A key given
  on the command line replaces that key in ``params`` and in every grid.
- Every job's config is composed and checked before any job starts. If any value is bad, the
  sweep trains nothing and says which jobs have which bad values.
- Jobs whose configs are the same (``model=mlp3`` in one grid, ``model.latent_dim=2`` in
  another) run once, and jobs whose configuration already has a FINISHED run in the store
  are skipped (``force=true`` runs them again), so a sweep stopped half-way is completed by
  launching it again.
- ``dry_run=true`` prints the jobs and runs none of them.
- At the end it lists the jobs that failed and exits non-zero.

Hydra loads plugins only from the ``hydra_plugins`` package, hence this module's place;
``conf/hydra/sweeper/study.yaml`` selects it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def expand_jobs(params: dict, grids: Sequence[dict], arguments: Sequence[str]) -> list[list[str]]:
    """The override lists of all jobs: for each grid (or one empty grid), the product of
    ``params``, the grid and ``arguments``. A later source replaces the same key in an
    earlier one, so the command line wins."""
    parser = OverridesParser.create()
    jobs: list[list[str]] = []
    for grid in grids or [{}]:
        strings = [f"{k}={v}" for k, v in {**params, **grid}.items()] + list(arguments)
        jobs += BasicSweeper.split_arguments(parser.parse_overrides(strings), None)[0]
    return jobs


def plan_jobs(params: dict, grids: Sequence[dict], arguments: Sequence[str],
              compose: Callable[[Sequence[str]], DictConfig]) -> list[tuple[list[str], str]]:
    """The distinct jobs of a sweep, in order, as (overrides, identity), each config
    composed and checked. Raises ConfigError naming every job with a bad value."""
    from vae_sweeps.config import validate
    from vae_sweeps.errors import ConfigError
    from vae_sweeps.identity import run_key

    jobs, seen, bad = [], set(), []
    for overrides in expand_jobs(params, grids, arguments):
        cfg = compose(overrides)
        try:
            validate(cfg)
        except ConfigError as err:
            bad.append(f"  {' '.join(overrides)}: {err}")
            continue
        digest = run_key(cfg)
        if digest not in seen:
            seen.add(digest)
            jobs.append((overrides, digest))
    if bad:
        raise ConfigError(f"{len(bad)} job(s) of this sweep have bad values, so none was started:\n"
                          + "\n".join(bad))
    return jobs


def describe(jobs: Sequence[Sequence[str]]) -> tuple[list[str], list[str]]:
    """(the overrides every job shares, each job's other overrides as one string)."""
    common = [o for o in jobs[0] if all(o in job for job in jobs)] if len(jobs) > 1 else []
    return common, [" ".join(o for o in job if o not in common) for job in jobs]


class StudySweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None,
                 grids: list | None = None, dry_run: bool = False):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(grid) for grid in grids or []]
        self.dry_run = dry_run

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def sweep(self, arguments: list[str]) -> Any:
        from vae_sweeps import tracking
        from vae_sweeps.errors import ConfigError

        try:
            planned = plan_jobs(dict(self.params or {}), self.grids, arguments, self.compose)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        common, names = describe([job for job, _ in planned])
        header = f" (every job: {' '.join(common)})" if common else ""
        done = set() if self.config.get("force") else tracking.finished_keys(
            tracking.resolve_uri(self.config.tracking.uri), self.config.tracking.experiment)
        skipped = [name for name, (_, digest) in zip(names, planned) if digest in done]
        todo = [(job, name) for name, (job, digest) in zip(names, planned) if digest not in done]
        if skipped:
            print(f"Skipping {len(skipped)} of {len(planned)} job(s) that already have a FINISHED run "
                  "(force=true runs them again):\n" + "\n".join(f"  {name}" for name in skipped))
        listing = "\n".join(f"  #{i} {name}" for i, (_, name) in enumerate(todo))
        if self.dry_run or not todo:
            print(f"{'Dry run: ' if self.dry_run else ''}{len(todo)} job(s) to run{header}, none started"
                  + (f":\n{listing}" if todo else "."))
            return []
        log.info("Sweep of %d job(s)%s:\n%s", len(todo), header, listing)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        jobs = [job for job, _ in todo]
        size = self.max_batch_size or len(jobs)
        returns = []
        for start in range(0, len(jobs), size):
            returns.append(self.launcher.launch(jobs[start:start + size], initial_job_idx=start))

        failed = [r for batch in returns for r in batch if r.status == JobStatus.FAILED]
        if failed:
            lines = [f"  #{r.hydra_cfg.hydra.job.num} {todo[r.hydra_cfg.hydra.job.num][1]}: "
                     f"{type(r._return_value).__name__}: {r._return_value}" for r in failed]
            print(f"error: {len(failed)} of {len(jobs)} job(s) failed:\n" + "\n".join(lines), file=sys.stderr)
            sys.exit(1)
        return returns
