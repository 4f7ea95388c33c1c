"""The store as the MLflow UI and a moved copy see it: the experiment's kind, each run's
dataset and description, and artifact locations that follow a moved or copied store."""

import logging
import shutil
import subprocess
import sys

import torch
from conftest import compose_tiny, job_env
from mlflow import MlflowClient

from vae_sweeps import store, tracking
from vae_sweeps.data import ImageDataModule
from vae_sweeps.train import train


def uri(folder) -> str:
    return f"sqlite:///{folder}/mlruns/mlflow.db"


def fake_datamodule(name: str, train_size: int) -> ImageDataModule:
    """The data option ``name``'s DataModule, with splits of these sizes in place of its files."""
    datamodule = ImageDataModule(name, root="unused", download=False)
    labels = {"train": train_size, "val": 16, "test": 32}
    datamodule.splits = {k: (None, torch.zeros(n)) for k, n in labels.items()}
    return datamodule


def test_a_new_experiment_is_a_model_training_one(tmp_path):
    client, experiment_id = store.open_store(uri(tmp_path), "vae_sweeps")
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_older_experiment_gets_the_kind_and_a_chosen_kind_is_kept(tmp_path):
    plain = MlflowClient(tracking_uri=uri(tmp_path))
    older = plain.create_experiment("older")
    chosen = plain.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert "mlflow.experimentKind" not in plain.get_experiment(older).tags
    store.open_store(uri(tmp_path), "older")
    store.open_store(uri(tmp_path), "chosen")
    assert plain.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert plain.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_run_has_its_dataset_and_its_caption_as_description(tmp_path):
    client, experiment_id = store.open_store(uri(tmp_path), "vae_sweeps")
    runs = [client.create_run(experiment_id).info.run_id for _ in range(2)]
    tracking.describe_run(client, runs[0], fake_datamodule("fashion_mnist", 80), "mlp3 | bce | seed 0")
    tracking.describe_run(client, runs[0], fake_datamodule("fashion_mnist", 80), "mlp3 | bce | seed 0")  # resumed
    tracking.describe_run(client, runs[1], fake_datamodule("fashion_mnist", 70), "another split")
    first, second = (client.get_run(run_id) for run_id in runs)
    assert first.data.tags["mlflow.note.content"] == "mlp3 | bce | seed 0"
    [logged] = first.inputs.dataset_inputs  # logged once, though described twice
    dataset = logged.dataset
    assert dataset.name == "Fashion-MNIST" and dataset.source_type == "http" and len(dataset.digest) == 8
    assert dataset.profile == '{"train": 80, "val": 16, "test": 32}'
    assert second.inputs.dataset_inputs[0].dataset.digest != dataset.digest  # other split sizes


def test_a_moved_store_still_serves_its_figures(tmp_path, tiny_root, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    run_id = train(compose_tiny(old, tiny_root, "trainer.max_epochs=1", "eval.iw_samples=2"))["run_id"]
    shutil.copytree(old / "mlruns", new / "mlruns")
    shutil.rmtree(old / "mlruns")

    # the report repairs too; in a process of its own, as a user's: MLflow caches each run's artifact
    # place per process, and this one has written the run's artifacts at the old place
    done = subprocess.run([sys.executable, "-m", "vae_sweeps.report", "--tracking-uri", uri(new), "--out",
                           str(tmp_path / "reports")], env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was moved or copied from" in done.stderr
    assert (tmp_path / "reports" / "figures" / "fig3_reconstructions.png").is_file()

    client, experiment_id = store.open_store(uri(new), "vae_sweeps")
    here = (new / "mlruns" / "artifacts").as_uri()
    assert client.get_experiment(experiment_id).artifact_location == here
    assert client.get_run(run_id).info.artifact_uri == f"{here}/{run_id}/artifacts"
    later = client.create_run(experiment_id).info.artifact_uri  # new runs log beside the database too
    assert later.startswith(here + "/") and not (old / "mlruns").exists()


def test_a_copy_is_repointed_and_its_original_left_alone(tmp_path, caplog):
    """The copy's runs log into the copy: in the next process (one that wrote a run's artifacts
    keeps their place, as MLflow caches it per run id)."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    client, experiment_id = store.open_store(uri(original), "vae_sweeps")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, "from the original", "note.txt")
    shutil.copytree(original / "mlruns", copy / "mlruns")

    caplog.set_level(logging.WARNING, logger="vae_sweeps.store")
    store.open_store(uri(original), "vae_sweeps")
    assert "was moved" not in caplog.text  # a store in its own place is left as it is
    copied, _ = store.open_store(uri(copy), "vae_sweeps")
    assert "was moved or copied from" in caplog.text
    assert copied.get_run(run_id).info.artifact_uri.startswith((copy / "mlruns" / "artifacts").as_uri())
    assert client.get_run(run_id).info.artifact_uri.startswith((original / "mlruns" / "artifacts").as_uri())
    code = (f"from vae_sweeps.store import open_store; copied, _ = open_store({uri(copy)!r}, 'vae_sweeps'); "
            f"copied.log_text({run_id!r}, 'from the copy', 'note.txt')")  # writes into the copy only
    done = subprocess.run([sys.executable, "-c", code], env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for folder, text in ((original, "from the original"), (copy, "from the copy")):
        assert (folder / "mlruns" / "artifacts" / run_id / "artifacts" / "note.txt").read_text() == text
