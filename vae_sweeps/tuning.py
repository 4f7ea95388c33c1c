"""Equal-budget tuning: one Optuna study per arm, each with the same budget of training epochs.

``python -m vae_sweeps experiment=tune_table1`` (conf/experiment/tune_table1.yaml): the study
sweeper, seeing ``tune`` settings, tunes (hydra_plugins/vae_sweeps_sweeper/tuning_sweep.py): it
checks the search space and every arm's config, then launches ``tune.workers`` jobs per arm; each
job is a worker (``work``) that draws trials from its arm's study until the budget is spent. The
settings are ``tune``'s (conf/tune/asha.yaml); docs/tuning.md is the user's page.

The rules, in the order a worker meets them (``next_trial``, under the study's lock):

1. A RUNNING trial whose worker is gone (its process on this host, or its heartbeat from another
   host too old: runs.process_alive) is closed FAIL, and a copy with its params is queued: the
   next ``ask`` takes it, and its run resumes from the checkpoint that the stopped one left
   (the same config is the same run: runs.tracked_run). A trial stopped by Ctrl-C, SIGTERM or a
   scheduler is closed and queued the same way by its own worker before it exits.
2. The budget: the epochs every trial trained (user attr ``epochs``) plus what the RUNNING and
   queued ones may still train (``reserve``). A new trial is asked only while what is left allows
   a trial of at least ``min_epochs`` (with several seeds: ``max_epochs`` for each of them), and
   trains at most what is left: the arms spend the same budget, to the epoch.
3. TPE samples the space with a seed made of ``sampler_seed`` and the number of trials asked so far,
   so the same history gives the same next trial, also after a stop and a resume.

A worker that finds its study at its end (nothing left to ask, no trial running or queued)
marks it ended in the store (``mark_ended``, trials.ended_tag); a worker that starts removes the
mark first. A tuned table retrains the winners of ended studies only.

A study whose storage was lost (a journal left behind on another machine) is rebuilt from the
store: its trials are drawn again in the same order (rule 3), each finds its FINISHED run and is
told from its record, with the epochs it spent, so nothing trains twice and the budget holds.

A trial is a run (trials.py says what it records): it trains and validates, never tests; ASHA
(Optuna's SuccessiveHalvingPruner, rungs at min_epochs x reduction_factor^k) reads the
validation loss after each epoch and may stop it there: the run ends FINISHED with
``tuning.state`` PRUNED, without the end-of-run evaluation, figures or checkpoint upload (only
a COMPLETE trial's checkpoint is kept). A run that already FINISHED is told to the study from its
record; a diverged one (NaN) is a FAIL trial that spent its epochs.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from vae_sweeps import store, trials
from vae_sweeps.errors import ConfigError

log = logging.getLogger(__name__)

OBJECTIVE = "val/loss"
POLL_S = 2.0  # how often a worker with no budget left looks whether other workers' trials freed some
STORAGE_TRIES = 4  # how often a worker opens a new database storage whose tables another worker is making
SETTINGS = ("budget", "trials", "min_epochs", "max_epochs", "reduction_factor", "prune", "sampler_seed", "seed",
            "seeds", "workers", "storage", "space", "study")


# ---------------------------------------------------------------------------- the settings


SPEC_KEYS = ({"choices"}, {"low", "high"}, {"low", "high", "log"})


def space_entries(space, prefix: str = "") -> dict:
    """The searched settings of ``tune.space`` by config key: the space is nested as the config
    is (``optim: {lr: {low: ..., high: ...}}`` searches ``optim.lr``), so that the command line
    can change one entry (``tune.space.optim.lr.high=0.1``)."""
    space = OmegaConf.to_container(space) if isinstance(space, DictConfig) else space
    entries = {}
    for key, spec in (space or {}).items():
        if isinstance(spec, dict) and spec and not set(spec) & {"low", "high", "log", "choices"}:
            entries.update(space_entries(spec, f"{prefix}{key}."))
        else:
            entries[f"{prefix}{key}"] = spec
    return entries


def distributions(space) -> dict:
    """The search space ``tune.space`` as Optuna distributions by config key: {low, high[, log]}
    (floats, or ints where both ends are ints) or {choices: [...]}. ConfigError names a bad entry."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    entries = space_entries(space)
    if not entries:
        raise ConfigError("tune.space is empty: give at least one setting to search, e.g. "
                          "tune.space.optim.lr={low: 1.0e-4, high: 1.0e-2, log: true}.")
    found = {}
    for key, spec in entries.items():
        example = f"tune.space.{key}={{low: 1.0e-4, high: 1.0e-2, log: true}} or {{choices: [32, 64]}}"
        if not isinstance(spec, dict) or set(spec) not in SPEC_KEYS:
            raise ConfigError(f"tune.space.{key}={spec!r} is not allowed: give {{low, high}} (log: true for a "
                              f"log-uniform range) or {{choices: [...]}}, e.g. {example}.")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"tune.space.{key}.choices={spec['choices']!r} is not allowed: it must be a "
                                  f"non-empty list, e.g. {example}.")
            found[key] = CategoricalDistribution(spec["choices"])
            continue
        low, high, log_scale = spec["low"], spec["high"], bool(spec.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ConfigError(f"tune.space.{key}: low={low!r}, high={high!r} is an empty range: low must be a number "
                              f"below high, e.g. {example}.")
        if log_scale and low <= 0:
            raise ConfigError(f"tune.space.{key}: low={low!r} is not allowed with log: true: a log-uniform range "
                              f"must start above 0, e.g. {example}.")
        ints = isinstance(low, int) and isinstance(high, int)
        found[key] = (IntDistribution if ints else FloatDistribution)(low, high, log=log_scale)
    return found


def endpoints(space) -> list[dict]:
    """Settings that every value of the space lies between: each key's ends (or each of its
    choices) with the other keys at their first end. The sweeper checks the arms' configs at
    each of them, so a bad value is refused before anything trains."""
    from optuna.distributions import CategoricalDistribution

    ends = {key: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
            for key, d in distributions(space).items()}
    base = {key: values[0] for key, values in ends.items()}
    return [base] + [{**base, key: value} for key, values in ends.items() for value in values[1:]]


def smallest_trial(tune) -> int:
    """The fewest epochs a trial may be given: ASHA's first rung, or one seed's whole training
    when a trial has several seeds (those are pruned between seeds, not between epochs)."""
    return tune.min_epochs if tune.seeds == 1 else tune.max_epochs * tune.seeds


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for ``tune`` settings that are not allowed: every key is checked before
    any trial trains (the space's keys against the config, the budget against one trial)."""
    tune = cfg.tune
    unknown = sorted(set(tune) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"tune.{unknown[0]} is not a tuning setting: tune takes {', '.join(SETTINGS)} "
                          "(conf/tune/asha.yaml).")
    for key in ("budget", "min_epochs", "max_epochs", "reduction_factor", "seeds", "workers"):
        value = tune[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key == "reduction_factor" else 1):
            raise ConfigError(f"tune.{key}={value!r} is not allowed: it must be an integer >= "
                              f"{2 if key == 'reduction_factor' else 1} (conf/tune/asha.yaml).")
    if tune.trials is not None and (not isinstance(tune.trials, int) or isinstance(tune.trials, bool) or tune.trials < 1):
        raise ConfigError(f"tune.trials={tune.trials!r} is not allowed: it must be null (as many as the budget "
                          "allows) or an integer >= 1, e.g. tune.trials=20.")
    if not isinstance(tune.prune, bool):
        raise ConfigError(f"tune.prune={tune.prune!r} is not allowed: it must be true or false.")
    for key in ("sampler_seed", "seed"):
        if not isinstance(tune[key], int) or isinstance(tune[key], bool) or tune[key] < 0:
            raise ConfigError(f"tune.{key}={tune[key]!r} is not allowed: it must be an integer >= 0, e.g. tune.{key}=0.")
    if tune.min_epochs > tune.max_epochs:
        raise ConfigError(f"tune.min_epochs={tune.min_epochs} is above tune.max_epochs={tune.max_epochs}: a trial "
                          "trains between min_epochs and max_epochs, e.g. tune.min_epochs=3 tune.max_epochs=30.")
    if tune.budget < smallest_trial(tune):
        raise ConfigError(f"tune.budget={tune.budget} is not allowed: it is below one trial "
                          f"({smallest_trial(tune)} epochs: "
                          + ("tune.min_epochs" if tune.seeds == 1 else "tune.max_epochs x tune.seeds")
                          + f"), so no trial could train; e.g. tune.budget={20 * smallest_trial(tune)}.")
    for key in distributions(tune.space):
        if key.split(".")[0] in ("tune", "tracking", "paths", "hydra", "seed") or OmegaConf.select(
                cfg, key, default="<missing>") == "<missing>":
            raise ConfigError(f"tune.space.{key} is not allowed: {key} is not a setting of a run's config "
                              "(search keys such as optim.lr, data.batch_size, model.hidden; the seed is tune.seed).")
    storage_url(cfg)  # a server's store needs a storage of its own


def study_name(experiment: str, arm: str) -> str:
    """The Optuna study of one arm of a tuning experiment, ``tune_table1/mlp2-bce-z2-c1-mnist``
    (``arm``: the arm's run name without its seed)."""
    return f"{experiment}/{arm or 'default'}"


# ---------------------------------------------------------------------------- the study


def storage_url(cfg: DictConfig) -> str:
    """Where the studies live: ``tune.storage``, or a journal file beside a SQLite store
    (``<store folder>/tuning.journal``: safe for parallel workers, where SQLite is not)."""
    if cfg.tune.storage:
        return str(cfg.tune.storage)
    db = store.sqlite_path(store.resolve_uri(cfg.tracking.uri))
    if db is None:
        raise ConfigError("tune.storage=null is not allowed with a tracking server or a database store: name an "
                          "Optuna storage that every worker reaches, a database of its own on the team's PostgreSQL, "
                          "e.g. tune.storage=postgresql+psycopg://mlflow@db-host/optuna (the password in ~/.pgpass).")
    return f"journal:{db.parent / 'tuning.journal'}"


def open_storage(url: str, tries: int = STORAGE_TRIES):
    import optuna

    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url)
        except SQLAlchemyError:  # a new database: workers starting at once all create Optuna's tables
            if attempt + 1 == tries:
                raise
            time.sleep(1 + attempt)  # one of them made them; open them again


class _WithoutFailed:
    """A study as the pruner sees it: without its FAIL trials. A trial stopped by a fault is
    closed FAIL and queued again under a new number with its rung values (``replay``); ASHA
    must not count the stopped copy as a competitor."""

    def __init__(self, study):
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None):
        from optuna.trial import TrialState

        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.state != TrialState.FAIL]


