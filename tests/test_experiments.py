"""Each experiment config runs the jobs that experiments/tables.yaml gives its part, in the
order recorded in tests/experiment_jobs.yaml (nothing is trained), and the study sweeper plans,
checks and runs sweeps as documented, a user's own ``params`` and ``grids`` included."""

import functools
import re
import tempfile

import pytest
import yaml
from conftest import CONF_DIR, ROOT, all_runs, fake_trial, run_cli
from hydra import compose, initialize_config_dir
from hydra_plugins.vae_sweeps_sweeper.study_sweeper import expand_jobs, plan_jobs, study_grids
from mlflow import MlflowClient

from vae_sweeps import identity, tables, trials
from vae_sweeps.errors import ConfigError

SPEC = yaml.safe_load(tables.TABLES_FILE.read_text())


def _tunes(path) -> bool:
    """Whether the experiment config is a tuning (it takes the tune settings: docs/tuning.md)."""
    return any("/tune" in str(entry) for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults", []))


# The study's parts; the tuning experiments (tune_*) tune a part's rows (tests/test_tuning.py).
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml") if not _tunes(path))
# Each experiment's jobs in the order its sweep runs them, as "<run name> <run_key>": the study
# skips the FINISHED runs and resumes the KILLED ones of a part by their run_key, and the order
# decides what a stopped study has done (every configuration's first seed first, where a part
# runs seed by seed).
JOBS_FILE = ROOT / "tests" / "experiment_jobs.yaml"
JOBS_HEADER = """\
# Each experiment's jobs (conf/experiment/), in the order its sweep runs them: the run name and the
# run's identity (vae_sweeps.identity.run_key), by which the study skips FINISHED runs and resumes
# KILLED ones. tests/test_experiments.py checks every experiment against this file, so that a change
# of a study part's jobs or of their order is seen and deliberate; after a deliberate change,
# `python tests/test_experiments.py` writes it anew.
"""


def planned(*arguments: str, sweep: dict | None = None):
    """(the job override lists the study sweeper would run, each job's composed config, the
    master config) for the command-line ``arguments`` plus the swept values ``sweep``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose(config_name="config", overrides=list(arguments), return_hydra_config=True)
        params = {**(master.hydra.sweeper.params or {}), **(sweep or {})}

        composed = {}  # plan_jobs composes every job already: compose each once

        def job_config(overrides):
            key = tuple(overrides)
            if key not in composed:
                composed[key] = compose(config_name="config", overrides=[*arguments, *overrides])
            return composed[key]

        grids = study_grids(master.hydra.sweeper.part, master.hydra.sweeper.grids or [], master.tracking)
        jobs = [job for job, _ in plan_jobs(params, grids, arguments, job_config)]
        return jobs, [job_config(job) for job in jobs], master


# The winning trials of the tuning store behind table1_tuned's recorded jobs: per arm, the
# (optim.lr, data.batch_size) of its COMPLETE trial with the lowest validation loss.
WINNERS = {"mlp2": ("0.003", "64"), "mlp3": ("0.0005", "256"), "mlp4": ("0.0007", "64"), "cnn": ("0.002", "32")}


def tuning_store(folder, arms=WINNERS, unended=()) -> str:
    """A store (its tracking URI) in ``folder`` whose tune_table1 trials make ``arms`` the winners:
    per arm, trial 0 at the default settings, trial 1 at the winner's (lower), trial 2 PRUNED at
    another (lower still: a pruned trial never wins); every arm's study has ended but those of the
    models ``unended``."""
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    for model, (lr, batch) in arms.items():
        study = f"tune_table1/model={model}"
        for trial, state, value, searched in ((0, "COMPLETE", 150.0, ("0.001", "128")),
                                              (1, "COMPLETE", 140.0, (lr, batch)), (2, "PRUNED", 130.0, ("0.01", "16"))):
            fake_trial(client, study, trial, state, value, 3 if state == "PRUNED" else 10, 10 ** 12 + trial,
                       {"optim.lr": searched[0], "data.batch_size": searched[1]}, **{"model.name": model})
        if model not in unended:
            experiment = client.get_experiment_by_name(trials.trials_experiment("vae_sweeps")).experiment_id
            client.set_experiment_tag(experiment, trials.ended_tag(study), trials.ended_value(study, 23, 23))
    return uri


@functools.cache
def tuned_store() -> str:
    """tuning_store, made once per test session (and by `python tests/test_experiments.py`)."""
    return tuning_store(tempfile.mkdtemp(prefix="tuning-store-"))


@functools.cache
def planned_experiment(experiment: str):
    """planned(f"experiment={experiment}"), composed once per test session; a tuned part's
    winners come from ``tuned_store`` (which MLFLOW_TRACKING_URI would replace)."""
    tuned = any(table["experiment"] == experiment and "tuned_from" in table for table in SPEC["tables"].values())
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        return planned(f"experiment={experiment}", *([f"tracking.uri={tuned_store()}"] if tuned else []))


def job_lines(experiment: str) -> list[str]:
    """The experiment's jobs as JOBS_FILE lists them."""
    _, configs, _ = planned_experiment(experiment)
    return [f"{identity.run_name(cfg)} {identity.run_key(cfg)}" for cfg in configs]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_experiment_plans_the_recorded_jobs_in_the_recorded_order(experiment):
    assert job_lines(experiment) == yaml.safe_load(JOBS_FILE.read_text())[experiment]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_is_a_multirun_of_its_part_at_the_study_budget(experiment):
    _, configs, master = planned_experiment(experiment)
    assert master.hydra.mode.name == "MULTIRUN" and master.hydra.sweeper.part == experiment
    assert {c.tags.part for c in configs} == {experiment}
    assert {c.trainer.max_epochs for c in configs} == {30}  # the study's budget


def test_every_part_that_tables_yaml_names_is_an_experiment():
    named = {table["experiment"] for table in SPEC["tables"].values()} | {SPEC["more_seeds"]["experiment"]}
    assert named == set(EXPERIMENTS)


@pytest.mark.parametrize("table", list(SPEC["tables"]))
def test_the_overrides_of_a_cell_give_a_run_with_the_cells_settings(table):
    """What the sweeper launches for a cell logs the params by which the report finds the cell:
    ``<axis>.name`` chose the axis's option, the other keys are values, a null is no param."""
    spec = SPEC["tables"][table]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for value in spec["values"]:
            settings = tables.cell_settings(spec, value)
            overrides = [f"{key}={v}" for key, v in tables.overrides(settings).items()]
            params = identity.params(compose(config_name="config", overrides=overrides))
            assert {key: params.get(key) for key in settings} == {
                key: None if v is None else str(v) for key, v in settings.items()}, overrides


def test_a_part_runs_its_tables_in_turn_each_seed_by_seed_then_its_more_seeds():
    spec = {"tables": {
        "a": {"fixed": {"data.name": "mnist"}, "rows": "model.name", "values": ["mlp2", "cnn"],
              "experiment": "p", "seeds": [0, 1]},
        "b": {"fixed": {"model.name": "mlp3"}, "rows": ["prior.name", "prior.kl"],
              "values": [["gmm", "mc"], ["none", None]], "experiment": "p", "seeds": [0]},
        "c": {"fixed": {}, "rows": "loss.name", "values": ["l1"], "experiment": "other", "seeds": [0]}},
        "more_seeds": {"experiment": "p", "seeds": [5, 6], "cells": [["b", ["none", None]], ["a", "cnn"]]}}
    jobs = [" ".join(f"{k}={v}" for k, v in tables.overrides(job).items()) for job in tables.part_jobs("p", spec)]
    assert jobs == ["seed=0 model=mlp2 data=mnist", "seed=0 model=cnn data=mnist",
                    "seed=1 model=mlp2 data=mnist", "seed=1 model=cnn data=mnist",
                    "seed=0 prior=gmm prior.kl=mc model=mlp3", "seed=0 prior=none model=mlp3",
                    "seed=5 prior=none model=mlp3", "seed=5 model=cnn data=mnist",
                    "seed=6 prior=none model=mlp3", "seed=6 model=cnn data=mnist"]
    assert [job["loss.name"] for job in tables.part_jobs("other", spec)] == ["l1"]


def test_a_tuned_part_runs_each_arm_at_its_winning_trials_settings():
    _, configs, _ = planned_experiment("table1_tuned")
    assert [(c.model.name, c.seed) for c in configs[:5]] == [
        ("mlp2", 0), ("mlp3", 0), ("mlp4", 0), ("cnn", 0), ("mlp2", 1)]
    assert len(configs) == 20
    for c in configs:  # the retraining seeds are the table's, not the trials' (100)
        assert (str(c.optim.lr), str(c.data.batch_size)) == WINNERS[c.model.name] and c.seed in range(5)


def test_a_tuned_part_names_the_arm_without_a_winner_and_the_tuning_command(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nowhere = tmp_path / "none" / "mlflow.db"
    with pytest.raises(ConfigError, match=r"table1_tuned's arm model.name=mlp2 has no COMPLETE trial of the tuning "
                                          r"experiment tune_table1 in this store yet.*`python -m vae_sweeps "
                                          r"experiment=tune_table1` first"):
        study_grids("table1_tuned", [], {"uri": f"sqlite:///{nowhere}", "experiment": "vae_sweeps"})
    assert not nowhere.parent.exists()  # looking made no store
    uri = tuning_store(tmp_path / "mlruns", {"mlp2": ("0.003", "64"), "mlp3": ("0.003", "64"), "mlp4": ("0.003", "64")})
    with pytest.raises(ConfigError, match="table1_tuned's arm model.name=cnn has no COMPLETE trial"):
        study_grids("table1_tuned", [], {"uri": uri, "experiment": "vae_sweeps"})
    with pytest.raises(ConfigError, match="table1_tuned's arm model.name=mlp2 has no COMPLETE trial"):
        study_grids("table1_tuned", [], {"uri": uri, "experiment": "another_study"})  # its trials are elsewhere
    assert study_grids("table1", [], {"uri": f"sqlite:///{nowhere}", "experiment": "vae_sweeps"})  # no store needed


def test_a_tuned_part_refuses_an_arm_whose_tuning_study_has_not_ended(tmp_path, monkeypatch):
    # a tuning stopped half-way: mlp3's winner so far had less of the budget than the others'
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tuning_store(tmp_path / "mlruns", unended=("mlp3",))
    with pytest.raises(ConfigError, match=r"table1_tuned's arm is tuned by the study tune_table1/model=mlp3, which "
                                          r"has not ended in this store \(23 epochs spent\).*Run `python -m "
                                          r"vae_sweeps experiment=tune_table1` to finish it first"):
        study_grids("table1_tuned", [], {"uri": uri, "experiment": "vae_sweeps"})
    assert len(study_grids("table1_tuned", [], {"uri": tuning_store(tmp_path / "ended"), "experiment": "vae_sweeps"})) == 20


def test_a_part_is_its_tables_not_also_grids_and_must_be_named_by_one():
    with pytest.raises(ConfigError, match="cannot be given together"):
        study_grids("table1", [{"model": "cnn"}])
    with pytest.raises(ConfigError, match="no table of .*tables.yaml .* has experiment: nope"):
        study_grids("nope", [])
    assert study_grids(None, [{"model": "mlp2,cnn"}]) == [{"model": "mlp2,cnn"}]


def test_a_users_own_experiment_sweeps_its_params_and_grids(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n"
        "    params: {seed: '0,1'}\n    grids: [{model: 'mlp2,cnn'}, {loss: l1}]\n")
    _, configs, _ = planned(f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine")
    assert [(c.seed, c.model.name, c.loss.name) for c in configs] == [
        (0, "mlp2", "bce"), (0, "cnn", "bce"), (1, "mlp2", "bce"), (1, "cnn", "bce"), (0, "mlp3", "l1"), (1, "mlp3", "l1")]


def test_the_first_seed_of_every_configuration_runs_first():
    _, configs, _ = planned_experiment("table3")
    assert [c.seed for c in configs[:5]] == [0] * 5 and configs[5].seed == 1


def test_command_line_values_win_over_the_experiment():
    jobs, configs, _ = planned("experiment=fashion", "seed=0", "trainer.max_epochs=5")
    cells = {frozenset((k, v) for k, v in job.items() if k != "seed") for job in tables.part_jobs("fashion")}
    assert len(jobs) == len(cells) == 10  # one per distinct cell of the three tables
    assert {(c.seed, c.trainer.max_epochs) for c in configs} == {(0, 5)}


def test_grids_are_a_union_and_params_a_product():
    jobs = expand_jobs({"seed": "0,1"}, [{"model": "mlp2,cnn"}, {"loss": "l1"}], ["data=fashion_mnist"])
    assert jobs == [
        ["seed=0", "model=mlp2", "data=fashion_mnist"], ["seed=0", "model=cnn", "data=fashion_mnist"],
        ["seed=1", "model=mlp2", "data=fashion_mnist"], ["seed=1", "model=cnn", "data=fashion_mnist"],
        ["seed=0", "loss=l1", "data=fashion_mnist"], ["seed=1", "loss=l1", "data=fashion_mnist"],
    ]


def test_a_sweep_with_a_bad_value_names_every_bad_job():
    with pytest.raises(ConfigError) as err:
        planned(sweep={"loss.c": "1,-1", "model.latent_dim": "0,2"})
    message = str(err.value)
    assert message.startswith("3 job(s) of this sweep have bad values, so none was started")
    assert "loss.c=-1 model.latent_dim=2: loss.c=-1 is not allowed" in message
    assert "loss.c=1 model.latent_dim=0: model.latent_dim=0 is not allowed" in message


@pytest.mark.fresh_store
def test_dry_run_from_the_command_line(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "experiment=fashion", "hydra.sweeper.dry_run=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Dry run: 30 job(s) to run (every job: " in done.stdout
    assert len(re.findall(r"^  #\d+ ", done.stdout, flags=re.M)) == 30
    assert all_runs(tmp_path) == [] and not (tmp_path / "mlruns").exists()


def test_cli_sweep_with_a_bad_value_trains_nothing(tmp_path, tiny_root):
    done = run_cli(tmp_path, tiny_root, "loss.c=1,-1", flags=("-m",))
    assert done.returncode == 2
    assert "error: 1 job(s) of this sweep have bad values, so none was started:" in done.stderr
    assert "Traceback" not in done.stderr
    assert all_runs(tmp_path) == []


def test_a_failing_job_does_not_stop_the_sweep_and_is_reported(tmp_path, tiny_root):
    # data.val_size=96 leaves no training images: the data module refuses it when the job runs
    done = run_cli(tmp_path, tiny_root, "data.val_size=96,16", "trainer.max_epochs=1", flags=("-m",))
    assert done.returncode == 1
    assert "error: 1 of 2 job(s) failed:" in done.stderr
    assert "  #0 data.val_size=96: DataError: data.val_size=96 is not allowed" in done.stderr
    # each job says where the sweep is as it starts, from the second on with the time left
    assert "job 1 of 2: data.val_size=96\n" in done.stdout
    assert re.search(r"job 2 of 2: data.val_size=16, about .+ left\n", done.stdout), done.stdout[-2000:]
    assert [r.data.params["data.val_size"] for r in all_runs(tmp_path)] == ["16"]


if __name__ == "__main__":  # JOBS_FILE anew, from today's experiments (tuned parts: from tuned_store)
    listed = [f"\n{experiment}:\n" + "".join(f"  - {line}\n" for line in job_lines(experiment))
              for experiment in EXPERIMENTS]
    JOBS_FILE.write_text(JOBS_HEADER + "".join(listed))
