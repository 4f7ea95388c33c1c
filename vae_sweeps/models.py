"""The architecture axis: encoders and symmetric decoders.

A model option (``conf/model/<name>.yaml``) names its builder as ``_target_``, which is called
with the option's settings (``latent_dim`` among them) and the dataset's ``image_shape``
(channels, height, width), and returns ``(encoder, decoder)``: the encoder maps images
(B, C, H, W) to (B, 2 * latent_dim), the concatenated mean and log-variance of q(z|x); the
decoder maps z (B, latent_dim) back to logits (B, C, H, W). A builder checks its own
settings and raises ``errors.BadValue`` for a bad one. Your own architecture is a function or
class of this shape in your own package, and a config file that names it (docs/extending.md).

- ``mlp``: ``layers`` linear layers in the encoder (so ``layers - 1`` hidden layers, widths
  ``hidden``), ReLU between them, and as many in the decoder (``mlp2``, ``mlp3``, ``mlp4``).
- ``cnn``: 3x3 convolutions of stride 2 (channels ``channels``; 28 -> 14 -> 7), then dense
  layers ``hidden``; the decoder mirrors it with transposed convolutions.
"""

from __future__ import annotations

import math

from torch import nn

from vae_sweeps.errors import BadValue, positive_int

def widths(key: str, value, example: str, count: int | None = None, least: int = 0) -> list[int]:
    """``value`` as a list of positive integers: exactly ``count`` of them, or (count None) at
    least ``least``; else BadValue."""
    ok = isinstance(value, (list, tuple)) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                                   for w in value)
    if not ok or (count is not None and len(value) != count) or len(value) < least:
        need = f"exactly {count}" if count is not None else f"at least {least}"
        raise BadValue(key, value, f"it must be a list of {need} positive integers, e.g. {example}")
    return list(value)


def dense(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through ``sizes`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return layers


def mlp(latent_dim: int, hidden: list[int], layers: int, image_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """An MLP of ``layers`` linear layers each way, through the widths ``hidden``."""
    positive_int("layers", layers, "3")
    example = f"[{', '.join(['256'] * (layers - 1))}] (an MLP of {layers} layers has {layers - 1} hidden layer(s))"
    hidden = widths("hidden", hidden, example, count=layers - 1)
    pixels = math.prod(image_shape)
    encoder = nn.Sequential(nn.Flatten(), *dense([pixels, *hidden, 2 * latent_dim]))
    decoder = nn.Sequential(*dense([latent_dim, *reversed(hidden), pixels]), nn.Unflatten(1, tuple(image_shape)))
    return encoder, decoder


def cnn(latent_dim: int, channels: list[int], hidden: list[int], image_shape: tuple[int, ...]
        ) -> tuple[nn.Module, nn.Module]:
    """3x3 convolutions of stride 2 through ``channels``, then dense layers ``hidden``; mirrored."""
    channels = widths("channels", channels, "[32, 64]", least=1)
    hidden = widths("hidden", hidden, "[256]")
    sides = [tuple(image_shape[1:])]
    for _ in channels:
        sides.append(tuple((side + 1) // 2 for side in sides[-1]))  # a 3x3 convolution of stride 2, padding 1
    features = channels[-1] * math.prod(sides[-1])
    chans = [image_shape[0], *channels]

    encoder: list[nn.Module] = []
    for c_in, c_out in zip(chans, chans[1:]):
        encoder += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
    encoder += [nn.Flatten(), *dense([features, *hidden, 2 * latent_dim])]

    decoder: list[nn.Module] = [*dense([latent_dim, *reversed(hidden), features]), nn.ReLU(),
                                nn.Unflatten(1, (channels[-1], *sides[-1]))]
    steps = list(zip(reversed(chans), reversed(chans[:-1]), reversed(sides), reversed(sides[:-1])))
    for i, (c_in, c_out, side_in, side_out) in enumerate(steps):
        # output_padding picks the even or odd output side (7 -> 14, 4 -> 7)
        padding = tuple(out - 2 * size_in + 1 for out, size_in in zip(side_out, side_in))
        decoder.append(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=padding))
        if i < len(steps) - 1:
            decoder.append(nn.ReLU())
    return nn.Sequential(*encoder), nn.Sequential(*decoder)
