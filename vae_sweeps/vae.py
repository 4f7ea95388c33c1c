"""The VAE: one interface for every architecture (encode, decode, sample, loss as a dict)."""

from __future__ import annotations

import torch
from torch import nn

from vae_sweeps.losses import RECON_LOSSES, kl_standard_normal


class VAE(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(logvar(x)))), p(z) = N(0, I), decoder logits f(z).

    Per image: loss = c * Recon(x, f(z)) + KL, with one z drawn per image; ``loss`` returns
    the batch means of ``loss``, ``recon`` and ``kl`` (with c = 1 and BCE, loss is -ELBO).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int,
                 recon: str = "bce", c: float = 1.0):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.recon, self.c = latent_dim, recon, c
        self.recon_loss = RECON_LOSSES[recon]

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
        z = self.reparameterize(mu, logvar)
        return {"logits": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        recon = self.recon_loss(out["logits"], x)
        kl = kl_standard_normal(out["mu"], out["logvar"])
        return {"loss": (self.c * recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images decoded from z ~ p(z)."""
        device = next(self.parameters()).device
        return torch.sigmoid(self.decode(torch.randn(n, self.latent_dim, device=device)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from the posterior means."""
        return torch.sigmoid(self.decode(self.encode(x)[0]))
