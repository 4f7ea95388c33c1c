"""A reconstruction loss of your own: the Huber loss of examples/conf/loss/huber.yaml
(loss=huber loss.delta=d).

A loss is a function of the decoder's logits and the images that returns one value per image;
vae_sweeps calls it with the option's settings other than ``name`` and ``c`` as keyword
arguments (here ``delta``), weighs it by ``c`` and averages it over the batch.
"""

import torch
import torch.nn.functional as F


def huber(logits: torch.Tensor, x: torch.Tensor, delta: float = 0.1) -> torch.Tensor:
    """sum_i h(sigmoid(logit_i) - x_i) per image, h(r) = r^2 / 2 for |r| <= delta, else
    delta * (|r| - delta / 2)."""
    return F.huber_loss(torch.sigmoid(logits), x, delta=delta, reduction="none").flatten(1).sum(1)
