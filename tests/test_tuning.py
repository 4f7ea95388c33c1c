"""Equal-budget tuning (vae_sweeps/tuning.py, hydra_plugins/vae_sweeps_sweeper/tuning_sweep.py) on
tiny data and a tiny budget: the settings' errors, the budget spent to the epoch, pruning, a kill
and a second launch, and two workers sharing one study."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, all_runs, job_env, prepared_store, slowed_cli, tiny_overrides, tmp_store
from vae_sweeps import trials, tuning
from vae_sweeps.errors import ConfigError

# One arm (mlp2), 12 epochs of budget, trials of 1 to 4 epochs, ASHA halving at 1, 2 and 4 epochs.
TINY = ["experiment=tune_table1", "hydra.sweeper.part=null", "hydra.sweeper.params={model:mlp2}",
        "tune.budget=12", "tune.min_epochs=1", "tune.max_epochs=4", "tune.reduction_factor=2",
        "tune.space.data.batch_size.choices=[16,32]"]


def tune_cli(tmp_path, tiny_root, *args, slowed: float = 0.0):
    command = slowed_cli(slowed) if slowed else [sys.executable, "-m", "vae_sweeps"]
    return [*command, *tiny_overrides(tmp_path, tiny_root), *TINY, *args]


def run_tuning(tmp_path, tiny_root, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(tune_cli(tmp_path, tiny_root, *args), cwd=tmp_path, env=job_env(), capture_output=True,
                          text=True, timeout=timeout)


def the_study(tmp_path) -> optuna.Study:
    (summary,) = optuna.study.get_all_study_summaries(tuning.open_storage(f"journal:{tmp_path}/mlruns/tuning.journal"))
    return optuna.load_study(study_name=summary.study_name,
                             storage=tuning.open_storage(f"journal:{tmp_path}/mlruns/tuning.journal"))


def trial_runs(tmp_path) -> list:
    return [run for run in all_runs(tmp_path) if trials.STUDY in run.data.tags]


# ---------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("override, message", [
    ("+tune.space.optim.lrr={low: 0.1, high: 1.0}", "tune.space.optim.lrr is not allowed: optim.lrr is not a setting"),
    ("tune.space.optim.lr={low: 0.01, high: 0.001}", "tune.space.optim.lr: low=0.01, high=0.001 is an empty range"),
    ("tune.space.optim.lr={low: 0.0, high: 0.1, log: true}", "low=0.0 is not allowed with log: true"),
    ("tune.space.data.batch_size={choices: []}", "tune.space.data.batch_size.choices=[] is not allowed"),
    ("tune.budget=2", "tune.budget=2 is not allowed: it is below one trial (3 epochs: tune.min_epochs)"),
    ("tune.min_epochs=40", "tune.min_epochs=40 is above tune.max_epochs=30"),
    ("tune.reduction_factor=1", "tune.reduction_factor=1 is not allowed: it must be an integer >= 2"),
])
def test_bad_tuning_settings_are_refused_naming_the_value(make_cfg, override, message):
    cfg = make_cfg("experiment=tune_table1", override)
    with pytest.raises(ConfigError) as err:
        tuning.check(cfg)
    assert message in str(err.value)


def test_a_budget_below_one_trial_of_several_seeds_counts_every_seed(make_cfg):
    cfg = make_cfg("experiment=tune_table1", "tune.seeds=3", "tune.max_epochs=10", "tune.budget=25")
    with pytest.raises(ConfigError, match=r"tune.budget=25 .* below one trial \(30 epochs: tune.max_epochs x tune.seeds\)"):
        tuning.check(cfg)


def test_the_space_gives_optuna_distributions_and_the_ends_to_check(make_cfg):
    cfg = make_cfg("experiment=tune_table1")
    found = tuning.distributions(cfg.tune.space)
    lr, batch = found["optim.lr"], found["data.batch_size"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True) and batch.choices == (32, 64, 128, 256)
    assert tuning.endpoints(cfg.tune.space) == [
        {"optim.lr": 1e-4, "data.batch_size": 32}, {"optim.lr": 1e-2, "data.batch_size": 32},
        *({"optim.lr": 1e-4, "data.batch_size": b} for b in (64, 128, 256))]


def test_a_tuning_with_a_bad_value_trains_nothing(tmp_path, tiny_root):
    # a choice that the config check refuses: said, naming the arm, before any trial
    result = run_tuning(tmp_path, tiny_root, "tune.space.data.batch_size.choices=[16,0]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.batch_size=0 is not allowed" in result.stderr and "none was started" in result.stderr
    assert "model=mlp2" in result.stderr
    assert trial_runs(tmp_path) == []


def test_a_server_store_needs_a_tuning_storage_of_its_own(make_cfg):
    cfg = make_cfg("experiment=tune_table1", "tracking.uri=http://127.0.0.1:5999")
    with pytest.raises(ConfigError, match="tune.storage=null is not allowed with a tracking server"):
        tuning.storage_url(cfg)


def test_a_tuning_storage_that_cannot_be_opened_starts_no_worker(tmp_path, tiny_root):
    prepared_store(tmp_path)
    result = run_tuning(tmp_path, tiny_root, "tune.storage=postgresql+psycopg://nobody@127.0.0.1:9/optuna")
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("The tuning storage postgresql+psycopg://nobody@127.0.0.1:9/optuna (tune.storage) cannot be opened, so no "
            "worker was started: OperationalError") in result.stderr
    assert trial_runs(tmp_path) == []


# ---------------------------------------------------------------------------- a tiny tuning


def check_spent_and_pruned(folder, result) -> None:
    """An uninterrupted tiny tuning spent its budget to the epoch, pruned, and recorded each trial."""
    assert result.returncode == 0, result.stderr[-3000:]
    study = the_study(folder)
    done = study.get_trials()
    assert sum(int(t.user_attrs["epochs"]) for t in done) == 12  # the budget, exactly
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in done)
    assert any(t.state == TrialState.PRUNED for t in done) and any(t.state == TrialState.COMPLETE for t in done)
    # every trial is a FINISHED run of the trials' experiment, with what it spent and reached
    runs = {int(run.data.tags[trials.TRIAL]): run for run in trial_runs(folder)}
    assert sorted(runs) == [t.number for t in done]
    client = tmp_store(folder)
    for t in done:
        run = runs[t.number]
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags[trials.STATE] == t.state.name
        assert int(tags[trials.EPOCHS]) == int(t.user_attrs["epochs"])
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert epochs == list(range(1, int(tags[trials.EPOCHS]) + 1))
        assert not any(key.startswith("test/") for key in run.data.metrics)  # the search never sees the test set
        assert float(run.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"])
        assert run.data.params["seed"] == "100" and tags[trials.KEYS] == "optim.lr,data.batch_size"
        if t.state == TrialState.COMPLETE:  # trained its 4 epochs; its value is the last validation loss
            assert int(tags[trials.EPOCHS]) == 4 and float(tags[trials.VALUE]) == pytest.approx(t.value)
            assert epochs[-1] == 4 and t.value == pytest.approx(
                max(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step).value)
    winner = trials.winner(trials.load_trials(client, "vae_sweeps"))
    assert winner["trial"] == study.best_trial.number
    assert trials.ended_studies(client, "vae_sweeps") == {study.study_name}  # its winner may be retrained
    assert f"best {study.best_value:.3f} (trial {study.best_trial.number}" in result.stdout


def test_a_tuning_spends_its_budget_prunes_and_after_a_kill_ends_with_the_same_best_trial(
        tmp_path_factory, tmp_path, tiny_root):
    # uninterrupted
    folder = tmp_path_factory.mktemp("uninterrupted")
    prepared_store(folder)
    check_spent_and_pruned(folder, run_tuning(folder, tiny_root))
    # the same tuning, killed (SIGKILL) in a trial, then launched again
    prepared_store(tmp_path)
    client = tmp_store(tmp_path)
    job = subprocess.Popen(tune_cli(tmp_path, tiny_root, slowed=1.0), cwd=tmp_path, env=job_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # kill it in the last epoch of a trial that has passed the rungs (1 and 2 epochs), after at
    # least one trial ended: a second of training left, whatever the pruner says
    while time.time() < deadline:
        runs = trial_runs(tmp_path)
        running = [r for r in runs if r.info.status == "RUNNING"
                   and len(client.get_metric_history(r.info.run_id, "val/loss")) >= 3]
        if running and any(r.info.status == "FINISHED" for r in runs):
            break
        time.sleep(0.3)
    job.kill()
    job.wait(timeout=60)
    finished_before = {r.info.run_id for r in trial_runs(tmp_path) if r.info.status == "FINISHED"}
    assert finished_before, "the kill came before any trial ended"

    again = run_tuning(tmp_path, tiny_root)
    assert again.returncode == 0, again.stderr[-3000:]
    study = the_study(tmp_path)
    stopped = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert len(stopped) == 1 and "is gone" in stopped[0].user_attrs["stopped"]
    (retry,) = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == stopped[0].number]
    assert retry.params == stopped[0].params
    (resumed,) = [r for r in trial_runs(tmp_path) if r.data.tags[trials.TRIAL] == str(retry.number)]
    assert int(resumed.data.tags["resumed_from_epoch"]) >= 1  # from the killed trial's checkpoint
    runs = trial_runs(tmp_path)
    # no finished trial trained again: one run per configuration, the killed one resumed
    assert len({r.info.run_id for r in runs}) == len(runs) == len(study.get_trials()) - 1
    assert finished_before <= {r.info.run_id for r in runs}
    assert {r.data.tags["torch_threads"] for r in runs} == {"1"}  # the jobs' threads=1 (conftest.JOB_THREADS)
    assert sum(int(t.user_attrs["epochs"]) for t in study.get_trials()) == 12  # the budget, exactly
    uninterrupted = the_study(folder)
    assert study.best_trial.params == uninterrupted.best_trial.params
    assert study.best_value == pytest.approx(uninterrupted.best_value, rel=1e-4)


def test_sigterm_closes_the_trial_in_hand_and_queues_it_to_resume(tmp_path, tiny_root):
    prepared_store(tmp_path)
    client = tmp_store(tmp_path)
    # the study ended at a budget of 2 epochs; the launch below goes on with it to 12, unpruned, so
    # that its first trial is not stopped by ASHA after its first epoch, where the SIGTERM may land
    first = run_tuning(tmp_path, tiny_root, "tune.budget=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert trials.ended_studies(client, "vae_sweeps") == {the_study(tmp_path).study_name}
    job = subprocess.Popen(tune_cli(tmp_path, tiny_root, "tune.prune=false", slowed=1.0), cwd=tmp_path, env=job_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(
            r.info.status == "RUNNING" and client.get_metric_history(r.info.run_id, "val/loss") for r in trial_runs(tmp_path)):
        time.sleep(0.3)
    job.terminate()
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err[-2000:]
    study = the_study(tmp_path)
    (stopped,) = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert "Interrupted" in stopped.user_attrs["stopped"]
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == stopped.params and queued.user_attrs["retry_of"] == stopped.number
    (run,) = [r for r in trial_runs(tmp_path) if r.info.status != "FINISHED"]  # the trial in hand's
    assert run.info.status == "KILLED" and int(run.data.tags["resume_from_epoch"]) >= 1
    assert trials.ended_studies(client, "vae_sweeps") == set()  # gone on with, and stopped: not ended


def test_a_trial_whose_run_finished_before_the_study_heard_of_it_is_told_from_its_record(tmp_path, tiny_root):
    # the worker dies between its trial's run ending FINISHED and telling the study
    prepared_store(tmp_path)
    patch = ("import os, optuna; optuna.study.Study.tell = lambda self, *args, **kwargs: os._exit(9)")
    budget = "tune.budget=4"  # one trial (the first is never pruned: it has no rival at its rungs)
    died = subprocess.run([*slowed_cli(0.0, patch), *tiny_overrides(tmp_path, tiny_root), *TINY, budget],
                          cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    (run,) = trial_runs(tmp_path)
    assert run.info.status == "FINISHED" and the_study(tmp_path).get_trials()[0].state == TrialState.RUNNING

    again = run_tuning(tmp_path, tiny_root, budget)
    assert again.returncode == 0, again.stderr[-3000:]
    study = the_study(tmp_path)
    (retry,) = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == 0]
    assert retry.state.name == run.data.tags[trials.STATE] and retry.value == pytest.approx(float(run.data.tags[trials.VALUE]))
    assert retry.user_attrs["epochs"] == 0  # not trained again: the first trial's epochs count once
    assert [r.info.run_id for r in trial_runs(tmp_path) if r.data.params["optim.lr"] == run.data.params["optim.lr"]
            ] == [run.info.run_id]
    assert sum(int(t.user_attrs["epochs"]) for t in study.get_trials()) == 4


@pytest.mark.parametrize("checkpoint", ["kept", "lost"])
def test_a_trial_stopped_after_its_last_epoch_ends_with_that_epoch_and_its_budget(tmp_path, tiny_root, checkpoint):
    # the worker dies after its trial's last epoch was saved and logged, before the run's tags
    prepared_store(tmp_path)
    patch = ("import os, mlflow\n_set_tag = mlflow.MlflowClient.set_tag\n"
             "mlflow.MlflowClient.set_tag = lambda self, run_id, key, value, *a, **k: os._exit(9) "
             f"if key == '{trials.STATE}' else _set_tag(self, run_id, key, value, *a, **k)")
    budget = "tune.budget=4"  # one trial of 4 epochs
    died = subprocess.run([*slowed_cli(0.0, patch), *tiny_overrides(tmp_path, tiny_root), *TINY, budget],
                          cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr[-2000:]
    (run,) = trial_runs(tmp_path)
    client = tmp_store(tmp_path)
    last = max(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    assert run.info.status == "RUNNING" and last.step == 4
    if checkpoint == "lost":
        for saved in (tmp_path / "outputs").rglob("last.ckpt"):
            saved.unlink()

    again = run_tuning(tmp_path, tiny_root, budget)
    assert again.returncode == 0, again.stderr[-3000:]
    study = the_study(tmp_path)
    (retry,) = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == 0]
    assert retry.user_attrs["epochs"] == 0  # nothing trained again: the budget was spent
    assert sum(int(t.user_attrs["epochs"]) for t in study.get_trials()) == 4
    if checkpoint == "kept":  # resumed after its last epoch: complete, with that epoch's loss
        assert retry.state == TrialState.COMPLETE and retry.value == pytest.approx(last.value)
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
    else:  # its weights gone and no budget left to train them anew: stopped, not trained again
        assert retry.state == TrialState.PRUNED
        assert client.get_run(run.info.run_id).info.status == "FAILED"
        assert all(not client.get_metric_history(r.info.run_id, "val/loss")
                   for r in trial_runs(tmp_path) if r.info.run_id != run.info.run_id)


def test_a_trial_whose_loss_diverges_fails_and_spends_its_epochs(tmp_path, tiny_root):
    prepared_store(tmp_path)
    result = run_tuning(tmp_path, tiny_root, "tune.budget=3", "loss.c=1e38")  # inf at the first step
    assert result.returncode == 0, result.stderr[-3000:]
    done = the_study(tmp_path).get_trials()
    assert [t.state for t in done] == [TrialState.FAIL] * 3  # the epoch of each, then the budget is spent
    assert [t.user_attrs["epochs"] for t in done] == [1, 1, 1]
    assert all(t.user_attrs["error"].startswith("train/loss is inf at epoch 1") for t in done)


def test_a_study_whose_journal_was_lost_is_rebuilt_from_the_store_without_training(tmp_path, tiny_root):
    prepared_store(tmp_path)
    first = run_tuning(tmp_path, tiny_root, "tune.budget=6")
    assert first.returncode == 0, first.stderr[-3000:]
    before = the_study(tmp_path)
    runs = {r.info.run_id for r in trial_runs(tmp_path)}
    (tmp_path / "mlruns" / "tuning.journal").unlink()  # the store's records survive, the study does not

    again = run_tuning(tmp_path, tiny_root, "tune.budget=6")
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = the_study(tmp_path)
    assert {r.info.run_id for r in trial_runs(tmp_path)} == runs  # nothing trained again
    assert [(t.params, t.state, t.user_attrs["epochs"]) for t in rebuilt.get_trials()] == [
        (t.params, t.state, t.user_attrs["epochs"]) for t in before.get_trials()]
    assert rebuilt.best_trial.number == before.best_trial.number and rebuilt.best_value == before.best_value


def test_two_workers_share_one_study_without_duplicate_trials(tmp_path, tiny_root):
    prepared_store(tmp_path)
    result = run_tuning(tmp_path, tiny_root, "tune.workers=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        "threads=1", "tune.budget=16")
    assert result.returncode == 0, result.stderr[-3000:]
    study = the_study(tmp_path)
    done = study.get_trials()
    assert sum(int(t.user_attrs["epochs"]) for t in done) == 16
    assert len({t.user_attrs["pid"] for t in done}) == 2  # both workers trained trials
    runs = trial_runs(tmp_path)
    numbers = [int(r.data.tags[trials.TRIAL]) for r in runs]
    assert sorted(numbers) == sorted(set(numbers)) == [t.number for t in done]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_worker_that_waits_for_budget_says_so_once_per_amount_left(make_cfg, monkeypatch, caplog):
    """It polls every POLL_S while another worker's trial holds the budget: one line per amount
    left, not one per poll (while another's 30-epoch trial ran, a waiting worker logged a line every 2 s)."""
    cfg = make_cfg("experiment=tune_table1", "tune.budget=30", "tune.min_epochs=3")
    Path(tuning.storage_url(cfg)[len("journal:"):]).parent.mkdir(parents=True, exist_ok=True)  # the study's lock
    study = optuna.create_study()
    held = study.ask()  # another worker's trial (this process: alive), holding the whole budget
    held.set_user_attr("reserve", 30)
    tuning.beat(held)
    polls = []

    def poll(seconds):
        polls.append(seconds)
        if len(polls) == 3:  # it frees an epoch: still below a trial (3 epochs), so the worker waits on
            held.set_user_attr("reserve", 29)
        if len(polls) == 5:  # it ends, and what it left is below a trial: the worker has nothing to do
            held.set_user_attr("epochs", 29)
            study.tell(held, 150.0)

    monkeypatch.setattr(tuning.time, "sleep", poll)
    with caplog.at_level(logging.INFO, logger="vae_sweeps.tuning"):
        assert tuning.next_trial(study, cfg) is None
    waiting = [r.getMessage().split(": ", 1)[1] for r in caplog.records if "waiting" in r.getMessage()]
    assert len(polls) == 5 and waiting == [
        "0 epoch(s) of the budget left, held by other workers' trials; waiting",
        "1 epoch(s) of the budget left, held by other workers' trials; waiting"]


def test_a_trial_of_several_seeds_is_the_mean_of_its_seeds(tmp_path, tiny_root):
    prepared_store(tmp_path)
    result = run_tuning(tmp_path, tiny_root, "tune.seeds=2", "tune.max_epochs=2", "tune.budget=8")
    assert result.returncode == 0, result.stderr[-3000:]
    study = the_study(tmp_path)
    done = study.get_trials()
    assert len(done) == 2 and all(t.state == TrialState.COMPLETE for t in done)  # 2 seeds x 2 epochs each
    assert sum(int(t.user_attrs["epochs"]) for t in done) == 8
    for t in done:
        runs = [r for r in trial_runs(tmp_path) if r.data.tags[trials.TRIAL] == str(t.number)]
        assert sorted(r.data.params["seed"] for r in runs) == ["100", "101"]
        finals = [max(tmp_store(tmp_path).get_metric_history(r.info.run_id, "val/loss"), key=lambda m: m.step).value
                  for r in runs]
        assert t.value == pytest.approx(sum(finals) / 2)
        assert all(float(r.data.tags[trials.VALUE]) == pytest.approx(t.value) for r in runs)
        assert t.intermediate_values == {0: pytest.approx(finals[[r.data.params["seed"] for r in runs].index("100")]),
                                         1: pytest.approx(finals[[r.data.params["seed"] for r in runs].index("101")])}


def test_the_arms_of_tune_table1_are_the_rows_of_table1():
    from hydra_plugins.vae_sweeps_sweeper.tuning_sweep import arm_overrides

    arms = arm_overrides("table1", {}, [])
    assert [arm[0] for arm in arms] == ["model=mlp2", "model=mlp3", "model=mlp4", "model=cnn"]
    assert all("seed=0" not in arm and "model.latent_dim=2" in arm for arm in arms)


def test_values_on_the_command_line_pick_the_arms_of_the_part_each_once(tmp_path, tiny_root):
    result = subprocess.run([sys.executable, "-m", "vae_sweeps", "-m", *tiny_overrides(tmp_path, tiny_root),
                             "experiment=tune_table1", "model=mlp2,mlp3", "hydra.sweeper.dry_run=true"],
                            cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Dry run: 2 tuning studies" in result.stdout
    assert "tune_table1/mlp2-bce-z2-c1-mnist" in result.stdout and "tune_table1/mlp3-bce-z2-c1-mnist" in result.stdout


# ---------------------------------------------------------------------------- claims that every host sees


def test_of_two_runs_of_one_configuration_started_on_two_hosts_the_earlier_trains(make_cfg, tmp_path):
    """runs.claimed, as launches against a server use it: the other host's run is made here with
    its host and a fresh heartbeat, as that host's launch would have made it."""
    from vae_sweeps import identity, runs, store, tracking

    cfg = make_cfg()
    client, experiment_id = store.open_store(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "vae_sweeps")
    key, params = identity.run_key(cfg), identity.params(cfg)

    def started(host: str | None = None) -> str:
        run_id = tracking.start_run(client, experiment_id, tmp_path, "r", params, "", None)
        if host:
            client.set_tag(run_id, "host", host)
        return run_id

    ours = started()
    time.sleep(0.01)
    later = started("elsewhere")
    assert runs.claimed(client, experiment_id, key, ours, settle_s=0)  # ours started first
    assert not runs.claimed(client, experiment_id, key, later, settle_s=0)  # not our process's
    client.delete_run(ours)
    client.delete_run(later)
    earlier = started("elsewhere")
    client.update_run(earlier, "RUNNING")
    time.sleep(0.01)
    mine = started()
    client.set_tag(earlier, "heartbeat", f"{time.time():.0f}")
    assert not runs.claimed(client, experiment_id, key, mine, settle_s=0)  # another host's started before it
    client.set_tag(earlier, "heartbeat", "0")  # that host's run is long gone
    assert runs.claimed(client, experiment_id, key, mine, settle_s=0)


def bench_module():
    spec = importlib.util.spec_from_file_location("tuning_bench", ROOT / "benchmarks" / "tuning_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# four trials' validation losses after epochs 1-4; with a first rung of 1 epoch and a factor of 2
# the rungs are at 1, 2 and 4 epochs
CURVES = [[10, 9, 8, 7], [5, 4, 3, 2], [12, 11, 10, 9], [6, 5, 4, 3]]


def test_the_bench_replays_optunas_successive_halving_as_the_callback_asks_it():
    import optuna

    bench = bench_module()
    halving = optuna.pruners.SuccessiveHalvingPruner
    # trial 0 is the only one at each rung and goes on (4 epochs); trial 1 is the best at both (4);
    # trial 2 is not the best of 3 after 1 epoch (1 epoch); trial 3 is in the best 2 of 4 after 1
    # epoch, not the best of 3 after 2 (2 epochs): 11 epochs, trial 1 (loss 2) selected
    assert bench.replay_optuna(CURVES, halving(min_resource=1, reduction_factor=2)) == (11, 1)
    # no promotion before 2 trials reach a rung: trials 0 and 2 stop at 1 epoch, 1 and 3 at 2; none completes
    assert bench.replay_optuna(CURVES, halving(min_resource=1, reduction_factor=2, bootstrap_count=1)) == (6, None)


def test_the_bench_replays_asha_that_pauses_the_trials_it_does_not_promote():
    # trial 1 goes on to 2 epochs once trials 0 and 1 have 1 (the best 1 of 2), trial 3 once four
    # have 1 (the best 2 of 4), trial 1 to 4 epochs once two have 2 (the best 1 of 2); trials 0 and
    # 2 stay paused: 1 + 4 + 1 + 2 epochs, trial 1 selected
    assert bench_module().replay_paused(CURVES, min_epochs=1, factor=2) == (8, 1)
