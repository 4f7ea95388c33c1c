"""The judge (a classifier per dataset, stored once) and the back-fill of a run's evaluation."""

import math

import pytest
import torch
from conftest import N_TEST, all_runs, compose_tiny, fake_digits, tmp_store
from torch import nn

from vae_sweeps import backfill, evaluation, identity, judge, metrics
from vae_sweeps.data import MNIST, to_tensors
from vae_sweeps.train import train


@pytest.fixture(scope="module")
def digits():
    """Tiny fake digits (a bright square whose place says the class) and a judge trained on them."""
    x, y = to_tensors(*fake_digits(200, 0))
    return x, y, judge.fit(x, y, epochs=15)


def test_the_judge_learns_the_classes(digits):
    x, y, the_judge = digits
    test_x, test_y = to_tensors(*fake_digits(100, 1))
    assert judge.accuracy(the_judge, test_x, test_y) == 1.0
    assert judge.fit(x, y, epochs=1).state_dict()["net.0.weight"].equal(judge.fit(x, y, epochs=1).state_dict()["net.0.weight"])


class Stub(nn.Module):
    """A 'VAE' with latent dim 1 that reconstructs every image as one fixed image and decodes
    z < 0 as class ``low`` and z >= 0 as class ``high`` (images from the judge's data)."""

    def __init__(self, examples: dict[int, torch.Tensor], low: int, high: int, recon_as: int):
        super().__init__()
        self.latent_dim, self.examples, self.low, self.high, self.recon_as = 1, examples, low, high, recon_as
        self.anchor = nn.Parameter(torch.zeros(1))

    def decode_images(self, z):
        return torch.stack([self.examples[self.low if v < 0 else self.high] for v in z[:, 0]])

    def decode(self, z):  # logits of those images
        return torch.logit(self.decode_images(z).clamp(1e-4, 1 - 1e-4))

    def reconstruct(self, x):
        return self.examples[self.recon_as].expand(len(x), -1, -1, -1)

    def sample(self, n):
        return self.decode_images(torch.randn(n, 1))


def test_judged_metrics_count_what_the_decoder_draws_and_gets_right(digits):
    x, y, the_judge = digits
    examples = {k: x[y == k][0] for k in range(10)}
    stub = Stub(examples, low=4, high=7, recon_as=3)
    test = (x[:50], y[:50])  # 5 images of each class
    metrics, drawn = judge.judge_metrics(the_judge, stub, test, seed=0)
    assert drawn == "4 7" and metrics["test/classes_drawn"] == 2
    assert metrics["test/judged_accuracy"] == pytest.approx(0.1)  # every reconstruction is a 3
    assert metrics["test/judged_accuracy_3"] == 1.0 and metrics["test/judged_accuracy_4"] == 0.0
    # prior samples: z ~ N(0, 1) split about evenly between the two classes: entropy near ln 2
    assert metrics["test/sample_class_entropy"] == pytest.approx(math.log(2), abs=0.01)
    # of the 101 sweep points and 2000 samples, about half are confident 4s and half 7s
    shares = [metrics[f"test/drawn_share_{k}"] for k in range(10)]
    assert shares[4] + shares[7] == pytest.approx(1.0)
    assert shares[4] == pytest.approx(0.5, abs=0.03) and sum(shares) - shares[4] - shares[7] == 0.0
    assert judge.judge_metrics(the_judge, stub, test, seed=0) == (metrics, drawn)  # its own random stream


def test_the_judge_is_stored_once_and_reused(tmp_path, digits, monkeypatch):
    x, y, _ = digits
    splits = {"train": (x[:150], y[:150]), "val": (x[150:], y[150:]), "test": to_tensors(*fake_digits(50, 1))}
    client, experiment = evaluation.judges_experiment(f"sqlite:///{tmp_path}/mlflow.db", "study")
    calls = []
    original = judge.fit
    monkeypatch.setattr(judge, "fit", lambda *a, **k: calls.append(1) or original(*a, **k))
    first, first_run = judge.load_or_train(client, experiment, "mnist", splits, epochs=3)
    again, again_run = judge.load_or_train(client, experiment, "mnist", splits, epochs=3)
    assert calls == [1]  # trained once, then loaded
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    (run,) = client.search_runs([experiment])
    assert run.info.run_name == "judge-mnist" and first_run == again_run == run.info.run_id
    assert run.data.metrics["test/accuracy"] == pytest.approx(judge.accuracy(first, *splits["test"]))
    judge.load_or_train(client, experiment, "mnist", splits, epochs=4)  # another recipe: another judge
    assert calls == [1, 1]


