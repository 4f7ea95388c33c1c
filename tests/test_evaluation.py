"""The end-of-run evaluation: importance weighting, active units, k-NN, sharpness."""

import math

import pytest
import torch

from vae_sweeps import evaluation, identity, metrics, models, options
from vae_sweeps.errors import UserError
from vae_sweeps.losses import RECON_LOSSES, recon_loss
from vae_sweeps.priors import MixturePrior, NoPrior, StandardPrior
from vae_sweeps.vae import VAE


def small_vae(prior=None, seed=0) -> VAE:
    torch.manual_seed(seed)
    encoder, decoder = models.mlp(2, [32], layers=2, image_shape=(1, 28, 28))
    return VAE(encoder, decoder, prior or StandardPrior(2))


def test_iw_bound_is_at_least_the_elbo_and_grows_with_k():
    vae = small_vae()
    images = torch.rand(300, 1, 28, 28).round()
    estimates = {}
    for k in (1, 5, 50):
        torch.manual_seed(1)
        estimates[k] = evaluation.elbo_and_log_px(vae, images, k)[""]
    elbo_1, iw_1 = estimates[1]
    assert iw_1 == pytest.approx(elbo_1, abs=1e-4)  # one sample: the same thing
    for k in (5, 50):
        elbo, iw = estimates[k]
        assert iw > elbo
    assert estimates[1][1] < estimates[5][1] < estimates[50][1]
    # every ELBO estimate estimates the same expectation
    assert estimates[50][0] == pytest.approx(estimates[1][0], abs=1.0)


class FixedPosterior(torch.nn.Module):
    """q(z|x) = N(0.5, 0.5 I) for every image."""

    def forward(self, x):
        return torch.tensor([0.5, 0.5, math.log(0.5), math.log(0.5)]).expand(len(x), 4)  # mu, logvar


class ConstantDecoder(torch.nn.Module):
    """Logits that ignore z, so p(x) = p(x|z) exactly."""

    def forward(self, z):
        return torch.full((len(z), 1, 28, 28), 0.3)


def test_iw_and_elbo_against_known_values():
    vae = VAE(FixedPosterior(), ConstantDecoder(), StandardPrior(2))
    images = torch.rand(20, 1, 28, 28)
    log_px = -vae.recon_loss(ConstantDecoder()(images), images).mean().item()
    kl = vae.prior.kl(torch.full((1, 2), 0.5), torch.full((1, 2), 0.5).log(), None).item()
    torch.manual_seed(0)
    elbo, iw = evaluation.elbo_and_log_px(vae, images, k=4000)[""]
    assert iw == pytest.approx(log_px, abs=0.02)  # importance weights average to p(x)
    assert elbo == pytest.approx(log_px - kl, abs=0.02)  # the ELBO falls short by KL(q || p)


def test_active_units_count_a_constant_dimension_as_inactive():
    means = torch.randn(1000, 4)
    means[:, 2] = 0.7  # never varies
    means[:, 3] *= 0.05  # variance 0.0025 < 0.01
    assert evaluation.active_units(means) == 2
    assert evaluation.active_units(means, threshold=0.001) == 3


def test_knn_is_perfect_on_well_separated_latents():
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    train_y, test_y = torch.arange(300) % 3, torch.arange(90) % 3
    train_z = centres[train_y] + torch.randn(300, 2)
    test_z = centres[test_y] + torch.randn(90, 2)
    assert evaluation.knn_accuracy(train_z, train_y, test_z, test_y, k=5) == 1.0
    shuffled = train_y[torch.randperm(300)]
    assert evaluation.knn_accuracy(train_z, shuffled, test_z, test_y, k=5) < 0.6


def test_sharpness_of_the_originals_is_one_and_of_a_blur_less():
    images = (torch.rand(20, 1, 28, 28) > 0.5).float()
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    assert (evaluation.mean_gradient(images) / evaluation.mean_gradient(images)).item() == 1.0
    assert (evaluation.mean_gradient(blurred) / evaluation.mean_gradient(images)).item() < 0.6
    hand = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # across: |1-0| twice; down: 0
    assert evaluation.mean_gradient(hand).item() == 1.0


def splits(n_train=60, n_test=30):
    return {"train": (torch.rand(n_train, 1, 28, 28), torch.arange(n_train) % 10),
            "test": (torch.rand(n_test, 1, 28, 28), torch.arange(n_test) % 10)}


def test_evaluate_reports_every_figure_and_the_mixture_gaps():
    metrics = evaluation.evaluate(small_vae(MixturePrior(2, 3, kl="mc")), splits(), iw_samples=8, knn_k=3)
    assert set(metrics) == {
        "test/recon_bce", "test/recon_l2", "test/recon_l1", "test/sharpness", "test/active_units",
        "test/knn_accuracy", "test/knn_accuracy_pca2", "test/elbo", "test/log_px", "test/kl_mc", "test/kl_bound", "test/kl_tight",
        "test/kl_bound_gap", "test/kl_tight_gap"}
    assert metrics["test/log_px"] > metrics["test/elbo"]
    assert metrics["test/kl_bound_gap"] >= metrics["test/kl_tight_gap"]
    assert metrics["test/kl_bound_gap"] == pytest.approx(metrics["test/kl_bound"] - metrics["test/kl_mc"])
    assert 0 <= metrics["test/knn_accuracy"] <= 1 and 0 <= metrics["test/active_units"] <= 2


