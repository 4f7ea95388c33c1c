"""The prior axis: p(z) and the KL term it puts in the loss.

- ``standard``: N(0, I), with the closed-form KL (the study's model).
- ``gmm``: the mixture the study proposed and did not build, sum_m pi_m N(mu_m, diag(sigma_m^2)),
  with learnable means, log-variances and weights. KL(q || mixture) has no closed form; the
  training estimator is ``kl``:
    ``bound``: the study's upper bound, q split into M equal parts, one per component:
               sum_m (1/M) [ln(1 / (M pi_m)) + KL(q || p_m)];
    ``tight``: the best bound of that family, -ln sum_m pi_m exp(-KL(q || p_m)) (the
               variational approximation of Hershey and Olsen, 2007), never above ``bound``;
    ``mc``:    ln q(z|x) - ln p(z) at the sampled z, exact in expectation.
- ``none``: a plain autoencoder: z = mu(x), no KL; its "samples" decode N(0, I) draws.

Every prior is a ``Prior``: per-image values (summed over latent dimensions) of the KL term
and of ``log_prob``, the density the evaluation uses whatever the training estimator; samples;
the points the latent figures mark (``landmarks``); and any test metrics of its own
(``metrics``). Nothing outside this module asks which prior it has. A prior option
(``conf/prior/<name>.yaml``) names its class as ``_target_``, which is called with the option's
settings and the model's ``latent_dim``; your own prior is a ``Prior`` subclass in your own
package (docs/extending.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vae_sweeps.errors import BadValue, positive_int

LOG_2PI = math.log(2 * math.pi)
KL_ESTIMATORS = ("bound", "tight", "mc")


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """ln N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() / logvar.exp()).sum(-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)) for diagonal Gaussians, summed over the last
    dimension: sum_j 1/2 (2 ln(sigma_p / sigma) + (sigma^2 + (mu - mu_p)^2) / sigma_p^2 - 1)."""
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).square()) / logvar_p.exp() - 1.0).sum(-1)


class Prior(nn.Module):
    """p(z) over ``latent_dim`` dimensions, and the KL term it puts in the loss."""

    # True: a deterministic encoder (z = mu) and no KL term, so no ELBO to evaluate.
    deterministic = False
    # The names of the test metrics ``metrics`` returns: the back-fill looks for each in a run
    # (metrics.py), so that a run logged before one of them existed gets it.
    metric_names: tuple[str, ...] = ()

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The training's KL(q(z|x) || p(z)) per image, for q = N(mu, e^logvar) and its draw z."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """ln p(z), summed over the last dimension."""
        raise NotImplementedError

    def sample(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """n draws z ~ p(z), (n, latent_dim)."""
        raise NotImplementedError

    def landmarks(self) -> torch.Tensor | None:
        """Points of the latent space that the latent-space figure marks (None: none)."""
        return None

    def quantiles(self, probs: torch.Tensor) -> torch.Tensor | None:
        """The prior's quantiles at ``probs`` along each latent axis, where its axes are
        independent and alike (None otherwise): the manifold figure's grid."""
        return None

    def metrics(self, vae, images: torch.Tensor, batch: int) -> dict[str, float]:
        """Test metrics of this prior's own, by name without the ``test/`` prefix: those of
        ``metric_names``."""
        return {}


class StandardPrior(Prior):
    """N(0, I), with the closed-form KL."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Closed form: sum_j -ln sigma_j + (sigma_j^2 + mu_j^2) / 2 - 1/2."""
        return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1)

    def sample(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device)

    def quantiles(self, probs: torch.Tensor) -> torch.Tensor | None:
        return torch.distributions.Normal(0.0, 1.0).icdf(probs)


class NoPrior(StandardPrior):
    """A plain autoencoder: a deterministic encoder (z = mu), no KL term; samples are N(0, I) draws."""

    deterministic = True

    def quantiles(self, probs: torch.Tensor) -> torch.Tensor | None:
        return None  # no prior, so no quantiles of its own

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mu.shape[0], device=mu.device)


class MixturePrior(Prior):
    """A mixture of ``components`` diagonal Gaussians with learnable means, log-variances and
    weights (softmax of ``logits``). The means start spread out as N(0, I) draws, the
    variances at 1 and the weights equal."""

    metric_names = ("kl_mc", "kl_bound", "kl_tight", "kl_bound_gap", "kl_tight_gap")

    def __init__(self, latent_dim: int, components: int = 10, kl: str = "tight"):
        super().__init__(latent_dim)
        positive_int("components", components, "10")
        if kl not in KL_ESTIMATORS:
            raise BadValue("kl", kl, f"choose one of {', '.join(KL_ESTIMATORS)} (prior.kl=<estimator>)")
        self.components, self.estimator = components, kl
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def log_weights(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=0)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """ln sum_m pi_m N(z; mu_m, sigma_m^2), by log-sum-exp over the components."""
        per_component = gaussian_log_prob(z.unsqueeze(-2), self.means, self.logvars)  # (..., M)
        return torch.logsumexp(per_component + self.log_weights(), dim=-1)

    def component_kls(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """(B, M): KL(q || p_m) for each image and component."""
        return gaussian_kl(mu.unsqueeze(1), logvar.unsqueeze(1), self.means, self.logvars)

    def kl_bound(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        m = self.components
        assignment = -(math.log(m) + self.log_weights()).mean()  # sum_m (1/M) ln(1 / (M pi_m))
        return assignment + self.component_kls(mu, logvar).mean(1)

    def kl_tight(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(self.log_weights() - self.component_kls(mu, logvar), dim=1)

    def kl_mc(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, mu, logvar) - self.log_prob(z)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.estimator == "bound":
            return self.kl_bound(mu, logvar)
        if self.estimator == "tight":
            return self.kl_tight(mu, logvar)
        return self.kl_mc(mu, logvar, z)

    def sample(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        which = torch.multinomial(self.log_weights().exp(), n, replacement=True)
        noise = torch.randn(n, self.latent_dim, device=self.means.device)
        return (self.means[which] + noise * (0.5 * self.logvars[which]).exp()).detach()

    def landmarks(self) -> torch.Tensor:
        """The components' means."""
        return self.means.detach()

    @torch.no_grad()
    def metrics(self, vae, images: torch.Tensor, batch: int) -> dict[str, float]:
        """Per-image means of the three KL estimates (``kl_mc``, ``kl_bound``, ``kl_tight``),
        and the bounds' gaps to the MC one (``kl_bound_gap``, ``kl_tight_gap``)."""
        per_image = {"mc": [], "bound": [], "tight": []}  # on the device until the read-back
        for x in images.split(batch):
            mu, logvar = vae.encode(x)
            z = vae.reparameterize(mu, logvar)
            per_image["mc"].append(self.kl_mc(mu, logvar, z))
            per_image["bound"].append(self.kl_bound(mu, logvar))
            per_image["tight"].append(self.kl_tight(mu, logvar))
        kls = {f"kl_{name}": torch.cat(values).double().mean().item() for name, values in per_image.items()}
        for name in ("bound", "tight"):
            kls[f"kl_{name}_gap"] = kls[f"kl_{name}"] - kls["kl_mc"]
        return kls
