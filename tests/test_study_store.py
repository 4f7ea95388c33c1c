"""The published study store: a consistent copy of the study's run records, and a working store
restored from it that continues the study (FINISHED skipped, a lost checkpoint trained anew)."""

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from conftest import ROOT, prepared_store, tmp_store
from mlflow import MlflowClient

from vae_sweeps import study_store
from vae_sweeps.identity import PROJECT
from vae_sweeps.train import train


def test_publish_copies_the_records_and_kills_the_live_runs_in_the_copy(tmp_path, make_cfg):
    finished = train(make_cfg("seed=0"))["run_id"]
    client = tmp_store(tmp_path)
    experiment_id = client.get_run(finished).info.experiment_id
    running = client.create_run(experiment_id).info.run_id  # a job still training when it is published
    published = tmp_path / "results" / "store" / "mlflow.db"
    assert study_store.publish(tmp_path / "mlruns" / "mlflow.db", published) == 3  # with the judge's run
    copy = MlflowClient(tracking_uri=f"sqlite:///{published}")
    assert copy.get_run(finished).info.status == "FINISHED"
    assert copy.get_run(finished).data.metrics == client.get_run(finished).data.metrics
    assert copy.get_run(running).info.status == "KILLED"  # no process trains the copy's runs
    assert client.get_run(running).info.status == "RUNNING"  # the working store is left as it was
    assert not list(published.parent.glob("*.partial"))


def test_a_restored_store_continues_the_study(tmp_path, make_cfg):
    """Published records alone (no artifacts): the FINISHED configuration is skipped, the one
    that was KILLED with a checkpoint now gone trains anew (the KILLED run stays), and the
    judge, whose weights are gone too, is trained again."""
    done = train(make_cfg("seed=0"))
    client = tmp_store(tmp_path)
    experiment_id = client.get_run(done["run_id"]).info.experiment_id
    killed = train(make_cfg("seed=1"))["run_id"]
    client.set_terminated(killed, "KILLED")  # as after Ctrl-C: resumable from its checkpoint
    client.set_tag(killed, "resume_from_epoch", "1")
    published = tmp_path / "results" / "mlflow.db"
    study_store.publish(tmp_path / "mlruns" / "mlflow.db", published)
    working = tmp_path / "elsewhere" / "mlflow.db"  # a new machine: only the published records are there
    assert study_store.restore(published, working)
    assert not study_store.restore(published, working)  # a working store is kept as it is
    restored = MlflowClient(tracking_uri=f"sqlite:///{working}")
    assert restored.get_experiment(experiment_id).artifact_location == (working.parent / "artifacts").as_uri()

    uri = f"tracking.uri=sqlite:///{working}"
    assert "skipped" in train(make_cfg("seed=0", uri))
    again = train(make_cfg("seed=1", uri))
    assert again["run_id"] != killed and "skipped" not in again
    assert restored.get_run(again["run_id"]).info.status == "FINISHED"
    old = restored.get_run(killed)
    assert old.info.status == "KILLED" and "resume_from_epoch" not in old.data.tags
    assert "checkpoint was gone" in old.data.tags["error"]
    assert [m.step for m in restored.get_metric_history(again["run_id"], "train/loss")] == [1, 2]


def test_restore_takes_paths_relative_to_the_working_folder(tmp_path, monkeypatch):
    """As `make study` calls it (STUDY_STORE=mlruns/study): a copy to where the records were
    published from keeps their artifact locations, a copy elsewhere points them beside it."""
    monkeypatch.chdir(tmp_path)
    client = prepared_store(tmp_path)
    experiment_id = client.get_experiment_by_name("vae_sweeps").experiment_id
    run_id = client.create_run(experiment_id).info.run_id
    artifacts = tmp_path / "mlruns" / "artifacts"
    published = tmp_path / "results" / "mlflow.db"
    study_store.publish(tmp_path / "mlruns" / "mlflow.db", published)

    (tmp_path / "mlruns" / "mlflow.db").unlink()  # the working store is lost, its artifacts are not
    assert study_store.restore(Path("results/mlflow.db"), Path("mlruns/mlflow.db"))
    same = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert same.get_experiment(experiment_id).artifact_location == artifacts.as_uri()

    # `make study` (no part to run) in a folder the records were not published from
    subprocess.run(["make", "-f", str(ROOT / "Makefile"), "study", f"PY={sys.executable}", "STUDY=",
                    "PROGRESS=none.db", "PUBLISHED=results/mlflow.db", "STUDY_STORE=elsewhere"],
                   check=True, capture_output=True, text=True)
    moved = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/elsewhere/mlflow.db")
    beside = tmp_path / "elsewhere" / "artifacts"
    assert moved.get_experiment(experiment_id).artifact_location == beside.as_uri()
    assert moved.get_run(run_id).info.artifact_uri.startswith(beside.as_uri())


@pytest.mark.parametrize("target, part", [("tune", "tune_table1"), ("tuned", "table1_tuned")])
def test_make_tune_and_tuned_train_into_the_studys_store_restored_as_make_studys(target, part):
    """So that `make results` publishes the tuning and the tuned table with the study."""
    planned = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(ROOT / "Makefile"), target,
                              "PY=py", "PROGRESS=none.db"],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    assert planned == ["py -m vae_sweeps.study_store restore results/store/mlflow.db mlruns/study/mlflow.db",
                       f"env -u MLFLOW_TRACKING_URI py -m vae_sweeps experiment={part} "
                       "tracking.uri=sqlite:///mlruns/study/mlflow.db "]


def test_a_restore_that_fails_leaves_no_working_store(tmp_path, monkeypatch):
    """Else the next `make study` would keep the half-restored store as it is."""
    prepared_store(tmp_path)
    published = tmp_path / "results" / "mlflow.db"
    study_store.publish(tmp_path / "mlruns" / "mlflow.db", published)

    def fail(db):
        raise OSError("disk full")

    monkeypatch.setattr(study_store.store, "follow_moved_artifacts", fail)
    working = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(OSError, match="disk full"):
        study_store.restore(published, working)
    assert not working.exists()


def test_the_committed_stores_have_the_installed_mlflows_schema():
    """The study's committed records open as they are with the MLflow that pyproject.toml pins:
    a newer MLflow would migrate them to its own schema when it opens them (rewriting a committed
    file), which the pinned one then refuses."""
    from mlflow.store.db.utils import _get_latest_schema_revision  # the schema this MLflow writes

    committed = (PROJECT / "results" / "store" / "mlflow.db", PROJECT / "results" / "in-progress" / "mlflow.db")
    stores = [path for path in committed if path.is_file()]
    if not stores:
        pytest.skip("results/ commits no store")
    for path in stores:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            (revision,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
        assert revision == _get_latest_schema_revision(), path