def test_the_autoencoder_has_no_likelihood_to_report():
    metrics = evaluation.evaluate(small_vae(NoPrior(2)), splits(), iw_samples=8, knn_k=3)
    assert "test/elbo" not in metrics and "test/log_px" not in metrics
    assert "test/knn_accuracy" in metrics and "test/recon_bce" in metrics


def test_log_px_is_the_bernoulli_with_c_1_whatever_the_loss_and_c():
    """The comparable column: for an L2 run with c = 4 the log-weights use -BCE (c = 1); the
    training objective's bound, -4 * L2, is logged beside it under its own name."""
    images = torch.rand(20, 1, 28, 28)
    logits = ConstantDecoder()(images)
    bce = VAE(FixedPosterior(), ConstantDecoder(), StandardPrior(2)).recon_loss(logits, images).mean().item()
    l2 = (torch.sigmoid(logits) - images).square().flatten(1).sum(1).mean().item()
    kl = StandardPrior(2).kl(torch.full((1, 2), 0.5), torch.full((1, 2), 0.5).log(), None).item()
    vae = VAE(FixedPosterior(), ConstantDecoder(), StandardPrior(2), recon_loss=RECON_LOSSES["l2"], c=4.0)
    torch.manual_seed(0)
    bounds = evaluation.elbo_and_log_px(vae, images, k=4000)
    assert set(bounds) == {"", "_objective"}
    assert bounds[""][1] == pytest.approx(-bce, abs=0.02)  # the decoder ignores z: log p(x) = -BCE
    assert bounds[""][0] == pytest.approx(-bce - kl, abs=0.02)
    assert bounds["_objective"][1] == pytest.approx(-4 * l2, abs=0.02)
    assert bounds["_objective"][0] == pytest.approx(-4 * l2 - kl, abs=0.02)
    assert -4 * l2 > -bce + 100  # the two scales are far apart: only the first compares across runs


def test_the_objective_bound_is_logged_only_where_it_differs():
    plain = evaluation.evaluate(small_vae(), splits(), iw_samples=4, knn_k=3)
    assert "test/log_px_objective" not in plain and "test/elbo_objective" not in plain
    weighted = small_vae()
    weighted.c = 2.0
    metrics = evaluation.evaluate(weighted, splits(), iw_samples=4, knn_k=3)
    assert {"test/log_px_objective", "test/elbo_objective"} <= set(metrics)


@pytest.mark.parametrize("overrides", [[], ["prior=gmm", "prior.components=3", "prior.kl=mc"], ["prior=none"],
                                       ["loss=l2", "loss.c=4"], ["loss.c=2"]])
def test_the_registry_names_what_the_evaluation_computes(overrides):
    """The back-fill looks for the registry's metrics that apply to a run (metrics.expected):
    they are what the evaluation part computes for that run's prior and loss."""
    cfg = identity.compose([*overrides, "model.latent_dim=2", "paths.output_dir=."])
    prior = options.build("prior", cfg.prior, latent_dim=2)
    vae = VAE(*models.mlp(2, [32], layers=2, image_shape=(1, 28, 28)), prior,
              recon_loss=recon_loss(cfg.loss), c=cfg.loss.c)
    computed = evaluation.evaluate(vae, splits(), iw_samples=4, knn_k=3)
    expected = {m.key for m in metrics.expected(identity.params(cfg)) if m.part == "evaluation"}
    assert set(computed) == expected


def test_a_prior_that_cannot_be_imported_is_a_user_error():
    with pytest.raises(UserError, match=r"prior._target_=nowhere.Prior cannot be imported"):
        metrics.expected({"prior._target_": "nowhere.Prior"})


def test_pca_projects_onto_the_direction_of_largest_variance():
    train = torch.zeros(4, 1, 2, 2)
    train[:, 0, 0, 0] = torch.tensor([-3.0, -1.0, 1.0, 3.0])  # all the variance in one pixel
    train[:, 0, 1, 1] = torch.tensor([0.1, -0.1, -0.1, 0.1])  # uncorrelated with the first
    test = torch.zeros(1, 1, 2, 2)
    test[0, 0, 0, 0] = 2.0
    train_pcs, test_pcs = evaluation.pca(train, test, dims=1)
    assert train_pcs.abs().flatten().tolist() == pytest.approx([3.0, 1.0, 1.0, 3.0], abs=1e-5)
    assert test_pcs.abs().item() == pytest.approx(2.0, abs=1e-5)
