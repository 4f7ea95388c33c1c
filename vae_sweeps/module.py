"""The LightningModule: a VAE, its optimiser, and the per-epoch metrics it logs."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from vae_sweeps import models, priors
from vae_sweeps.vae import VAE

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "sgd": torch.optim.SGD,
}
# torch's fused kernels do one optimizer step in one pass over the parameters, on CPU and
# GPU: the same update, about 25% less time per training step for the MLPs here (make bench).
FUSED = {"adam", "adamw", "sgd"}
METRICS = ("loss", "recon", "kl")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover and is stopped."""


class VAEModule(pl.LightningModule):
    """Logs ``{train,val,test}/{loss,recon,kl}``, the per-image means over each epoch, at
    the end of the epoch (so callbacks and the progress bar see epoch means).

    Two choices keep a training step as fast as a plain PyTorch loop (``make bench``):
    the sums are kept here, one tensor update per step, because Lightning's ``self.log``
    costs about 0.6 ms a call on the CPU; and the optimiser is stepped by hand (Lightning's
    manual optimisation, the same zero_grad, backward and step) because the automatic
    closure machinery costs about 0.4 ms a step. Lightning therefore refuses
    ``trainer.gradient_clip_val`` and ``trainer.accumulate_grad_batches`` with a clear error.
    Its hyper-parameters are plain dicts (the ``model``, ``loss``, ``optim`` and ``prior``
    config groups), so a checkpoint loads with ``weights_only=True``.
    """

    def __init__(self, model: dict, loss: dict, optim: dict, prior: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        encoder, decoder = models.build(model["name"], model["latent_dim"], model["hidden"], model.get("channels"))
        self.vae = VAE(encoder, decoder, model["latent_dim"], recon=loss["name"], c=loss["c"],
                       prior=priors.build(prior or {"name": "standard"}, model["latent_dim"]))
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}  # stage: (sums of METRICS, images)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.vae(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, _ = batch
        losses = self.vae.loss(x, self.vae(x))
        batch_sums = torch.stack([losses[name] for name in METRICS]).detach() * len(x)
        sums, images = self.sums.get(stage, (0.0, 0))
        self.sums[stage] = (sums + batch_sums, images + len(x))
        return losses["loss"]

    def _log_epoch(self, stage: str) -> None:
        sums, images = self.sums.pop(stage, (None, 0))
        if images:
            self.log_dict({f"{stage}/{name}": value for name, value in zip(METRICS, sums / images)},
                          prog_bar=stage != "test")

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"train/loss is {loss.item()} at epoch {self.current_epoch + 1}, "
                                f"step {self.global_step + 1}")
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        optim = self.hparams.optim
        fused = {"fused": True} if optim["name"] in FUSED else {}
        return OPTIMIZERS[optim["name"]](self.parameters(), lr=optim["lr"], **fused)
