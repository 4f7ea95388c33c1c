"""What a tuning study leaves in the store, and how it is read back: the one place that says it.

Each trial of a tuning study (vae_sweeps/tuning.py) is a normal run of the store, logged into
the experiment ``trials_experiment(<tracking.experiment>)`` so that the study's own tables never
meet them, with its params, its per-epoch ``train/*`` and ``val/*`` curves and these tags:

- ``tuning.experiment``: the tuning experiment config (``tune_table1``);
- ``tuning.study``: its Optuna study, one per arm (``tune_table1/mlp2-bce-z2-c1-mnist``: the arm's
  run name without its seed);
- ``tuning.trial``: the trial's number in that study;
- ``tuning.state``: COMPLETE (trained its epochs) or PRUNED (stopped early by the pruner; the run
  is FINISHED, not FAILED: a pruned trial is a result of the search);
- ``tuning.epochs``: the training epochs this trial spent (a resumed trial counts its epochs once);
- ``tuning.value``: the objective at its last epoch (the validation loss; the mean over the
  trial's seeds when it has several);
- ``tuning.keys``: the searched settings, comma-separated param keys (``optim.lr,data.batch_size``).

A study that has ended (its budget, or its cap of trials, spent and no trial of it left running or
queued) says so in a tag of that experiment, ``tuning.ended.<study>`` (``ended_tag``), which a
launch that goes on with the study removes first: a tuned table retrains the winners of ended
studies only, so that every arm had its whole budget.

A winner is the COMPLETE trial with the lowest value (the lower trial number on a tie); the
validation set decides, the test set is never seen by the search.
"""

from __future__ import annotations

import functools
import json
import math
import re

import pandas as pd
from mlflow import MlflowClient

from vae_sweeps import identity, store
from vae_sweeps.errors import ConfigError

PREFIX = "tuning."
EXPERIMENT, STUDY, TRIAL, STATE, EPOCHS, VALUE, KEYS = (
    f"{PREFIX}{name}" for name in ("experiment", "study", "trial", "state", "epochs", "value", "keys"))
TAGS = (EXPERIMENT, STUDY, TRIAL, STATE, EPOCHS, VALUE, KEYS)
COMPLETE, PRUNED = "COMPLETE", "PRUNED"


def trials_experiment(experiment: str) -> str:
    """The MLflow experiment that holds the tuning trials of the study logged into ``experiment``."""
    return f"{experiment}_tuning"


def ended_tag(study: str) -> str:
    """The tag of the trials' experiment that says the tuning study ``study`` has ended (its
    name with the characters that MLflow refuses in a key as "_"; the value names it exactly:
    ``ended_value``)."""
    return f"{PREFIX}ended." + re.sub(r"[^\w.\- :/]", "_", study)


def ended_value(study: str, epochs: int, budget: int) -> str:
    """The value of ``ended_tag(study)``: the study and what it spent, as JSON."""
    return json.dumps({"study": study, "epochs": epochs, "budget": budget})


def ended_studies(client: MlflowClient | None, experiment: str) -> set[str]:
    """The tuning studies that have ended (``ended_tag``) among the trials of the study logged into
    ``experiment`` (none without a store)."""
    found = client.get_experiment_by_name(trials_experiment(experiment)) if client else None
    prefix = ended_tag("")
    return {json.loads(value)["study"] for key, value in (found.tags if found else {}).items() if key.startswith(prefix)}


def load_trials(client: MlflowClient | None, experiment: str) -> pd.DataFrame:
    """One row per FINISHED trial run of the study ``experiment`` (its trials_experiment): the
    tuning tags above without their prefix (trial, epochs and value as numbers), ``run_id``,
    ``end_time`` and the run's params (identity.completed, numbers as strings). The columns of
    the tags, run_id and end_time are there when no trial is (a ``client`` of None: no store)."""
    rows = []
    runs = store.every_run(client, trials_experiment(experiment), "attributes.status = 'FINISHED'") if client else []
    for run in runs:
        tags = run.data.tags
        if STUDY not in tags:
            continue
        rows.append({**identity.completed(run.data.params),
                     **{name[len(PREFIX):]: tags.get(name) for name in TAGS},
                     "run_id": run.info.run_id, "end_time": run.info.end_time})
    trials = pd.DataFrame.from_records(rows).reindex(columns=list(dict.fromkeys(
        [*(name[len(PREFIX):] for name in TAGS), "run_id", "end_time", *(key for row in rows for key in row)])))
    for column in ("trial", "epochs", "value", "end_time"):
        trials[column] = pd.to_numeric(trials[column])
    return trials


def arm(trials: pd.DataFrame, tuning: str, settings: dict) -> pd.DataFrame:
    """The trials of the tuning experiment ``tuning`` whose params match ``settings`` (a table
    cell's; its seed, if any, left out: the trials train at seeds of their own), matched as
    tables.pick_group matches runs (identity.matches)."""
    wanted = {key: value for key, value in settings.items() if key != "seed"}
    own = trials[trials["experiment"] == tuning]
    mask = [identity.matches(row, wanted) for row in own.reindex(columns=list(wanted)).to_dict("records")]
    return own[pd.Series(mask, index=own.index, dtype=bool)]