def test_a_run_from_before_the_judge_is_back_filled_once(tmp_path, tiny_root, monkeypatch, capfd):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_tiny(tmp_path, tiny_root, "model=mlp2", "model.hidden=[64]", "trainer.max_epochs=1")
    with monkeypatch.context() as before:
        before.setattr(evaluation, "PARTS", {"evaluation": evaluation.PARTS["evaluation"]})
        before.setattr(evaluation, "EVAL_VERSION", "1")
        result = train(cfg)
    client = tmp_store(tmp_path)
    run = client.get_run(result["run_id"])
    assert "test/judged_accuracy" not in run.data.metrics and run.data.tags["eval_version"] == "1"
    knn = run.data.metrics["test/knn_accuracy"]

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = ["--tracking-uri", uri, "--data-root", str(tiny_root), "model.name=mlp2"]
    with pytest.raises(backfill.NoRunMatches, match=r"none has model.name=mlp3 \(the runs have mlp2\)"):
        backfill.backfill(uri, "vae_sweeps", {"model.name": "mlp3"}, str(tiny_root), dry_run=True)  # says so
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)  # as in a new process
    capfd.readouterr()
    backfill.main(args)
    assert "Downloading artifacts" not in capfd.readouterr().err  # no progress bar per run
    run = client.get_run(result["run_id"])
    assert run.data.tags["eval_version"] == evaluation.EVAL_VERSION == run.data.tags["eval_backfilled"]
    assert 0 <= run.data.metrics["test/judged_accuracy"] <= 1
    drawn = run.data.tags["classes_drawn"]
    assert (len(drawn.split()) if drawn != "none" else 0) == run.data.metrics["test/classes_drawn"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/judged_accuracy")] == [1]
    assert run.data.metrics["test/knn_accuracy"] == knn  # the part it had is left alone
    backfill.main(args)  # idempotent: nothing left to do
    assert len(client.get_metric_history(run.info.run_id, "test/judged_accuracy")) == 1
    assert [r.info.run_id for r in all_runs(tmp_path)] == [result["run_id"]]


def test_a_new_metric_is_back_filled_into_a_run_that_has_every_other(tmp_path, tiny_root, monkeypatch):
    """One registry entry makes a metric: a run evaluated before it existed lacks only that one,
    and the back-fill adds it, whether its part is an existing one or a new one, and leaves the
    run's other metrics as they were."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_tiny(tmp_path, tiny_root, "model=mlp2", "model.hidden=[64]", "trainer.max_epochs=1")
    result = train(cfg)
    client = tmp_store(tmp_path)
    before = client.get_run(result["run_id"]).data
    assert metrics.lacking(before.metrics, identity.completed(before.params)) == {}  # the registry is what a run logs

    evaluation_part = evaluation.PARTS["evaluation"]

    def evaluation_and_count(vae, datamodule, *rest):  # a new metric of the evaluation part
        found, tags = evaluation_part(vae, datamodule, *rest)
        return {**found, "test/test_images": float(len(datamodule.splits["test"][0]))}, tags

    monkeypatch.setitem(evaluation.PARTS, "evaluation", evaluation_and_count)
    monkeypatch.setitem(evaluation.PARTS, "extra", lambda vae, *rest: ({"test/latent_dims": float(vae.latent_dim)}, {}))
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, metrics.Metric("test_images", "evaluation"),
                                             metrics.Metric("latent_dims", "extra")))
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (run, lacks), = backfill.pending(client, "vae_sweeps", {})
    assert lacks == {"evaluation": ["test_images"], "extra": ["latent_dims"]}
    backfill.main(["--tracking-uri", uri, "--data-root", str(tiny_root)])
    after = client.get_run(result["run_id"]).data
    assert after.metrics["test/test_images"] == N_TEST and after.metrics["test/latent_dims"] == cfg.model.latent_dim
    new = ("test/test_images", "test/latent_dims")
    assert {key: value for key, value in after.metrics.items() if key not in new} == before.metrics
    assert all(len(client.get_metric_history(run.info.run_id, key)) == 1
               for key in before.metrics if key.startswith("test/"))  # logged once, at the run's end
    step = client.get_metric_history(run.info.run_id, "test/knn_accuracy")[0].step
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/test_images")] == [step]
    assert after.tags["eval_backfilled"] == evaluation.EVAL_VERSION
    assert backfill.pending(client, "vae_sweeps", {}) == []  # nothing left to do


def test_a_judge_per_dataset_file_and_of_any_image_shape(tmp_path):
    class Files:  # a user's dataset option whose files differ (ImageData.describe)
        def __init__(self, checksums):
            self.checksums = checksums

        def describe(self):
            return {"name": "npz_images", "url": None, "checksums": self.checksums}

    assert judge.data_key("npz_images", Files(["a"])) != judge.data_key("npz_images", Files(["b"]))
    assert judge.data_key("npz_images", Files(["a"])) == judge.data_key("npz_images", Files(["a"]))
    # every copy of MNIST is the same dataset: one judge
    assert (judge.data_key("mnist", MNIST(root=str(tmp_path / "one"), download=False))
            == judge.data_key("mnist", MNIST(root=str(tmp_path / "two"), download=False)))
    assert judge.Judge(7, (3, 32, 20))(torch.zeros(2, 3, 32, 20)).shape == (2, 7)
