"""Each experiment config composes to the intended grid of jobs (nothing is trained), and the
study sweeper plans, checks and runs sweeps as documented."""

import re

import pytest
from conftest import CONF_DIR, all_runs, run_cli
from hydra import compose, initialize_config_dir
from hydra_plugins.vae_sweeps_sweeper.study_sweeper import expand_jobs, plan_jobs

from vae_sweeps.errors import ConfigError

MODELS = ["mlp2", "mlp3", "mlp4", "cnn"]
SEEDS = [0, 1, 2]


def point(model="mlp3", loss="bce", latent=2, c=1.0, data="mnist", seed=0):
    return (model, loss, latent, c, data, seed)


EXPECTED = {
    "table1": {point(model=m, seed=s) for m in MODELS for s in SEEDS},
    "table2": {point(loss=l, seed=s) for l in ("bce", "l1", "l2") for s in SEEDS},
    "table3": {point(latent=d, seed=s) for d in (1, 2, 5, 10, 20) for s in SEEDS},
    "c_sweep": {point(c=c, seed=s) for c in (0.25, 0.5, 1.0, 2.0, 4.0) for s in SEEDS},
    "fashion": {point(data="fashion_mnist", seed=s, **axis) for s in SEEDS for axis in
                [{"model": m} for m in MODELS] + [{"loss": l} for l in ("l1", "l2")]
                + [{"latent": d} for d in (1, 5, 10, 20)]},
}


def planned(*arguments: str, sweep: dict | None = None):
    """(the job override lists the study sweeper would run, each job's composed config, the
    master config) for the command-line ``arguments`` plus the swept values ``sweep``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose(config_name="config", overrides=list(arguments), return_hydra_config=True)
        params = {**(master.hydra.sweeper.params or {}), **(sweep or {})}

        def job_config(overrides):
            return compose(config_name="config", overrides=[*arguments, *overrides])

        grids = [dict(g) for g in master.hydra.sweeper.grids or []]
        jobs = [job for job, _ in plan_jobs(params, grids, arguments, job_config)]
        return jobs, [job_config(job) for job in jobs], master


@pytest.mark.parametrize("experiment", list(EXPECTED))
def test_experiment_composes_to_its_grid(experiment):
    jobs, configs, master = planned(f"experiment={experiment}")
    grid = [(c.model.name, c.loss.name, c.model.latent_dim, float(c.loss.c), c.data.name, c.seed) for c in configs]
    assert len(grid) == len(set(grid)), "a configuration is planned twice"
    assert set(grid) == EXPECTED[experiment]
    assert master.hydra.mode.name == "MULTIRUN"
    assert {c.tags.part for c in configs} == {experiment}
    assert {c.trainer.max_epochs for c in configs} == {30}  # the study's budget


def test_the_priors_experiment_composes_to_its_grid():
    jobs, configs, _ = planned("experiment=priors")
    grid = {(c.prior.name, c.prior.get("kl"), c.model.latent_dim, c.seed) for c in configs}
    variants = [("standard", None), ("none", None), ("gmm", "bound"), ("gmm", "tight"), ("gmm", "mc")]
    assert len(jobs) == 30
    assert grid == {(name, kl, d, s) for name, kl in variants for d in (2, 10) for s in SEEDS}
    assert {(c.model.name, c.loss.name, float(c.loss.c), c.data.name) for c in configs} == {("mlp3", "bce", 1.0, "mnist")}


def test_the_first_seed_of_every_configuration_runs_first():
    jobs, configs, _ = planned("experiment=table3")
    assert [c.seed for c in configs[:5]] == [0] * 5 and configs[5].seed == 1


def test_command_line_values_win_over_the_experiment():
    jobs, configs, _ = planned("experiment=fashion", "seed=0", "trainer.max_epochs=5")
    assert len(jobs) == 10
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
    assert [r.data.params["data.val_size"] for r in all_runs(tmp_path)] == ["16"]
