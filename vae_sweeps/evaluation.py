"""What every run reports on the test set at its end, beyond the loss it trained with.

- ``test/elbo`` and ``test/log_px``: the ELBO and the importance-weighted estimate of
  log p(x) with K samples per image (``eval.iw_samples``), both by Monte Carlo, with the same
  samples, whatever KL estimator the run trained with (so priors compare fairly), and under the
  **Bernoulli likelihood with c = 1** (the decoder's outputs as Bernoulli means), whatever
  reconstruction loss and c the run trained with: one scale for every run, so these compare
  across rows. (On grey-level pixels the Bernoulli is not a normalised density: the numbers are
  not comparable with results on binarised MNIST.) A plain autoencoder has neither.
- ``test/elbo_objective`` and ``test/log_px_objective``: the same bounds with the run's own
  likelihood term, log p(x|z) = -c * Recon: the IW bound of the training objective. Logged only
  where it differs from the first (another loss than BCE, or c != 1); for L1 and L2 it lacks
  the likelihood's constants, and for c != 1 it is no likelihood at all, so it compares runs of
  one loss and one c only.
- ``test/recon_bce``, ``test/recon_l2``, ``test/recon_l1``: the three reconstruction losses of
  the posterior-mean reconstructions, whatever loss the run trained with.
- ``test/active_units``: latent dimensions whose posterior mean varies across test images
  with variance above ``threshold`` (0.01).
- ``test/knn_accuracy``: k-NN classification (``eval.knn_k``) of test latent means among
  the training latent means; ``test/knn_accuracy_pca2``, the same k-NN on the first two
  principal components of the pixels: the linear baseline that "classes cluster" must beat.
- ``test/sharpness``: the mean image-gradient magnitude of the reconstructions relative to
  the originals' (1 = as sharp as the data).
- ``test/<name>`` for each test metric of the prior's own (``Prior.metrics``, priors.py).

Each of these is an entry of the registry (metrics.py), which the tables and the back-fill
read: a metric added here needs its entry there, and ``tests/test_evaluation.py`` checks that
the two agree. A run computes them in *parts* (``PARTS``: this module's ``evaluation`` and
judge.py's ``judge``), at its end (train.py) or later (the back-fill, backfill.py), through
``compute``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlflow import MlflowClient

from vae_sweeps import judge, store
from vae_sweeps.losses import RECON_LOSSES
from vae_sweeps.priors import gaussian_log_prob


@torch.no_grad()
def log_weights(vae, x: torch.Tensor, k: int, likelihoods: dict) -> dict[str, torch.Tensor]:
    """For each ``likelihoods`` name -> log p(x|z) given (logits, x): the (k, B) log-weights
    log p(x|z) + log p(z) - log q(z|x) for the same k draws z ~ q(z|x) per image."""
    mu, logvar = vae.encode(x)
    z = mu + torch.randn(k, *mu.shape, device=mu.device) * (0.5 * logvar).exp()
    logits = vae.decode(z.flatten(0, 1))
    repeated = x.repeat(k, 1, 1, 1)
    log_pz_qz = vae.prior.log_prob(z) - gaussian_log_prob(z, mu, logvar)
    return {name: likelihood(logits, repeated).view(k, len(x)) + log_pz_qz for name, likelihood in likelihoods.items()}


def bernoulli(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) of the Bernoulli with means sigmoid(logits), c = 1: -BCE, per image."""
    return -RECON_LOSSES["bce"](logits, x)


def objective(vae):
    """The run's own likelihood term, -c * Recon, per image."""
    return lambda logits, x: -vae.c * vae.recon_loss(logits, x)


def likelihoods(vae) -> dict:
    """The likelihoods to evaluate a VAE under: the Bernoulli with c = 1 (``""``), and the run's
    own objective (``"_objective"``) where that is another."""
    same = vae.recon_loss is RECON_LOSSES["bce"] and float(vae.c) == 1.0
    return {"": bernoulli} if same else {"": bernoulli, "_objective": objective(vae)}


@torch.no_grad()
def elbo_and_log_px(vae, images: torch.Tensor, k: int, batch: int = 200) -> dict[str, tuple[float, float]]:
    """For each likelihood of ``likelihoods(vae)``, the per-image means of the ELBO (the mean of
    the k log-weights) and of the importance-weighted bound log (1/k) sum_i w_i, which is at
    least the ELBO and grows towards log p(x) with k. The per-image values stay on the device
    until the one read-back."""
    under = likelihoods(vae)
    elbo, log_px = {name: [] for name in under}, {name: [] for name in under}
    for x in images.split(batch):
        for name, w in log_weights(vae, x, k, under).items():
            elbo[name].append(w.mean(0))
            log_px[name].append(torch.logsumexp(w, 0) - math.log(k))
    return {name: (torch.cat(elbo[name]).double().mean().item(), torch.cat(log_px[name]).double().mean().item())
            for name in under}


