"""A residual MLP: the architecture of examples/conf/model/resmlp.yaml (model=resmlp).

vae_sweeps calls ``resmlp`` with the option's settings (``latent_dim``, ``width``, ``blocks``)
and the dataset's ``image_shape`` (C, H, W), and wants ``(encoder, decoder)``: the encoder maps
images (B, C, H, W) to (B, 2 * latent_dim), the mean and log-variance of q(z|x) side by side;
the decoder maps z (B, latent_dim) to logits (B, C, H, W).

    encoder: flatten, C*H*W -> width, ``blocks`` residual blocks, -> 2 * latent_dim
    decoder: latent_dim -> width, ``blocks`` residual blocks, -> C*H*W, unflatten
"""

from __future__ import annotations

import math

from torch import nn

from vae_sweeps.errors import BadValue


class Residual(nn.Module):
    """x + Linear(ReLU(Linear(ReLU(x)))), at a constant width."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.body(x)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resmlp(latent_dim: int, width: int, blocks: int, image_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder, each ``blocks`` residual blocks of ``width`` units."""
    # vae_sweeps reports a BadValue as "model.<key>=<value> is not allowed: <allowed>." before training
    if not _is_int(width) or width < 1:
        raise BadValue("width", width, "it must be a positive integer, e.g. model.width=256")
    if not _is_int(blocks) or blocks < 0:
        raise BadValue("blocks", blocks, "it must be an integer >= 0, e.g. model.blocks=2 (0: one hidden layer)")
    pixels = math.prod(image_shape)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), *(Residual(width) for _ in range(blocks)),
                            nn.ReLU(), nn.Linear(width, 2 * latent_dim))
    decoder = nn.Sequential(nn.Linear(latent_dim, width), *(Residual(width) for _ in range(blocks)),
                            nn.ReLU(), nn.Linear(width, pixels), nn.Unflatten(1, tuple(image_shape)))
    return encoder, decoder