def winner(trials: pd.DataFrame) -> dict | None:
    """The winning trial among ``trials`` (one study's, or one arm's) as a row dict, or None if
    none is COMPLETE."""
    complete = trials[trials["state"] == COMPLETE]
    if complete.empty:
        return None
    return complete.sort_values(["value", "trial"]).iloc[0].to_dict()


def searched(trial: dict) -> dict[str, str]:
    """A trial's searched settings {param key: value}, as its run logged them."""
    keys = trial.get("keys")
    return {key: trial[key] for key in keys.split(",") if key} if isinstance(keys, str) else {}


def tuned_by(trials: pd.DataFrame, ended: set[str] | None = None):
    """The ``tuned`` callable of tables.part_jobs and the report over ``trials`` (load_trials):
    (table, tuning experiment, cell settings) -> the searched settings of the winner of the
    cell's arm (``arm``, ``winner``), or None while the arm has no COMPLETE trial. Given the
    ``ended`` studies (ended_studies), an arm whose study has not ended raises ConfigError: its
    winner may still change, and its budget is not yet the others'."""
    def tuned(table: str, tuning: str, settings: dict) -> dict[str, str] | None:
        trials_of_arm = arm(trials, tuning, settings)
        best = winner(trials_of_arm)
        if best is not None and ended is not None and best["study"] not in ended:
            from vae_sweeps.tables import tuning_command

            raise ConfigError(
                f"{table}'s arm is tuned by the study {best['study']}, which has not ended in this store "
                f"({int(trials_of_arm['epochs'].sum())} epochs spent): its budget is not spent yet, or its last "
                f"launch was stopped, so its winner may still change. Run `{tuning_command({'tuned_from': tuning})}` "
                "to finish it first (the same command continues it).")
        return None if best is None else searched(best)

    return tuned


def tuned_from_store(uri: str, experiment: str):
    """``tuned_by`` over the trials of the study logged into ``experiment`` at the store ``uri``
    (store.resolve_uri'd) and its ended studies, read at the first call, so that a part without a
    tuned table opens no store; a SQLite store that does not exist has no trials (and is not
    created)."""
    @functools.cache
    def loaded():
        db = store.sqlite_path(uri)
        exists = db is None or db.exists()
        client = store.RetryingClient(MlflowClient(tracking_uri=uri)) if exists else None
        return tuned_by(load_trials(client, experiment), ended_studies(client, experiment))

    return lambda table, tuning, settings: loaded()(table, tuning, settings)


# ---------------------------------------------------------------------------- what the report shows


def by_study(trials: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(study, its trials) in the order the studies had their first trial ended, then by name: a
    tuning experiment's arms in the order its sweep ran them (Table 1's rows for tune_table1)."""
    return sorted(trials.groupby("study"), key=lambda item: (item[1]["end_time"].min(), item[0]))


def studies(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per study (in ``by_study``'s order): its trials (complete, pruned), the training
    epochs they spent in all, and its winner's value, trial number and searched settings ("key =
    value, ..."; NaN and "" where no trial is COMPLETE)."""
    rows = []
    for study, group in by_study(trials):
        best = winner(group) or {}
        rows.append({"study": study, "trials": len(group), "complete": int((group["state"] == COMPLETE).sum()),
                     "pruned": int((group["state"] == PRUNED).sum()), "epochs": int(group["epochs"].sum()),
                     "best_value": best.get("value", math.nan), "best_trial": best.get("trial", math.nan),
                     "best_settings": ", ".join(f"{key} = {value}" for key, value in searched(best).items())})
    return pd.DataFrame(rows, columns=["study", "trials", "complete", "pruned", "epochs", "best_value",
                                       "best_trial", "best_settings"])


def equal_budget_curve(trials: pd.DataFrame) -> list[tuple[int, float]]:
    """One study's curve of the best validation loss so far against the training epochs spent so
    far (Dodge et al. 2019, "Show your work"): the trials in the order they ended (their runs'
    end_time, then trial number), each adding its epochs; a COMPLETE trial adds the point
    (epochs so far, lowest COMPLETE value so far), a PRUNED one adds epochs but no point, except
    that the curve runs on to every epoch spent: the budget a reader judges it by."""
    points, spent, best = [], 0, math.inf
    for trial in trials.sort_values(["end_time", "trial"]).to_dict("records"):
        spent += int(trial["epochs"])
        if trial["state"] == COMPLETE:
            best = min(best, float(trial["value"]))
            points.append((spent, best))
    if points and points[-1][0] < spent:
        points.append((spent, best))
    return points


def trial_records(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials as the report's tuning_trials.csv lists them: study, trial, state, epochs,
    value, each searched setting (a column per key that some study searched), run_id."""
    keys = list(dict.fromkeys(key for listed in trials["keys"].dropna() for key in listed.split(",") if key))
    return (trials.sort_values(["study", "trial"])
            .reindex(columns=["study", "trial", "state", "epochs", "value", *keys, "run_id"]))
