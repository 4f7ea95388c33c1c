"""The prior axis: the Gaussian mixture's density, its three KL estimators, and the autoencoder."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vae_sweeps import models
from vae_sweeps import options
from vae_sweeps.errors import ConfigError
from vae_sweeps.priors import MixturePrior, NoPrior, StandardPrior
from vae_sweeps.vae import VAE


def random_mixture(m=5, d=3, seed=0) -> MixturePrior:
    torch.manual_seed(seed)
    prior = MixturePrior(d, components=m, kl="tight")
    with torch.no_grad():
        prior.means.normal_(0.0, 2.0)
        prior.logvars.uniform_(-1.0, 1.0)
        prior.logits.normal_(0.0, 1.0)
    return prior


def random_posteriors(b=12, d=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=gen) * 2, torch.rand(b, d, generator=gen) * 2 - 1.5


def mc_kl(prior, mu, logvar, samples=40_000):
    """Per posterior: the mean of ln q(z) - ln p(z) over many z ~ q."""
    torch.manual_seed(2)
    z = mu + torch.randn(samples, *mu.shape) * (0.5 * logvar).exp()
    return prior.kl_mc(mu.expand_as(z), logvar.expand_as(z), z).mean(0)


def test_mixture_density_matches_torch_distributions():
    prior = random_mixture()
    mixture = MixtureSameFamily(Categorical(logits=prior.logits),
                                Independent(Normal(prior.means, (0.5 * prior.logvars).exp()), 1))
    z = torch.randn(50, 3) * 3
    torch.testing.assert_close(prior.log_prob(z), mixture.log_prob(z))


def test_both_bounds_are_at_least_the_mc_kl_and_tight_never_above_the_studys():
    prior = random_mixture()
    mu, logvar = random_posteriors()
    with torch.no_grad():
        mc, tight, bound = mc_kl(prior, mu, logvar), prior.kl_tight(mu, logvar), prior.kl_bound(mu, logvar)
    assert (tight >= mc - 0.02).all(), (tight - mc)  # 0.02: the MC estimate's own error
    assert (bound >= tight).all()
    assert (bound - mc).mean() > 0.1  # the study's bound is loose


def test_with_one_standard_normal_component_both_bounds_are_the_closed_form_kl():
    prior = MixturePrior(3, components=1)
    with torch.no_grad():
        prior.means.zero_()
        prior.logvars.zero_()
    mu, logvar = random_posteriors()
    closed = StandardPrior(3).kl(mu, logvar, mu)
    torch.testing.assert_close(prior.kl_bound(mu, logvar), closed)
    torch.testing.assert_close(prior.kl_tight(mu, logvar), closed)
    assert prior.kl_mc(mu, logvar, mu).shape == closed.shape


@pytest.mark.parametrize("estimator", ["bound", "tight", "mc"])
def test_gradients_reach_every_mixture_parameter(estimator):
    prior = random_mixture()  # unequal weights: the study's bound pulls them back to equal
    prior.estimator = estimator
    encoder, decoder = models.mlp(3, [16], layers=2, image_shape=(1, 28, 28))
    vae = VAE(encoder, decoder, prior)
    x = torch.rand(8, 1, 28, 28)
    vae.loss(x, vae(x))["loss"].backward()
    for name in ("means", "logvars", "logits"):
        grad = getattr(prior, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_the_studys_bound_is_flat_in_the_weights_when_they_are_equal():
    # sum_m (1/M) ln(1 / (M pi_m)) is smallest at pi_m = 1/M: the bound never moves equal weights
    prior = MixturePrior(3, components=4, kl="bound")
    mu, logvar = random_posteriors()
    prior.kl_bound(mu, logvar).sum().backward()
    assert prior.logits.grad.abs().max() < 1e-6


def test_mixture_samples_come_from_its_components():
    prior = MixturePrior(2, components=2)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))
        prior.logvars.fill_(math.log(0.01))
        prior.logits.copy_(torch.tensor([math.log(0.25), math.log(0.75)]))
    torch.manual_seed(0)
    z = prior.sample(4000)
    assert z.shape == (4000, 2) and not z.requires_grad
    assert (z[:, 0] > 0).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert (z[:, 0].abs() - 10).abs().max() < 0.6


def test_the_autoencoder_has_no_kl_and_a_deterministic_encoder():
    encoder, decoder = models.mlp(2, [16], layers=2, image_shape=(1, 28, 28))
    ae = VAE(encoder, decoder, NoPrior(2), c=2.0)
    x = torch.rand(4, 1, 28, 28)
    first, second = ae(x), ae(x)
    torch.testing.assert_close(first["z"], second["z"])
    torch.testing.assert_close(first["z"], ae.encode(x)[0])
    losses = ae.loss(x, first)
    assert losses["kl"].item() == 0.0
    assert losses["loss"].item() == pytest.approx(2.0 * losses["recon"].item())
    assert ae.sample(3).shape == (3, 1, 28, 28)


def test_build_reads_the_prior_config_group():
    # a config without _target_ (a checkpoint from before options had one) is completed from conf/prior/
    assert isinstance(options.build("prior", {"name": "standard"}, latent_dim=2), StandardPrior)
    assert isinstance(options.build("prior", {"name": "none"}, latent_dim=2), NoPrior)
    gmm = options.build("prior", {"name": "gmm", "components": 7, "kl": "mc"}, latent_dim=4)
    assert (gmm.components, gmm.estimator, tuple(gmm.means.shape)) == (7, "mc", (7, 4))
    with pytest.raises(ConfigError, match="prior=vamp is not allowed: its config has no _target_"):
        options.build("prior", {"name": "vamp"}, latent_dim=2)
    with pytest.raises(ConfigError, match="prior.kl='exact' is not allowed: choose one of bound, tight, mc"):
        options.build("prior", {"name": "gmm", "kl": "exact"}, latent_dim=2)