def pruner(tune):
    """ASHA on the epochs (one seed per trial), or the Wilcoxon test across seeds (several)."""
    import optuna

    class WithoutFailed(optuna.pruners.BasePruner):
        def __init__(self, inner):
            self.inner = inner

        def prune(self, study, trial) -> bool:
            return self.inner.prune(_WithoutFailed(study), trial)

    if not tune.prune:
        return optuna.pruners.NopPruner()
    if tune.seeds > 1:
        return WithoutFailed(optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2))
    return WithoutFailed(optuna.pruners.SuccessiveHalvingPruner(min_resource=tune.min_epochs,
                                                                reduction_factor=tune.reduction_factor))


def open_study(cfg: DictConfig):
    import optuna

    return optuna.create_study(study_name=cfg.tune.study, storage=open_storage(storage_url(cfg)),
                               direction="minimize", pruner=pruner(cfg.tune), load_if_exists=True)


def sampler(tune, asked: int):
    """TPE seeded by ``sampler_seed`` and the number of trials asked before (``asked``)."""
    import optuna

    return optuna.samplers.TPESampler(seed=zlib.crc32(f"{tune.sampler_seed}/{asked}".encode()))


# ---------------------------------------------------------------------------- the budget


def epochs_spent(trial) -> int:
    return int(trial.user_attrs.get("epochs", 0))


