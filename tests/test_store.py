"""The store as the MLflow UI and a moved copy see it: the experiment's kind, each run's
dataset and description, and artifact locations that follow a moved or copied store."""

import logging
import shutil
from pathlib import Path

import torch
from conftest import compose_tiny
from mlflow import MlflowClient

from vae_sweeps import report, store, tracking
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


def test_a_moved_store_still_serves_its_figures(tmp_path, tiny_root, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    run_id = train(compose_tiny(old, tiny_root, "trainer.max_epochs=1", "eval.iw_samples=2"))["run_id"]
    shutil.copytree(old / "mlruns", new / "mlruns")
    shutil.rmtree(old / "mlruns")

    caplog.set_level(logging.WARNING, logger="vae_sweeps.tracking")
    report.main(["--tracking-uri", uri(new), "--out", str(tmp_path / "reports")])  # the report repairs too
    assert "was moved or copied from" in caplog.text
    assert (tmp_path / "reports" / "figures" / "fig3_reconstructions.png").is_file()

    client, experiment_id = store.open_store(uri(new), "vae_sweeps")
    local = client.download_artifacts(run_id, "figures/reconstructions.png", str(tmp_path / "download"))
    kept = new / "mlruns" / "artifacts" / run_id / "artifacts" / "figures" / "reconstructions.png"
    assert Path(local).read_bytes() == kept.read_bytes()
    here = (new / "mlruns" / "artifacts").as_uri()
    assert client.get_experiment(experiment_id).artifact_location == here
    assert client.get_run(run_id).info.artifact_uri == f"{here}/{run_id}/artifacts"
    later = client.create_run(experiment_id).info.artifact_uri  # new runs log beside the database too
    assert later.startswith(here + "/") and not (old / "mlruns").exists()


def test_a_copy_is_repointed_and_its_original_left_alone(tmp_path, caplog):
    original, copy = tmp_path / "original", tmp_path / "copy"
    client, experiment_id = store.open_store(uri(original), "vae_sweeps")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, "from the original", "note.txt")
    shutil.copytree(original / "mlruns", copy / "mlruns")

    caplog.set_level(logging.WARNING, logger="vae_sweeps.tracking")
    store.open_store(uri(original), "vae_sweeps")
    assert "was moved" not in caplog.text  # a store in its own place is left as it is
    copied, _ = store.open_store(uri(copy), "vae_sweeps")
    assert "was moved or copied from" in caplog.text
    assert copied.get_run(run_id).info.artifact_uri.startswith((copy / "mlruns" / "artifacts").as_uri())
    assert client.get_run(run_id).info.artifact_uri.startswith((original / "mlruns" / "artifacts").as_uri())
    copied.log_text(run_id, "from the copy", "note.txt")  # writes into the copy only
    for folder, text in ((original, "from the original"), (copy, "from the copy")):
        assert (folder / "mlruns" / "artifacts" / run_id / "artifacts" / "note.txt").read_text() == text
