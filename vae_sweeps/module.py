"""The LightningModule: a VAE, its optimiser, and the per-epoch metrics it logs."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from vae_sweeps import models
from vae_sweeps.vae import VAE

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "sgd": torch.optim.SGD,
}


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover and is stopped."""


class VAEModule(pl.LightningModule):
    """Logs ``{train,val,test}/{loss,recon,kl}`` as per-image means over each epoch.

    Its hyper-parameters are plain dicts (the ``model``, ``loss`` and ``optim`` config
    groups), so a checkpoint loads with ``weights_only=True``.
    """

    def __init__(self, model: dict, loss: dict, optim: dict):
        super().__init__()
        self.save_hyperparameters()
        encoder, decoder = models.build(model["name"], model["latent_dim"], model["hidden"], model.get("channels"))
        self.vae = VAE(encoder, decoder, model["latent_dim"], recon=loss["name"], c=loss["c"])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.vae(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, _ = batch
        losses = self.vae.loss(x, self.vae(x))
        self.log(f"{stage}/loss", losses["loss"], on_step=False, on_epoch=True, batch_size=len(x), prog_bar=True)
        self.log_dict({f"{stage}/{k}": losses[k] for k in ("recon", "kl")},
                      on_step=False, on_epoch=True, batch_size=len(x))
        return losses["loss"]

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"train/loss is {loss.item()} at epoch {self.current_epoch + 1}, "
                                f"step {self.global_step + 1}")
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        optim = self.hparams.optim
        return OPTIMIZERS[optim["name"]](self.parameters(), lr=optim["lr"])
