"""A judge per dataset: a small classifier that says which class an image shows, so that the
study's claims about *which* digits a VAE draws or gets wrong have numbers.

The judge of a dataset is trained once on its whole training file (seeded, so the same data
gives the same judge) and stored as its own MLflow run in the experiment ``<experiment>-judges``
(weights as ``judge/state_dict.pt``, loaded with ``weights_only=True``). Every later run and
every back-fill (``python -m vae_sweeps.backfill``) reuses it; it is trained again only if it is
missing, or its weights are (a store restored from its published records). ``JUDGE_VERSION`` names the architecture and training recipe: a new version trains a
new judge.

With it, each run logs (``judge_metrics``):

- ``test/judged_accuracy``: the share of test reconstructions (from the posterior means) that
  the judge assigns to the true class, and ``test/judged_accuracy_<k>`` for each class k;
- ``test/classes_drawn``: how many classes the judge finds with confidence >= 0.9 among what
  the decoder draws: the traversal of z over [-5, 5] (latent dim 1) or the grid over
  [-5, 5]^2 (dim 2), and prior samples (every dim); the classes themselves in the tag
  ``classes_drawn``;
- ``test/drawn_share_<k>``: of those same decoded points, the share that the judge assigns to
  class k with confidence >= 0.9: how often the decoder draws a k, not only whether it ever does;
- ``test/sample_class_entropy``: the entropy (nats; ln 10 = 2.30 is every class equally often)
  of the judge's classes over prior samples: a mode-coverage number;

and the tag ``judge_run``: the judge's run id. (A store restored on a new machine has no judge
weights, so the judge trained there is another one, if seeded alike: the report says which
judge judged how many runs.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_sweeps.figures import GRID_LIMIT

log = logging.getLogger(__name__)

JUDGE_VERSION = "1"  # the architecture and recipe below; a change trains new judges
CONFIDENCE = 0.9
ARTIFACT = "judge/state_dict.pt"
SWEEP_POINTS = {1: 101, 2: 41}  # points per latent axis of the decoder sweep at dim 1 and 2
PRIOR_SAMPLES = 2000


class Judge(nn.Module):
    """Two 3x3 convolutions with max-pooling (28 -> 14 -> 7), then 128 hidden units: 99.0%
    test accuracy on MNIST and 90.2% on Fashion-MNIST after 5 epochs (measured here)."""

    def __init__(self, classes: int = 10, image_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        channels, height, width = image_shape
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        return torch.cat([F.softmax(self(x), dim=1) for x in images.split(batch)])


def fit(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0, batch: int = 128) -> Judge:
    """A judge trained on (images, labels) with Adam, in an order fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(int(labels.max()) + 1, tuple(images.shape[1:])).to(images.device)
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for index in order.split(batch):
            loss = F.cross_entropy(judge(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return judge.eval()


def accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (judge.probabilities(images).argmax(1) == labels).double().mean().item()


def experiment_name(experiment: str) -> str:
    """The MLflow experiment that holds the judges of ``experiment``'s runs."""
    return f"{experiment}-judges"


def data_key(name: str, datamodule) -> str:
    """What a judge is trained for: the data option's ``name`` and a digest of its files
    (ImageData.describe), so that two datasets of one option (a user's .npz files) never share
    a judge, while every copy of MNIST does."""
    described = datamodule.describe()
    digest = hashlib.sha256(json.dumps([described["name"], described["checksums"]]).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def data_name(key: str) -> str:
    """The data option's name in a judge's ``data_key``."""
    return key.rsplit("-", 1)[0]


def load_or_train(client, experiment_id: str, dataset: str, splits: dict, epochs: int) -> tuple[Judge, str]:
    """(the judge of ``dataset`` (data_key) stored in the judges' experiment, or a new one
    trained on the whole training file (train and validation splits) and stored there; its run id)."""
    found = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.judge_dataset = '{dataset}' and tags.judge_version = "
                                             f"'{JUDGE_VERSION}' and params.epochs = '{epochs}' and "
                                             "attributes.status = 'FINISHED'")
    if found:
        try:
            local = client.download_artifacts(found[0].info.run_id, ARTIFACT)
        except Exception as err:  # a store restored from its published records has no artifacts
            log.warning("The %s judge's weights (run %s) are gone (%s); training it again", dataset,
                        found[0].info.run_id, err)
        else:
            state = torch.load(local, map_location="cpu", weights_only=True)
            judge = Judge(len(next(reversed(state.values()))),  # the last layer's bias: one per class
                          tuple(splits["test"][0].shape[1:]))
            judge.load_state_dict(state)
            return judge.eval(), found[0].info.run_id

    images = torch.cat([splits["train"][0], splits["val"][0]]).cpu()
    labels = torch.cat([splits["train"][1], splits["val"][1]]).cpu()
    log.info("Training the %s judge (%d epochs on %d images); it is stored and reused", dataset, epochs, len(images))
    judge = fit(images, labels, epochs)
    test_accuracy = accuracy(judge, splits["test"][0].cpu(), splits["test"][1].cpu())
    run_id = client.create_run(experiment_id, run_name=f"judge-{dataset}",
                               tags={"judge_dataset": dataset, "judge_version": JUDGE_VERSION}).info.run_id
    client.log_param(run_id, "epochs", str(epochs))
    client.log_param(run_id, "training_images", str(len(images)))
    client.log_metric(run_id, "test/accuracy", test_accuracy)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(ARTIFACT).name
        torch.save(judge.state_dict(), local)
        client.log_artifact(run_id, str(local), str(Path(ARTIFACT).parent))
    client.set_terminated(run_id, "FINISHED")
    log.info("The %s judge reaches %.2f%% test accuracy (run %s)", dataset, 100 * test_accuracy, run_id)
    return judge, run_id


@torch.no_grad()
def decoder_sweep(vae, image_shape: tuple[int, ...]) -> torch.Tensor:
    """Images the decoder draws over z in [-5, 5] (dim 1) or [-5, 5]^2 (dim 2); none otherwise."""
    points = SWEEP_POINTS.get(vae.latent_dim)
    if points is None:
        return torch.empty(0, *image_shape)
    axis = torch.linspace(-GRID_LIMIT, GRID_LIMIT, points)
    z = axis.unsqueeze(1) if vae.latent_dim == 1 else torch.cartesian_prod(axis, axis)
    device = next(vae.parameters()).device
    return torch.sigmoid(vae.decode(z.to(device)))


@torch.no_grad()
def judge_metrics(judge: Judge, vae, test: tuple[torch.Tensor, torch.Tensor], seed: int) -> tuple[dict, str]:
    """(the judged metrics of the module docstring, the classes drawn as a space-separated tag,
    "none" if none).
    Prior samples come from their own random stream (``seed``), so that a run and a later
    back-fill of it agree."""
    was_training = vae.training
    vae.eval()
    device = next(judge.parameters()).device
    images, labels = (t.to(device) for t in test)
    recon = vae.reconstruct(images)
    hits = judge.probabilities(recon).argmax(1) == labels
    classes = judge.net[-1].out_features
    metrics = {"test/judged_accuracy": hits.double().mean().item()}
    for k in range(classes):
        of_k = labels == k
        metrics[f"test/judged_accuracy_{k}"] = hits[of_k].double().mean().item() if of_k.any() else math.nan
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = vae.sample(PRIOR_SAMPLES)
    sample_probs = judge.probabilities(samples.to(device))
    drawn_probs = torch.cat([judge.probabilities(decoder_sweep(vae, tuple(images.shape[1:])).to(device)), sample_probs])
    confident = drawn_probs.max(1).values >= CONFIDENCE
    drawn = sorted(set(drawn_probs.argmax(1)[confident].tolist()))
    confident_counts = torch.bincount(drawn_probs.argmax(1)[confident], minlength=classes).double()
    for k in range(classes):
        metrics[f"test/drawn_share_{k}"] = (confident_counts[k] / len(drawn_probs)).item()
    counts = torch.bincount(sample_probs.argmax(1), minlength=classes).double()
    shares = counts[counts > 0] / counts.sum()
    metrics["test/classes_drawn"] = float(len(drawn))
    metrics["test/sample_class_entropy"] = float(-(shares * shares.log()).sum())
    vae.train(was_training)
    return metrics, " ".join(map(str, drawn)) or "none"
