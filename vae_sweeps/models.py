"""The architecture axis: encoders and symmetric decoders for 28x28 grey images.

An encoder maps images (B, 1, 28, 28) to (B, 2 * latent_dim), the concatenated mean and
log-variance of q(z|x); its decoder maps z (B, latent_dim) back to logits (B, 1, 28, 28),
through the same widths in reverse.

- ``mlp2``, ``mlp3``, ``mlp4``: 2, 3 or 4 linear layers in the encoder (so 1, 2 or 3 hidden
  layers, widths ``hidden``), ReLU between them, and as many in the decoder.
- ``cnn``: 3x3 convolutions of stride 2 (channels ``channels``; 28 -> 14 -> 7), then dense
  layers ``hidden``; the decoder mirrors it with transposed convolutions.
"""

from __future__ import annotations

from torch import nn

IMAGE_SHAPE = (1, 28, 28)
PIXELS = 28 * 28

# Linear layers in the encoder of each MLP; hidden widths are one fewer.
MLP_DEPTHS = {"mlp2": 2, "mlp3": 3, "mlp4": 4}
ARCHITECTURES = (*MLP_DEPTHS, "cnn")


def dense(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through ``sizes`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return layers


def build_mlp(hidden: list[int], latent_dim: int) -> tuple[nn.Module, nn.Module]:
    encoder = nn.Sequential(nn.Flatten(), *dense([PIXELS, *hidden, 2 * latent_dim]))
    decoder = nn.Sequential(*dense([latent_dim, *reversed(hidden), PIXELS]), nn.Unflatten(1, IMAGE_SHAPE))
    return encoder, decoder


def build_cnn(channels: list[int], hidden: list[int], latent_dim: int) -> tuple[nn.Module, nn.Module]:
    sides = [IMAGE_SHAPE[1]]
    for _ in channels:
        sides.append((sides[-1] + 1) // 2)  # a 3x3 convolution of stride 2, padding 1
    features = channels[-1] * sides[-1] ** 2
    chans = [IMAGE_SHAPE[0], *channels]

    encoder: list[nn.Module] = []
    for c_in, c_out in zip(chans, chans[1:]):
        encoder += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
    encoder += [nn.Flatten(), *dense([features, *hidden, 2 * latent_dim])]

    decoder: list[nn.Module] = [*dense([latent_dim, *reversed(hidden), features]), nn.ReLU(),
                                nn.Unflatten(1, (channels[-1], sides[-1], sides[-1]))]
    steps = list(zip(reversed(chans), reversed(chans[:-1]), reversed(sides), reversed(sides[:-1])))
    for i, (c_in, c_out, side_in, side_out) in enumerate(steps):
        # output_padding picks the even or odd output side (7 -> 14, 4 -> 7)
        decoder.append(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1,
                                          output_padding=side_out - 2 * side_in + 1))
        if i < len(steps) - 1:
            decoder.append(nn.ReLU())
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


def build(name: str, latent_dim: int, hidden: list[int], channels: list[int] | None = None
          ) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of architecture ``name``; see the module docstring."""
    if name in MLP_DEPTHS:
        return build_mlp(list(hidden), latent_dim)
    if name == "cnn":
        return build_cnn(list(channels or []), list(hidden), latent_dim)
    raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}")
