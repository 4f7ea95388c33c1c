"""The LightningModule: a VAE, its optimiser, and the per-epoch metrics it logs."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from vae_sweeps import losses, options
from vae_sweeps.optimizers import FUSED, OPTIMIZERS
from vae_sweeps.vae import VAE

METRICS = ("loss", "recon", "kl")
# Training steps between two looks for a non-finite loss. A look reads one number back from
# the device, which on a GPU waits for every step queued so far, so it is not done every step;
# the end of each epoch looks too, before the epoch's checkpoint is saved.
CHECK_EVERY = 100


def build_vae(model: dict, prior: dict, loss: dict, image_shape: tuple[int, ...]) -> VAE:
    """The VAE of these options (the configs of the ``model``, ``prior`` and ``loss`` axes) for
    images of ``image_shape``."""
    encoder, decoder = options.build("model", model, image_shape=tuple(image_shape))
    prior = options.build("prior", prior, latent_dim=model["latent_dim"])
    return VAE(encoder, decoder, prior, recon_loss=losses.recon_loss(loss), c=loss["c"])


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
    config groups) and the dataset's image shape, so a checkpoint loads with
    ``weights_only=True``; the model and prior are built from their options (options.build).

    A training step never waits for the device: a non-finite loss is noted on the device
    (the first such step and its loss), and looked for every ``check_every`` steps and at
    the end of each epoch, which raises NonFiniteLoss with the epoch and step where it first
    appeared. Lightning calls the epoch-end hook before the checkpoint callback, so an
    epoch with a NaN is never saved.
    """

    check_every = CHECK_EVERY

    def __init__(self, model: dict, loss: dict, optim: dict, prior: dict | None = None,
                 image_shape: tuple[int, ...] = (1, 28, 28)):  # a checkpoint from before it was a setting: MNIST's
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.vae = build_vae(model, prior or options.default("prior"), loss, image_shape)
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}  # stage: (sums of METRICS, images)
        self.bad_step: torch.Tensor | None = None  # the first step with a non-finite loss; 0: none yet
        self.bad_loss: torch.Tensor | None = None  # that step's loss

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
        self._note_non_finite(loss.detach())
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        if (batch_idx + 1) % self.check_every == 0:
            self._check_finite()

    def _note_non_finite(self, loss: torch.Tensor) -> None:
        """Keep the first step whose loss is not finite, with device operations only (no sync)."""
        if self.bad_step is None:
            self.bad_step = torch.zeros((), dtype=torch.long, device=loss.device)
            self.bad_loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(first, self.global_step + 1, self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)

    def _check_finite(self) -> None:
        """Raise NonFiniteLoss if a step of this epoch had a non-finite loss: one sync."""
        if self.bad_step is not None and self.bad_step.item():
            raise NonFiniteLoss(f"train/loss is {self.bad_loss.item()} at epoch {self.current_epoch + 1}, "
                                f"step {self.bad_step.item()}")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        self._check_finite()  # every epoch ends here, so a bad step is always in the current epoch
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the random state with the epoch (z's noise draws from it), so that a resumed
        run continues exactly as one that never stopped (the data order is a function of the
        seed and the epoch: data.TensorBatches)."""
        cuda = self.device.type == "cuda"  # this job's GPU only: touching every GPU would open a context on each
        checkpoint["rng_state"] = {"cpu": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_rng = checkpoint.get("rng_state")

    def on_train_start(self) -> None:
        """Restore a resumed run's random state here, after Lightning's sanity-check
        validation (which draws noise too) and just before the next epoch."""
        state, self._resumed_rng = getattr(self, "_resumed_rng", None), None
        if state is not None:
            torch.set_rng_state(state["cpu"])
            if isinstance(state.get("cuda"), torch.Tensor) and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.device)

    def configure_optimizers(self):
        optim = self.hparams.optim
        fused = {"fused": True} if optim["name"] in FUSED else {}
        return OPTIMIZERS[optim["name"]](self.parameters(), lr=optim["lr"], **fused)
