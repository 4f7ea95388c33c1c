"""The reconstruction-loss axis, and the KL term of the standard-normal prior.

Every function returns one value per image, summed over the 784 pixels (or the latent
dimensions); the VAE averages over the batch. The decoder returns logits: BCE is computed
from them directly (numerically stable), L1 and L2 on the pixel means sigmoid(logits).
"""

import torch
import torch.nn.functional as F


def bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def l1(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) - x).abs().flatten(1).sum(1)


def l2(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(logits) - x).square().flatten(1).sum(1)


RECON_LOSSES = {"bce": bce, "l1": l1, "l2": l2}


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per image:
    sum_j -log sigma_j + (sigma_j^2 + mu_j^2) / 2 - 1/2, with log sigma = logvar / 2."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)