def committed(study) -> int:
    """The epochs spent by every trial, plus those the RUNNING and queued ones may still train."""
    from optuna.trial import TrialState

    total = 0
    for t in study.get_trials(deepcopy=False):
        total += epochs_spent(t)
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            total += max(0, int(t.user_attrs.get("reserve", 0)) - epochs_spent(t))
    return total


def worker_alive(trial) -> bool:
    from vae_sweeps.runs import process_alive

    attrs = trial.user_attrs
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return process_alive(attrs.get("host"), str(attrs.get("pid", "")), attrs.get("heartbeat") or start,
                         attrs.get("longest_epoch_s", 0.0))


def close_stopped(study, trial_id: int, trial, why: str) -> bool:
    """Close the RUNNING ``trial`` FAIL and queue a copy that resumes it (its params, the epochs
    it may still train); False if another worker closed it first (no copy is queued twice)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        study._storage.set_trial_user_attr(trial_id, "stopped", why)
        if not study._storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    attrs = trial.user_attrs
    if "epochs_per_seed" not in attrs:  # stopped between its ask and its budget: it trained nothing
        return True
    study.enqueue_trial(trial.params, user_attrs={
        "epochs_per_seed": attrs["epochs_per_seed"], "reserve": max(0, int(attrs["reserve"]) - epochs_spent(trial)),
        "asked": attrs["asked"], "retry_of": trial.number})
    log.warning("Trial %d of %s was stopped (%s); queued again to resume", trial.number, study.study_name, why)
    return True


@contextmanager
def study_lock(study, cfg: DictConfig):
    """Hold the lock of ``study``'s budget and queue, where every worker sees it: a file beside
    the journal (on the filesystem that the workers share: a cluster's), or PostgreSQL's advisory
    lock in the tuning database, which workers on every host reach."""
    key = zlib.crc32(study.study_name.encode())
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna caches an RDBStorage
    engine = getattr(storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        return
    url = storage_url(cfg)
    folder = Path(url[len("journal:"):]).parent if url.startswith("journal:") else None
    with store.exclusive(folder / f"tuning-{key:08x}.lock") if folder else store.lock(
            store.resolve_uri(cfg.tracking.uri), f"tune-{key:08x}"):
        yield


def next_trial(study, cfg: DictConfig):
    """The next trial this worker trains (rules 1-3 of the module's docstring), or None when the
    budget is spent. Waits while other workers' trials hold what is left of it."""
    from optuna.trial import TrialState

    tune = cfg.tune
    said = None  # the budget left when this worker last said it waits: said again only when it changes
    while True:
        with study_lock(study, cfg):
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for t in running:
                if not worker_alive(t):
                    close_stopped(study, t._trial_id, t, f"its worker {t.user_attrs.get('pid')} on "
                                  f"{t.user_attrs.get('host')} is gone")
            queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            left = tune.budget - committed(study)
            asked = sum("retry_of" not in t.user_attrs for t in study.get_trials(deepcopy=False))
            if queued or (left >= smallest_trial(tune) and (tune.trials is None or asked < tune.trials)):
                fresh = not queued
                if fresh:
                    study.sampler = sampler(tune, asked)
                trial = study.ask(distributions(tune.space))
                if fresh:
                    per_seed = min(tune.max_epochs, left // tune.seeds)
                    trial.set_user_attr("epochs_per_seed", per_seed)
                    trial.set_user_attr("reserve", per_seed * tune.seeds)
                    trial.set_user_attr("asked", asked)
                beat(trial)
                return trial
            others = any(worker_alive(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if not others or (tune.trials is not None and asked >= tune.trials):
            return None
        if left != said:
            log.info("%s: %d epoch(s) of the budget left, held by other workers' trials; waiting", study.study_name,
                     left)
            said = left
        time.sleep(POLL_S)


def beat(trial, epochs: int | None = None, longest_epoch_s: float | None = None) -> None:
    """This worker's mark on its trial: host, process, heartbeat (and the epochs spent, and its
    longest epoch so far, which another host's worker allows twice between heartbeats)."""
    for name, value in {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                        **({"epochs": epochs} if epochs is not None else {}),
                        **({"longest_epoch_s": longest_epoch_s} if longest_epoch_s else {})}.items():
        trial.set_user_attr(name, value)


# ---------------------------------------------------------------------------- one trial


def trial_config(cfg: DictConfig, params: dict, seed: int, epochs: int) -> DictConfig:
    """The run config of a trial: the worker's, with the trial's searched values, its seed and
    epochs, logged into the trials' experiment (trials.trials_experiment)."""
    trial_cfg = copy.deepcopy(cfg)
    with open_dict(trial_cfg):
        for key, value in params.items():
            OmegaConf.update(trial_cfg, key, value, merge=False)
        trial_cfg.seed = seed
        trial_cfg.trainer.max_epochs = epochs
        trial_cfg.tracking.experiment = trials.trials_experiment(cfg.tracking.experiment)
        tags = dict(trial_cfg.get("tags") or {})
        tags.update({trials.EXPERIMENT: str(cfg.tags.get("part") or cfg.tune.study.split("/")[0]),
                     trials.STUDY: cfg.tune.study, trials.KEYS: ",".join(params)})
        trial_cfg.tags = tags
    return trial_cfg


def _pl_callback():
    import pytorch_lightning as pl

    class Pruning(pl.callbacks.Checkpoint):
        """After each epoch's checkpoint and log (a Checkpoint subclass placed after
        runs.EpochEnd): the epoch's validation loss to the trial, the epochs spent to the study,
        and a stop where ASHA says so (the epoch in hand is saved and logged)."""

        def __init__(self, trial, spent: int, prune: bool):
            self.trial, self.spent, self.prune = trial, spent, prune
            self.pruned_at: int | None = None
            self.last: float | None = None
            self.began, self.in_epochs = 0.0, 0.0  # seconds in training epochs (with their validation)
            self.longest = float(trial.user_attrs.get("longest_epoch_s", 0.0))

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.began = time.monotonic()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            took = time.monotonic() - self.began
            self.in_epochs += took
            self.longest = max(self.longest, took)
            self.spent += 1
            beat(self.trial, self.spent, self.longest)
            epoch = trainer.current_epoch + 1
            value = trainer.callback_metrics.get(OBJECTIVE)
            if value is None:
                return
            self.last = float(value)
            if self.prune and math.isfinite(self.last):
                self.trial.report(self.last, step=epoch)
                if epoch < trainer.max_epochs and self.trial.should_prune():  # a trial at its end is complete
                    self.pruned_at = epoch
                    trainer.should_stop = True

    return Pruning


def replay(trial, client, run_id: str) -> None:
    """Report the run's logged validation losses that the trial lacks: a resumed run's epochs
    from before the stop, which the queued copy of a stopped trial has not seen."""
    have = trial.study._storage.get_trial(trial._trial_id).intermediate_values
    for m in client.get_metric_history(run_id, OBJECTIVE):
        if m.step not in have and math.isfinite(m.value):
            trial.report(m.value, step=m.step)


def inherit_rungs(study, trial) -> None:
    """Give the copy ``trial`` of a stopped trial the ASHA rungs that one completed, as they were
    decided then: its replayed curve would be judged again against later trials, and at the step
    it resumes from instead of each rung's own."""
    stopped = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.user_attrs["retry_of"])
    for key, value in stopped.system_attrs.items():
        if key.startswith("completed_rung_"):  # optuna.pruners.SuccessiveHalvingPruner's record of a rung
            study._storage.set_trial_system_attr(trial._trial_id, key, value)


def fit(trial_cfg: DictConfig, trial, spent: int, prune: bool) -> dict:
    """Train and validate one seed of a trial as a tracked run; {state, value, epochs, run_id}."""
    import pytorch_lightning as pl
    import torch
    from mlflow import MlflowClient

    from vae_sweeps import options, runs
    from vae_sweeps.train import EpochLines, build_module, make_trainer, progress_bar, torch_threads

    torch.set_num_threads(torch_threads(trial_cfg))  # as a study job: `threads`, else this worker's share of the cores
    datamodule = options.build("data", trial_cfg.data, seed=trial_cfg.seed)
    with runs.tracked_run(trial_cfg, datamodule) as run:
        if run.skipped:  # FINISHED before (told from its record), or in another worker's hands (NaN: FAIL)
            client = store.RetryingClient(MlflowClient(tracking_uri=run.uri))
            tags = client.get_run(run.result["run_id"]).data.tags
            if prune and trials.STATE in tags:  # its curve to the trial, and its rungs to ASHA
                replay(trial, client, run.result["run_id"])
                trial.should_prune()
            # its epochs count once: in the stopped trial it is a copy of, else (a study rebuilt from
            # the store's records, its journal lost) here
            epochs = 0 if "retry_of" in trial.user_attrs else int(tags.get(trials.EPOCHS, 0))
            return {"state": tags.get(trials.STATE, trials.COMPLETE), "value": float(tags.get(trials.VALUE, "nan")),
                    "epochs": epochs, "run_id": run.result["run_id"], "skipped": run.result["skipped"]}
        if prune:
            replay(trial, run.client, run.id)
        pl.seed_everything(trial_cfg.seed, workers=True, verbose=False)
        module = build_module(trial_cfg, datamodule)
        pruning = _pl_callback()(trial, spent, prune)
        lines = [] if progress_bar(trial_cfg) else [EpochLines()]
        trainer = make_trainer(trial_cfg, [run.epoch_end, pruning, *lines], Path(trial_cfg.paths.output_dir))
        resumed = run.epoch_end.saved  # the epochs of the checkpoint it resumes (0 for a new run)
        # what is left of its reserve: all of its epochs, but for the copy of a stopped trial that
        # could not resume (its checkpoint gone, its run FAILED), which trains anew no more than that
        until = min(trial_cfg.trainer.max_epochs, resumed + int(trial.user_attrs["reserve"]) - pruning.spent)
        if resumed < trial_cfg.trainer.max_epochs and (until <= resumed or prune and trial.should_prune()):
            pruning.pruned_at = resumed  # stopped just after its rung, before the pruner said so; or no reserve left
        else:
            trainer.fit_loop.max_epochs = until
            trainer.fit(module, datamodule=datamodule.lightning(), ckpt_path=run.resume_from, weights_only=True)
        if pruning.last is None:  # nothing trained here: stopped after its last saved epoch
            history = run.client.get_metric_history(run.id, OBJECTIVE)
            pruning.last = max(history, key=lambda m: m.step).value if history else math.nan
        epochs = run.epoch_end.saved
        # a trial that the budget's end cut short of max_epochs is stopped early too: not a winner
        state = trials.PRUNED if pruning.pruned_at or epochs < trial_cfg.tune.max_epochs else trials.COMPLETE
        value = pruning.last if pruning.last is not None else math.nan
        for name, tag in {trials.STATE: state, trials.EPOCHS: epochs, trials.VALUE: value,
                          trials.TRIAL: trial.number}.items():
            run.client.set_tag(run.id, name, str(tag))
        if state == trials.COMPLETE:
            run.client.log_artifact(run.id, str(run.epoch_end.path), "checkpoints")
        run.epoch_end.path.unlink(missing_ok=True)  # uploaded, or of a pruned trial: no use here
        # the epochs before a resume count in the stopped trial this one is a copy of; else (a study
        # rebuilt from the store, its journal lost) here
        before = 0 if "retry_of" in trial.user_attrs else resumed
        return {"state": state, "value": value, "epochs": pruning.spent - spent + before, "run_id": run.id,
                "in_epochs": pruning.in_epochs}


def run_trial(cfg: DictConfig, study, trial) -> dict:
    """Train ``trial`` (each of its seeds) and tell the study how it ended."""
    from optuna.trial import TrialState

    from vae_sweeps.module import NonFiniteLoss

    tune = cfg.tune
    per_seed = int(trial.user_attrs["epochs_per_seed"])
    spent, values, run_ids, outcome = epochs_spent(study._storage.get_trial(trial._trial_id)), [], [], {}
    began, in_epochs = time.monotonic(), 0.0
    if "retry_of" in trial.user_attrs:
        inherit_rungs(study, trial)
    try:
        for k in range(tune.seeds):
            trial_cfg = trial_config(cfg, trial.params, tune.seed + k, per_seed)
            outcome = fit(trial_cfg, trial, spent, prune=tune.seeds == 1)
            spent += outcome["epochs"]
            in_epochs += outcome.get("in_epochs", 0.0)
            values.append(outcome["value"])
            run_ids.append(outcome["run_id"])
            if outcome["state"] == trials.PRUNED:
                break
            if tune.seeds > 1:  # Wilcoxon: the seeds are the steps
                trial.report(outcome["value"], step=k)
                if k + 1 < tune.seeds and trial.should_prune():
                    outcome = {**outcome, "state": trials.PRUNED}
                    break
    except NonFiniteLoss as err:  # a learning rate too large: a result of the search, not a fault
        # it spent the epochs the callback counted and the one that diverged (checked before the count)
        beat(trial, epochs_spent(study._storage.get_trial(trial._trial_id)) + 1)
        trial.set_user_attr("error", str(err)[:500])
        study.tell(trial.number, state=TrialState.FAIL)
        return {"state": "FAIL", "value": math.nan}
    except BaseException as err:  # a stop or a fault: the next launch resumes this trial
        from vae_sweeps.faults import attempt

        def close() -> None:  # under the budget's lock, as next_trial closes a dead worker's trials
            with study_lock(study, cfg):
                close_stopped(study, trial._trial_id, study._storage.get_trial(trial._trial_id),
                              f"{type(err).__name__}: {err}")

        attempt(close)
        raise
    beat(trial, spent)
    # what the trial cost beyond its epochs: its data, run, trainer and the store (docs/tuning.md)
    trial.set_user_attr("seconds", round(time.monotonic() - began, 3))
    trial.set_user_attr("epoch_seconds", round(in_epochs, 3))
    if outcome["state"] == trials.PRUNED:
        study.tell(trial.number, state=TrialState.PRUNED)
        return {**outcome, "value": values[-1]}
    value = sum(values) / len(values)
    if not math.isfinite(value):
        study.tell(trial.number, state=TrialState.FAIL)
        return {**outcome, "state": "FAIL", "value": value}
    study.tell(trial.number, value)
    if tune.seeds > 1:  # the run of each seed says the trial's objective, the mean
        from mlflow import MlflowClient

        client = store.RetryingClient(MlflowClient(tracking_uri=store.resolve_uri(cfg.tracking.uri)))
        for run_id in run_ids:
            client.set_tag(run_id, trials.VALUE, str(value))
    return {**outcome, "value": value}


def mark_ended(cfg: DictConfig, study: str, spent: int | None) -> None:
    """Say in the store that ``study`` has ended, having ``spent`` epochs, or remove the mark
    (None): the tag trials.ended_tag of the trials' experiment, which a tuned table requires."""
    client, experiment_id = store.open_store(store.resolve_uri(cfg.tracking.uri),
                                             trials.trials_experiment(cfg.tracking.experiment))
    tag = trials.ended_tag(study)
    if spent is not None:
        client.set_experiment_tag(experiment_id, tag, trials.ended_value(study, spent, cfg.tune.budget))
    elif tag in client.get_experiment(experiment_id).tags:
        client.delete_experiment_tag(experiment_id, tag)


def work(cfg: DictConfig) -> dict:
    """One worker of an arm's study (``tune.study``): trials until the budget is spent. Returns
    {study, trials (trained here), best (the study's best value so far), best_trial}."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial, below
    study = open_study(cfg)
    mark_ended(cfg, study.study_name, None)  # going on with it: not ended until nothing is left
    done = 0
    while (trial := next_trial(study, cfg)) is not None:
        log.info("%s: trial %d (%s), %d of %d epoch(s) committed", study.study_name, trial.number,
                 ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()),
                 committed(study), cfg.tune.budget)
        outcome = run_trial(cfg, study, trial)
        done += 1
        log.info("%s: trial %d %s, value %.3f after %s epoch(s)", study.study_name, trial.number, outcome["state"],
                 outcome.get("value", math.nan), outcome.get("epochs", "?"))
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)):
        mark_ended(cfg, study.study_name, committed(study))
    best = None
    try:
        best = study.best_trial
    except ValueError:  # no COMPLETE trial
        pass
    return {"study": study.study_name, "trials": done, "epochs": committed(study),
            **({"best": best.value, "best_trial": best.number, "best_params": best.params} if best else {})}
