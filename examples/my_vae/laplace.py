"""A factorised Laplace prior, p(z) = prod_j Laplace(z_j; 0, b): the prior of
examples/conf/prior/laplace.yaml (prior=laplace prior.scale=b).

vae_sweeps constructs ``LaplacePrior`` with the option's settings and the model's
``latent_dim``. The training's KL term is the Monte Carlo estimate ln q(z|x) - ln p(z) at the
z drawn for each image (exact in expectation). At the end of a run, ``metrics`` also logs the
closed form of KL(q || p) (``test/kl_exact``), the MC estimate (``test/kl_mc``) and their
difference (``test/kl_mc_gap``).
"""

from __future__ import annotations

import math

import torch

from vae_sweeps.errors import BadValue
from vae_sweeps.priors import Prior, gaussian_log_prob


class LaplacePrior(Prior):
    """Laplace(0, ``scale``) in every latent dimension: ln p(z_j) = -ln(2 b) - |z_j| / b."""

    metric_names = ("kl_exact", "kl_mc", "kl_mc_gap")  # what ``metrics`` returns: a back-fill looks for each

    def __init__(self, latent_dim: int, scale: float = 1.0):
        super().__init__(latent_dim)
        ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
        if not ok:
            raise BadValue("scale", scale, "it must be a finite number > 0, e.g. prior.scale=1.0")
        self.scale = float(scale)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return (-math.log(2 * self.scale) - z.abs() / self.scale).sum(-1)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ln q(z|x) - ln p(z) at the drawn z, per image."""
        return gaussian_log_prob(z, mu, logvar) - self.log_prob(z)

    def kl_exact(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, sigma^2) || Laplace(0, b)) per image: sum_j -1/2 ln(2 pi e sigma_j^2) + ln(2 b)
        + E|z_j| / b, with E|z_j| = sigma_j sqrt(2/pi) exp(-mu_j^2 / (2 sigma_j^2)) + mu_j erf(mu_j / (sigma_j sqrt 2))."""
        sigma = (0.5 * logvar).exp()
        mean_abs = (sigma * math.sqrt(2 / math.pi) * torch.exp(-mu.square() / (2 * sigma.square()))
                    + mu * torch.erf(mu / (sigma * math.sqrt(2))))
        return (-0.5 * (math.log(2 * math.pi) + 1 + logvar) + math.log(2 * self.scale) + mean_abs / self.scale).sum(-1)

    def sample(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        scale = torch.full((self.latent_dim,), self.scale, device=device)
        return torch.distributions.Laplace(torch.zeros_like(scale), scale).sample((n,))

    @torch.no_grad()
    def metrics(self, vae, images: torch.Tensor, batch: int) -> dict[str, float]:
        """Test metrics of this prior's own (vae_sweeps logs them as test/<name>)."""
        exact, mc = [], []
        for x in images.split(batch):
            mu, logvar = vae.encode(x)
            exact.append(self.kl_exact(mu, logvar))
            mc.append(self.kl(mu, logvar, vae.reparameterize(mu, logvar)))
        kl_exact, kl_mc = (torch.cat(values).double().mean().item() for values in (exact, mc))
        return {"kl_exact": kl_exact, "kl_mc": kl_mc, "kl_mc_gap": kl_mc - kl_exact}
