"""The study sweeper: a Hydra sweeper that sweeps as Hydra's basic one does (``key=a,b,c``
and ``hydra.sweeper.params`` form a product, launched in batches of at most
``max_batch_size`` jobs), plus what a study needs.

- ``grids``: a sweep can be a union of grids. Each grid is a product, like
  ``hydra.sweeper.params``, and the sweep runs every distinct job of all of them. A key given
  on the command line replaces that key in ``params`` and in every grid.
- ``part``: a part of the study, by its name (each conf/experiment/ config sets it): its jobs
  are the cells of the tables in experiments/tables.yaml that name it as their ``experiment``,
  over their seeds (vae_sweeps.tables.part_jobs), each job a grid of one point. The tables are
  the only place that lists a part's jobs, so the grid that runs is the one the report reads.
- Every job's config is composed and checked before any job starts. If any value is bad, the
  sweep trains nothing and says which jobs have which bad values.
- Jobs whose configs are the same (``model=mlp3`` in one grid, ``model.latent_dim=2`` in
  another) run once, and jobs whose configuration already has a FINISHED run in the store
  are skipped (``force=true`` runs them again), so a sweep stopped half-way is completed by
  launching it again.
- ``dry_run=true`` prints the jobs and runs none of them.
- Each job logs ``job k of N`` as it starts and, once a job of the sweep has finished, about
  how long the sweep has left: the mean time of its finished jobs, times the jobs left, over
  the jobs that run at once. (Jobs may run in other processes or on other nodes, so each
  finished job adds its time to ``job_times.txt`` in the sweep's folder.)
- At the end it says how many jobs trained, were skipped and failed, and lists the jobs that
  failed, and the command exits non-zero if any did.

The sweeper exits nothing itself: ``sweep`` returns the jobs' JobReturns, one list per batch,
or raises SweepFailed (vae_sweeps/errors.py; bad values: exit status 2, failed jobs: 1), which
the CLI (vae_sweeps/__main__.py) prints as ``error: <message>`` before it exits with that status.

Hydra loads plugins only from the ``hydra_plugins`` package, hence this module's place;
``conf/hydra/sweeper/study.yaml`` selects it. Hydra executes every plugin module at each start
(``--help`` included), and executes it again if it was imported already: so it imports only
vae_sweeps.errors at the top, and the classes that others catch are defined there.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from vae_sweeps import devices
from vae_sweeps.errors import ConfigError, SweepFailed

log = logging.getLogger(__name__)


def expand_jobs(params: dict, grids: Sequence[dict], arguments: Sequence[str],
                config_loader: Any = None) -> list[list[str]]:
    """The override lists of all jobs: for each grid (or one empty grid), the product of
    ``params``, the grid and ``arguments``. A later source replaces the same key in an
    earlier one, in the earlier one's place, so the command line wins and the order of
    ``params`` is the order of the loops (the first key varies slowest). ``config_loader``
    (Hydra's) lets the sweeps list a group's options with ``glob(...)``."""
    parser = OverridesParser.create(config_loader=config_loader)
    jobs: list[list[str]] = []
    for grid in grids or [{}]:
        strings = [f"{k}={v}" for k, v in {**params, **grid}.items()] + list(arguments)
        choices: dict[str, list[str]] = {}  # each key's overrides, one per swept value
        for override in parser.parse_overrides(strings):
            key = override.get_key_element()
            if not override.is_sweep_override():
                value = override.value()
                choices[key] = [key if override.is_delete() and value is None
                                else f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                raise ConfigError(f"{override.input_line} cannot be swept: give a list of values ({key}=a,b,c), "
                                  "range(...) or choice(...), not an interval.")
        jobs += [list(job) for job in itertools.product(*choices.values())]
    return jobs


def study_grids(part: str | None, grids: Sequence[dict], tracking: Any = None) -> list[dict]:
    """The sweep's grids: ``grids``, or for a ``part`` of the study one grid per job of that part
    (a grid of single values, so a key on the command line still replaces or sweeps it), in the
    order of vae_sweeps.tables.part_jobs. A part's tuned tables take their arms' winning trials
    from the store of ``tracking`` (the config's: uri, experiment), read only for such a part.
    Raises ConfigError for both, for a part that no table names, or for a tuned arm without a
    winner."""
    if not part:
        return [dict(grid) for grid in grids]
    from vae_sweeps import store, tables, trials

    if grids:
        raise ConfigError(f"hydra.sweeper.part={part} and hydra.sweeper.grids cannot be given together: "
                          "a part's grid is its tables' cells (experiments/tables.yaml).")
    tuned = None
    if tracking is not None:  # read at the first tuned cell only
        tuned = trials.tuned_from_store(store.resolve_uri(tracking["uri"]), tracking["experiment"])
    jobs = tables.part_jobs(part, tuned=tuned)
    if not jobs:
        raise ConfigError(f"hydra.sweeper.part={part}: no table of {tables.TABLES_FILE} (nor its more_seeds) "
                          f"has experiment: {part}.")
    return [tables.overrides(job) for job in jobs]


def plan_jobs(params: dict, grids: Sequence[dict], arguments: Sequence[str],
              compose: Callable[[Sequence[str]], DictConfig],
              config_loader: Any = None) -> list[tuple[list[str], str]]:
    """The distinct jobs of a sweep, in order, as (overrides, identity), each config
    composed and checked. Raises ConfigError naming every job with a bad value."""
    from vae_sweeps.config import validate
    from vae_sweeps.identity import run_key

    jobs, seen, bad = [], set(), []
    for overrides in expand_jobs(params, grids, arguments, config_loader):
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


def job_error(job: JobReturn) -> BaseException:
    """The error of a FAILED job, through JobReturn's public ``return_value``, which raises it
    (and first writes "Error executing job with overrides: ..." to stderr, which the list of
    failed jobs says better: not shown)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            job.return_value
        except BaseException as err:  # the job's error, to return
            return err
    raise ValueError(f"job {job.overrides} did not fail")


def jobs_at_once(launcher: DictConfig, batch: int) -> int:
    """How many jobs of a batch of ``batch`` the launcher runs at once: joblib's ``n_jobs``
    (-1: every core, -2: all but one...), submitit's ``array_parallelism``, else one."""
    try:
        at_once = int(launcher.get("n_jobs") or launcher.get("array_parallelism") or 1)
    except Exception:  # an interpolation that does not resolve here: only the estimate suffers
        at_once = 1
    return max(1, min(devices.joblib_jobs(at_once), batch))


def duration(seconds: float) -> str:
    """``seconds`` for a person: "40 s", "12 min", "3 h 05 min"."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def summary(returns: Sequence[JobReturn], skipped_before: int, sweep_dir: Path) -> str:
    """The sweep's last line: its jobs trained, skipped (``skipped_before`` up front, and the jobs
    that found their configuration taken when they started: their result has ``skipped``) and
    failed, and the folder of their logs, whose name is the runs' ``sweep_id`` tag."""
    failed = sum(job.status == JobStatus.FAILED for job in returns)
    skipped = skipped_before + sum(job.status == JobStatus.COMPLETED and isinstance(job.return_value, dict)
                                   and bool(job.return_value.get("skipped")) for job in returns)
    trained = len(returns) + skipped_before - failed - skipped
    return f"Sweep {sweep_dir.name}: {trained} trained, {skipped} skipped, {failed} failed (logs in {sweep_dir})"


class Progress:
    """The sweep's task function, wrapped: each job logs "job k of N: <its overrides>" as it
    starts, with the time the sweep has left once one of its jobs has finished, and adds its own
    time to the sweep's ``times`` file when it ends. It runs where the launcher runs the job
    (this process, a joblib worker, a SLURM node), so it is pickled with what ``plan`` gave it."""

    def __init__(self, task_function: TaskFunction):
        self.task_function = task_function
        self.names: list[str] = []  # each job's overrides as one string, by job number
        self.at_once = 1
        self.times: Path | None = None  # a line "<job number> <seconds>" per finished job

    def plan(self, names: Sequence[str], at_once: int, times: Path) -> None:
        self.names, self.at_once, self.times = list(names), at_once, times

    def finished(self) -> list[float]:
        """The times, in seconds, of the sweep's jobs that have finished."""
        try:
            lines = self.times.read_text().splitlines()
        except OSError:  # none has finished
            return []
        times = []
        for line in lines:
            with contextlib.suppress(ValueError, IndexError):  # a line being written
                times.append(float(line.split()[1]))
        return times

    def started(self, num: int) -> None:
        total = len(self.names)
        line = f"job {num + 1} of {total}: {self.names[num] or '(no overrides)'}"
        if times := self.finished():
            left = total - num  # this job and the ones after it
            line += f", about {duration(sum(times) / len(times) * left / min(self.at_once, left))} left"
        log.info(line)

    def ended(self, num: int, seconds: float) -> None:
        try:  # one short write in append mode: jobs that end at once add whole lines
            with open(self.times, "a") as times:
                times.write(f"{num} {seconds:.3f}\n")
        except OSError as err:  # only the estimate suffers
            log.debug("Job %d's time not recorded in %s: %s", num, self.times, err)

    def __call__(self, cfg: DictConfig) -> Any:
        num = HydraConfig.get().job.num if HydraConfig.initialized() else None
        if not isinstance(num, int) or not 0 <= num < len(self.names) or self.times is None:
            return self.task_function(cfg)  # not a job of a planned sweep
        self.started(num)
        tic = time.monotonic()
        try:
            return self.task_function(cfg)
        finally:
            self.ended(num, time.monotonic() - tic)


class StudySweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None,
                 grids: list | None = None, part: str | None = None, dry_run: bool = False):
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.grids = [dict(grid) for grid in grids or []]
        self.part = part
        self.dry_run = dry_run
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None
        self.progress: Progress | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.progress = Progress(task_function)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=self.progress, config=config)

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Plan, check and run the sweep: the JobReturns of its jobs, one list per batch ([] when
        none ran). Raises SweepFailed if a job has a bad value (none ran) or jobs failed."""
        from vae_sweeps import store

        assert self.config is not None and self.launcher is not None and self.progress is not None
        if self.config.get("tune"):  # a tuning experiment (conf/tune/): one study per arm
            from hydra_plugins.vae_sweeps_sweeper.tuning_sweep import TuningSweep

            return TuningSweep(self).sweep(arguments)
        try:
            grids = study_grids(self.part, self.grids, self.config.tracking)
            planned = plan_jobs(self.params, grids, arguments, self.compose, self.hydra_context.config_loader)
        except ConfigError as err:
            raise SweepFailed(str(err), status=2) from err
        common, names = describe([job for job, _ in planned])
        header = f" (every job: {' '.join(common)})" if common else ""
        done = set() if self.config.get("force") else store.finished_keys(
            store.resolve_uri(self.config.tracking.uri), self.config.tracking.experiment)
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

        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        jobs = [job for job, _ in todo]
        size = self.max_batch_size if self.max_batch_size and self.max_batch_size > 0 else len(jobs)
        self.progress.plan([name for _, name in todo], jobs_at_once(self.config.hydra.launcher, size),
                           sweep_dir / "job_times.txt")
        returns, failed = [], []
        for start in range(0, len(jobs), size):
            batch = self.launcher.launch(jobs[start:start + size], initial_job_idx=start)
            returns.append(batch)
            failed += [(start + i, job) for i, job in enumerate(batch) if job.status == JobStatus.FAILED]
        print(summary([job for batch in returns for job in batch], len(skipped), sweep_dir))
        if failed:
            lines = []
            for num, job in failed:
                err = job_error(job)
                lines.append(f"  #{num} {todo[num][1]}: {type(err).__name__}: {err}")
            raise SweepFailed(f"{len(failed)} of {len(jobs)} job(s) failed:\n" + "\n".join(lines),
                              status=1, returns=returns)
        return returns
