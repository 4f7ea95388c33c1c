"""The loss of STUDY.md: KL, the three reconstruction losses, c, and the reparameterisation."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vae_sweeps.losses import bce, l1, l2
from vae_sweeps.priors import StandardPrior
from vae_sweeps.vae import VAE


def kl_standard_normal(mu, logvar):
    return StandardPrior(mu.shape[1]).kl(mu, logvar, mu)

# Three pixels with pixel means sigmoid(logits) = 0.5, 0.75, 0.25 against targets 1, 0, 0.5.
LOGITS = torch.tensor([[0.0, math.log(3.0), -math.log(3.0)]])
TARGET = torch.tensor([[1.0, 0.0, 0.5]])


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(16, 5, generator=gen) * 2
    logvar = torch.randn(16, 5, generator=gen)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), expected)


def test_kl_hand_computed():
    # sigma = (1, 2): (0 + (1 + 1)/2 - 1/2) + (-log 2 + (4 + 0)/2 - 1/2) = 0.5 + 1.5 - log 2
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    assert kl_standard_normal(mu, logvar).item() == pytest.approx(2.0 - math.log(2.0))
    assert kl_standard_normal(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0


def test_bce_hand_computed():
    # -ln 0.5 - ln 0.25 - (0.5 ln 0.25 + 0.5 ln 0.75)
    expected = -math.log(0.5) - math.log(0.25) - 0.5 * (math.log(0.25) + math.log(0.75))
    assert bce(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_l1_and_l2_hand_computed_on_pixel_means():
    # |p - x| = 0.5, 0.75, 0.25
    assert l1(LOGITS, TARGET).item() == pytest.approx(1.5, rel=1e-6)
    assert l2(LOGITS, TARGET).item() == pytest.approx(0.25 + 0.5625 + 0.0625, rel=1e-6)


def test_losses_sum_per_image_over_pixels():
    x = torch.rand(4, 1, 28, 28)
    logits = torch.randn(4, 1, 28, 28)
    for loss in (bce, l1, l2):
        per_image = loss(logits, x)
        assert per_image.shape == (4,)
        torch.testing.assert_close(per_image[1], loss(logits[1:2], x[1:2])[0])


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_vae_loss_is_c_recon_plus_kl_averaged_over_the_batch(c):
    vae = VAE(torch.nn.Identity(), torch.nn.Identity(), StandardPrior(2), recon_loss=l1, c=c)
    x = TARGET.repeat(2, 1)
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = {"logits": LOGITS.repeat(2, 1), "mu": mu, "z": mu,
           "logvar": torch.tensor([[0.0, math.log(4.0)], [0.0, 0.0]])}
    losses = vae.loss(x, out)
    kl_mean = (2.0 - math.log(2.0) + 0.0) / 2
    assert losses["recon"].item() == pytest.approx(1.5)
    assert losses["kl"].item() == pytest.approx(kl_mean)
    assert losses["loss"].item() == pytest.approx(c * 1.5 + kl_mean)


def test_reparameterisation_is_gaussian_with_sigma_from_logvar():
    torch.manual_seed(0)
    mu = torch.full((200_000, 1), 3.0)
    logvar = torch.full((200_000, 1), math.log(4.0))  # sigma = 2
    z = VAE.reparameterize(mu, logvar)
    assert z.mean().item() == pytest.approx(3.0, abs=0.02)
    assert z.std().item() == pytest.approx(2.0, abs=0.02)
    # Gaussian, not uniform noise: about 4.55% of draws lie beyond 2 sigma
    beyond = ((z - 3.0).abs() > 4.0).float().mean().item()
    assert beyond == pytest.approx(0.0455, abs=0.003)
