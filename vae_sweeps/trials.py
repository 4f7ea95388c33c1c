"""What a tuning study leaves in the store, and how it is read back: the one place that says it.

Each trial of a tuning study (vae_sweeps/tuning.py) is a normal run of the store, logged into
the experiment ``trials_experiment(<tracking.experiment>)`` so that the study's own tables never
meet them, with its params, its per-epoch ``train/*`` and ``val/*`` curves and these tags:

- ``tuning.experiment``: the tuning experiment config (``tune_table1``);
- ``tuning.study``: its Optuna study, one per arm (``tune_table1/model=mlp2``);
- ``tuning.trial``: the trial's number in that study;
- ``tuning.state``: COMPLETE (trained its epochs) or PRUNED (stopped early by the pruner; the run
  is FINISHED, not FAILED: a pruned trial is a result of the search);
- ``tuning.epochs``: the training epochs this trial spent (a resumed trial counts its epochs once);
- ``tuning.value``: the objective at its last epoch (the validation loss; the mean over the
  trial's seeds when it has several);
- ``tuning.keys``: the searched settings, comma-separated param keys (``optim.lr,data.batch_size``).

A winner is the COMPLETE trial with the lowest value (the lower trial number on a tie); the
validation set decides, the test set is never seen by the search.
"""

from __future__ import annotations

import pandas as pd
from mlflow import MlflowClient

from vae_sweeps import identity, store

PREFIX = "tuning."
EXPERIMENT, STUDY, TRIAL, STATE, EPOCHS, VALUE, KEYS = (
    f"{PREFIX}{name}" for name in ("experiment", "study", "trial", "state", "epochs", "value", "keys"))
COMPLETE, PRUNED = "COMPLETE", "PRUNED"


def trials_experiment(experiment: str) -> str:
    """The MLflow experiment that holds the tuning trials of the study logged into ``experiment``."""
    return f"{experiment}_tuning"


def load_trials(client: MlflowClient, experiment: str) -> pd.DataFrame:
    """One row per FINISHED trial run of the study ``experiment`` (its trials_experiment): the
    tuning tags above without their prefix (trial, epochs and value as numbers), ``run_id``,
    ``end_time`` and the run's params (identity.completed, numbers as strings)."""
    rows = []
    for run in store.every_run(client, trials_experiment(experiment), "attributes.status = 'FINISHED'"):
        tags = run.data.tags
        if STUDY not in tags:
            continue
        rows.append({**identity.completed(run.data.params),
                     **{name[len(PREFIX):]: tags.get(name) for name in (EXPERIMENT, STUDY, TRIAL, STATE, EPOCHS,
                                                                        VALUE, KEYS)},
                     "run_id": run.info.run_id, "end_time": run.info.end_time})
    trials = pd.DataFrame.from_records(rows, columns=None if rows else ["study", "trial", "state", "epochs", "value"])
    for column in ("trial", "epochs", "value"):
        trials[column] = pd.to_numeric(trials[column])
    return trials


def winner(trials: pd.DataFrame) -> dict | None:
    """The winning trial among ``trials`` (one study's, or one arm's) as a row dict, or None if
    none is COMPLETE."""
    complete = trials[trials["state"] == COMPLETE]
    if complete.empty:
        return None
    return complete.sort_values(["value", "trial"]).iloc[0].to_dict()


def searched(trial: dict) -> dict[str, str]:
    """A trial's searched settings {param key: value}, as its run logged them."""
    return {key: trial[key] for key in (trial.get("keys") or "").split(",") if key}
