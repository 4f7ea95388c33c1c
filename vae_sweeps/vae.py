"""The VAE: one interface for every architecture and prior (encode, decode, sample, loss as a dict)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vae_sweeps.losses import bce


class VAE(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(logvar(x)))), a prior p(z) (priors.py), decoder logits f(z).

    Per image: loss = c * Recon(x, f(z)) + KL, with one z drawn per image (z = mu for the
    deterministic encoder of prior ``none``); ``loss`` returns the batch means of ``loss``,
    ``recon`` and ``kl`` (with c = 1, BCE and the standard prior, loss is -ELBO).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module, recon_loss: Callable = bce,
                 c: float = 1.0):
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior
        self.latent_dim, self.recon_loss, self.c = prior.latent_dim, recon_loss, c

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the pixel means; sigmoid gives the image."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + eps * sigma, eps ~ N(0, I), sigma = exp(logvar / 2)."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu if self.prior.deterministic else self.reparameterize(mu, logvar)
        return {"logits": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        recon = self.recon_loss(out["logits"], x)
        kl = self.prior.kl(out["mu"], out["logvar"], out["z"])
        return {"loss": (self.c * recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images decoded from z ~ p(z) (N(0, I) draws for the plain autoencoder)."""
        device = next(self.parameters()).device
        return torch.sigmoid(self.decode(self.prior.sample(n, device)))

    @torch.no_grad()
    def encode_means(self, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
        """The posterior means of ``images``, encoded ``batch`` at a time."""
        return torch.cat([self.encode(x)[0] for x in images.split(batch)])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from the posterior means."""
        return torch.sigmoid(self.decode(self.encode(x)[0]))
