"""The reconstruction-loss axis (the KL term belongs to the prior: priors.py).

Every function returns one value per image, summed over the 784 pixels; the VAE averages
over the batch. The decoder returns logits: BCE is computed from them directly (numerically
stable), L1 and L2 on the pixel means sigmoid(logits).
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