def pca(train: torch.Tensor, test: torch.Tensor, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``train`` and ``test`` (flattened) projected onto the first ``dims`` principal components
    of ``train``: the eigenvectors of its scatter matrix with the largest eigenvalues (pixels x
    pixels, a quarter of the time of an SVD of the images; a component's sign is arbitrary,
    which no distance between projections sees)."""
    train, test = train.flatten(1).double(), test.flatten(1).double()
    mean = train.mean(0)
    centred = train - mean
    components = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -dims:].flip(1)  # eigenvalues ascend
    return (centred @ components).float(), ((test - mean) @ components).float()


def active_units(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean has variance above ``threshold`` across images."""
    return int((means.var(0) > threshold).sum())


@torch.no_grad()
def knn_accuracy(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                 k: int, batch: int = 500) -> float:
    """The share of test points whose k nearest training points (Euclidean) vote for their
    class; ties go to the smaller class index."""
    classes = int(torch.maximum(train_y.max(), test_y.max())) + 1
    correct = 0  # a count on the device, read once at the end
    for z, y in zip(test_z.split(batch), test_y.split(batch)):
        nearest = torch.cdist(z, train_z).topk(k, largest=False).indices
        votes = F.one_hot(train_y[nearest], classes).sum(1)
        correct = correct + (votes.argmax(1) == y).sum()
    return int(correct) / len(test_z)


def mean_gradient(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, across and down."""
    return ((images[..., :, 1:] - images[..., :, :-1]).abs().mean()
            + (images[..., 1:, :] - images[..., :-1, :]).abs().mean())


@torch.no_grad()
def evaluate(vae, splits: dict, iw_samples: int, knn_k: int, batch: int = 1000) -> dict[str, float]:
    """Every test/... figure of the module docstring, for a trained VAE."""
    was_training = vae.training
    vae.eval()
    test_x, test_y = splits["test"]
    train_x, train_y = splits["train"]
    test_means = vae.encode_means(test_x, batch)
    logits = torch.cat([vae.decode(mu) for mu in test_means.split(batch)])
    metrics = {f"test/recon_{name}": loss(logits, test_x).mean().item() for name, loss in RECON_LOSSES.items()}
    metrics["test/sharpness"] = (mean_gradient(torch.sigmoid(logits)) / mean_gradient(test_x)).item()
    metrics["test/active_units"] = float(active_units(test_means))
    metrics["test/knn_accuracy"] = knn_accuracy(vae.encode_means(train_x, batch), train_y, test_means, test_y, knn_k)
    train_pcs, test_pcs = pca(train_x, test_x)
    metrics["test/knn_accuracy_pca2"] = knn_accuracy(train_pcs, train_y, test_pcs, test_y, knn_k)
    if not vae.prior.deterministic:
        for suffix, (elbo, log_px) in elbo_and_log_px(vae, test_x, iw_samples).items():
            metrics[f"test/elbo{suffix}"], metrics[f"test/log_px{suffix}"] = elbo, log_px
    metrics.update({f"test/{name}": value for name, value in vae.prior.metrics(vae, test_x, batch).items()})
    vae.train(was_training)
    return metrics


# ---------------------------------------------------------------------------- the parts, as a run computes them


# The tag ``eval_version`` of an evaluated run (and ``eval_backfilled``: the version that filled
# it): 1, the evaluation part; 2, and the judge part. A record for the reader only: the back-fill
# looks for each metric (metrics.py), not at this tag, so a new metric needs no new version.
EVAL_VERSION = "2"


def judges_experiment(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """The store's experiment that holds the judges of ``experiment``'s runs."""
    return store.open_store(uri, judge.experiment_name(experiment))


def evaluation_part(vae, datamodule, settings: dict, uri: str, experiment: str) -> tuple[dict, dict]:
    """The test metrics of evaluation.py, with the run's ``eval.iw_samples`` and ``eval.knn_k``."""
    found = evaluate(vae, datamodule.splits, int(settings["eval.iw_samples"]), int(settings["eval.knn_k"]))
    return found, {}


def judge_part(vae, datamodule, settings: dict, uri: str, experiment: str) -> tuple[dict, dict]:
    """The judged metrics of judge.py and the tags ``classes_drawn`` and ``judge_run``, by the dataset's judge
    (trained once per store and dataset, in the experiment ``judges_experiment`` names)."""
    client, judges = judges_experiment(uri, experiment)
    epochs = int(settings["eval.judge_epochs"])
    dataset = judge.data_key(settings["data.name"], datamodule)
    with store.lock(uri, f"judge-{dataset}-{epochs}"):  # parallel jobs train it once
        the_judge, judge_run = judge.load_or_train(client, judges, dataset, datamodule.splits, epochs)
    the_judge = the_judge.to(next(vae.parameters()).device)
    judged, drawn = judge.judge_metrics(the_judge, vae, datamodule.splits["test"], int(settings["seed"]))
    return judged, {"classes_drawn": drawn, "judge_run": judge_run}


# Each part of the evaluation (the ``part`` of metrics.py's entries) -> the function that computes
# its (metrics, tags) for a trained VAE, in the order they run: the evaluation's Monte Carlo draws
# come from the run's seed, before anything else draws.
PARTS = {"evaluation": evaluation_part, "judge": judge_part}


def compute(parts: list[str], vae, datamodule, settings: dict, uri: str, experiment: str
            ) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of the evaluation ``parts`` for a trained VAE, run in the order of
    ``PARTS``; ``settings`` are the run's params (``eval.*``, ``seed``), completed with today's
    defaults."""
    unknown = [name for name in parts if name not in PARTS]
    if unknown:  # an entry of metrics.py whose part has no function here
        raise ValueError(f"no part {', '.join(unknown)} in evaluation.PARTS")
    values, tags = {}, {}
    for name, part in PARTS.items():
        if name in parts:
            found, its_tags = part(vae, datamodule, settings, uri, experiment)
            values.update(found)
            tags.update(its_tags)
    return values, {**tags, "eval_version": EVAL_VERSION}
