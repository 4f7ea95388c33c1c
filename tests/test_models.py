"""Every architecture at every latent dimension of the study: shapes and documented widths."""

import pytest
import torch
from conftest import CONF_DIR
from omegaconf import OmegaConf
from torch import nn

from vae_sweeps import models
from vae_sweeps.module import VAEModule

LATENT_DIMS = [1, 2, 5, 10, 20]


def make_module(name: str, latent_dim: int) -> VAEModule:
    """The module built from conf/model/<name>.yaml at ``latent_dim``."""
    model = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))
    return VAEModule(model={**model, "latent_dim": latent_dim},
                     loss={"name": "bce", "c": 1.0}, optim={"name": "adam", "lr": 1e-3})


@pytest.mark.parametrize("latent_dim", LATENT_DIMS)
@pytest.mark.parametrize("name", ["mlp2", "mlp3", "mlp4", "cnn"])
def test_shapes(name, latent_dim):
    vae = make_module(name, latent_dim).vae
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, latent_dim)
    out = vae(x)
    assert out["z"].shape == (3, latent_dim)
    assert out["logits"].shape == (3, 1, 28, 28)
    samples = vae.sample(4)
    assert samples.shape == (4, 1, 28, 28)
    assert 0.0 <= samples.min().item() and samples.max().item() <= 1.0
    assert vae.reconstruct(x).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("name, widths", [
    ("mlp2", [(784, 1024), (1024, 4)]),
    ("mlp3", [(784, 1024), (1024, 512), (512, 4)]),
    ("mlp4", [(784, 1024), (1024, 512), (512, 256), (256, 4)]),
])
def test_mlp_layers_are_the_documented_widths_and_the_decoder_mirrors_them(name, widths):
    vae = make_module(name, 2).vae
    encoder = [(m.in_features, m.out_features) for m in vae.encoder if isinstance(m, nn.Linear)]
    decoder = [(m.in_features, m.out_features) for m in vae.decoder if isinstance(m, nn.Linear)]
    assert encoder == widths
    mirrored = [(b, a) for a, b in reversed(widths)]
    mirrored[0] = (2, mirrored[0][1])  # the decoder starts from z, not (mu, logvar)
    assert decoder == mirrored


def test_cnn_goes_28_14_7_and_back():
    vae = make_module("cnn", 2).vae
    convs = [m for m in vae.encoder if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in convs] == [(1, 32, (2, 2)), (32, 64, (2, 2))]
    features = vae.encoder[:4](torch.zeros(1, 1, 28, 28))
    assert features.shape == (1, 64, 7, 7)
    deconvs = [m for m in vae.decoder if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in deconvs] == [(64, 32), (32, 1)]


def test_cnn_with_three_convolutions_handles_the_odd_side():
    encoder, decoder = models.cnn(3, channels=[8, 16, 16], hidden=[], image_shape=(1, 28, 28))  # 28 -> 14 -> 7 -> 4
    assert encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 6)
    assert decoder(torch.zeros(2, 3)).shape == (2, 1, 28, 28)
