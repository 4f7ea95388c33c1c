"""Each experiment config composes to the jobs that fill its tables in
experiments/tables.yaml (nothing is trained), and the study sweeper plans, checks and runs
sweeps as documented."""

import functools
import math
import re

import pytest
import yaml
from conftest import CONF_DIR, ROOT, all_runs, run_cli
from hydra import compose, initialize_config_dir
from hydra_plugins.vae_sweeps_sweeper.study_sweeper import expand_jobs, plan_jobs

from vae_sweeps import identity
from vae_sweeps.errors import ConfigError

# Each table: the settings it fixes, its rows and the experiment that fills it. The tables
# define the study's parts; the tests below check conf/experiment/ against them.
SPEC = yaml.safe_load((ROOT / "experiments" / "tables.yaml").read_text())
TABLES, MORE = SPEC["tables"], SPEC["more_seeds"]
EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))
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

        grids = [dict(g) for g in master.hydra.sweeper.grids or []]
        jobs = [job for job, _ in plan_jobs(params, grids, arguments, job_config)]
        return jobs, [job_config(job) for job in jobs], master


@functools.cache
def planned_experiment(experiment: str):
    """planned(f"experiment={experiment}"), plus each job's MLflow params (as its run logs
    them); composed once per test session."""
    jobs, configs, master = planned(f"experiment={experiment}")
    return jobs, configs, master, [identity.params(cfg) for cfg in configs]


def cell(spec: dict, value) -> dict:
    """The settings of one table cell: the table's fixed settings and the row's value (a list
    of values where ``rows`` is a list of keys), as vae_sweeps/tables.py selects its runs."""
    keys, values = (spec["rows"], value) if isinstance(spec["rows"], list) else ([spec["rows"]], [value])
    return {**dict(zip(keys, values, strict=True)), **spec["fixed"]}


def cells(experiment: str) -> list[dict]:
    """The settings of every cell of the tables that ``experiment`` fills (and of the cells it
    gives more seeds)."""
    more = [cell(TABLES[table], value) for table, value in MORE["cells"]] if experiment == MORE["experiment"] else []
    return more + [cell(spec, value) for spec in TABLES.values() if spec["experiment"] == experiment
                   for value in spec["values"]]


def planned_seeds(table: str, value) -> list[int]:
    """The seeds that the experiments plan for one table cell."""
    _, _, _, runs = planned_experiment(TABLES[table]["experiment"])
    if [table, value] in MORE["cells"]:
        runs = runs + planned_experiment(MORE["experiment"])[3]
    return sorted(int(params["seed"]) for params in runs if matches(params, cell(TABLES[table], value)))


def matches(params: dict[str, str], settings: dict) -> bool:
    """Whether a run with these params counts for a cell with these settings, as the report
    matches them: None is a param the run lacks, and numbers compare as numbers."""
    for key, value in settings.items():
        if value is None or key not in params:
            if (value is None) != (key not in params):
                return False
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if not math.isclose(float(params[key]), float(value)):
                    return False
            except ValueError:
                return False
        elif params[key] != str(value):
            return False
    return True


@pytest.mark.parametrize("table", list(TABLES))
def test_every_cell_of_the_table_is_planned_by_its_experiment(table):
    """Each cell (the table's fixed settings and one row) gets exactly one job per seed: the
    table's seeds, and MORE's for its cells."""
    spec = TABLES[table]
    for value in spec["values"]:
        expected = spec["seeds"] + (MORE["seeds"] if [table, value] in MORE["cells"] else [])
        assert planned_seeds(table, value) == expected, f"{table}, row {value}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_experiment_plans_its_tables_cells_and_nothing_else(experiment):
    own = cells(experiment)
    assert own, f"no table in experiments/tables.yaml is filled by conf/experiment/{experiment}.yaml"
    jobs, configs, master, runs = planned_experiment(experiment)
    assert [" ".join(job) for job, params in zip(jobs, runs) if not any(matches(params, c) for c in own)] == []
    assert master.hydra.mode.name == "MULTIRUN"
    assert {c.tags.part for c in configs} == {experiment}
    assert {c.trainer.max_epochs for c in configs} == {30}  # the study's budget


def job_lines(experiment: str) -> list[str]:
    """The experiment's jobs as JOBS_FILE lists them."""
    _, configs, _, _ = planned_experiment(experiment)
    return [f"{identity.run_name(cfg)} {identity.run_key(cfg)}" for cfg in configs]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_experiment_plans_the_recorded_jobs_in_the_recorded_order(experiment):
    assert job_lines(experiment) == yaml.safe_load(JOBS_FILE.read_text())[experiment]


def test_the_first_seed_of_every_configuration_runs_first():
    jobs, configs, _ = planned("experiment=table3")
    assert [c.seed for c in configs[:5]] == [0] * 5 and configs[5].seed == 1


def test_command_line_values_win_over_the_experiment():
    jobs, configs, _ = planned("experiment=fashion", "seed=0", "trainer.max_epochs=5")
    assert len(jobs) == len({frozenset(c.items()) for c in cells("fashion")})  # one per distinct cell: 10
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


if __name__ == "__main__":  # JOBS_FILE anew, from today's experiments
    JOBS_FILE.write_text(JOBS_HEADER + "".join(f"\n{experiment}:\n" + "".join(f"  - {line}\n" for line in job_lines(experiment))
                                               for experiment in EXPERIMENTS))
