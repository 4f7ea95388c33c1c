"""A training step never waits for the device, and a non-finite loss still fails the run with
the epoch and step where it first appeared, before that epoch is checkpointed."""

import math
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from conftest import all_runs, tmp_store

from vae_sweeps import runs
from vae_sweeps.data import TensorBatches
from vae_sweeps.module import NonFiniteLoss, VAEModule
from vae_sweeps.train import train

SMALL = ("model=mlp2", "model.hidden=[64]")
# Tensor methods that read a value back to the host: on a GPU each waits for the queued work.
READ_BACKS = ("item", "__bool__", "__float__", "__int__", "tolist")


class InMemory(pl.LightningDataModule):
    """80 random training images and 16 validation ones, batched as the project batches them."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.x, self.y = torch.rand(96, 1, 28, 28), torch.zeros(96, dtype=torch.long)

    def train_dataloader(self):
        return TensorBatches(self.x[:80], self.y[:80], self.batch_size, shuffle=True)

    def val_dataloader(self):
        return TensorBatches(self.x[80:], self.y[80:], self.batch_size)


def small_module() -> VAEModule:
    return VAEModule(model={"name": "mlp2", "latent_dim": 2, "hidden": [32]}, loss={"name": "bce", "c": 1.0},
                     optim={"name": "adam", "lr": 1e-3})


def fit(module: VAEModule, batch_size: int, epochs: int = 2, progress_bar: bool = False) -> None:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress_bar, enable_model_summary=False)
    trainer.fit(module, datamodule=InMemory(batch_size))


def counting_read_backs(monkeypatch) -> tuple[Counter, Counter]:
    """(every read-back during the test, those made inside VAEModule.training_step)."""
    everywhere, in_step = Counter(), Counter()
    inside = [False]

    def counted(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            everywhere[name] += 1
            in_step[name] += inside[0]
            return original(self, *args, **kwargs)
        return method

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    training_step = VAEModule.training_step

    def watched(self, batch, batch_idx):
        inside[0] = True
        try:
            return training_step(self, batch, batch_idx)
        finally:
            inside[0] = False

    monkeypatch.setattr(VAEModule, "training_step", watched)
    return everywhere, in_step


@pytest.mark.parametrize("progress_bar", [False, True])  # a terminal's run shows Lightning's bar
def test_training_steps_read_nothing_back_from_the_device(monkeypatch, progress_bar):
    everywhere, in_step = counting_read_backs(monkeypatch)
    fit(small_module(), batch_size=8, progress_bar=progress_bar)  # 10 training steps per epoch
    per_10_steps = Counter(everywhere)
    assert sum(in_step.values()) == 0  # the non-finite check runs at the epoch's end
    everywhere.clear()
    fit(small_module(), batch_size=4, progress_bar=progress_bar)  # 20 steps per epoch, twice the validation steps
    assert everywhere == per_10_steps  # what is read back depends on the epochs, not on the steps
    assert sum(in_step.values()) == 0


def test_the_check_within_an_epoch_reads_one_number(monkeypatch):
    _, in_step = counting_read_backs(monkeypatch)
    monkeypatch.setattr(VAEModule, "check_every", 5)
    fit(small_module(), batch_size=4)  # 20 steps per epoch: looks after steps 5, 10, 15 and 20
    assert in_step == Counter(item=4 * 2)


def turn_nan_from(monkeypatch, first_bad_step: int) -> list[int]:
    """Make the training loss NaN from global step ``first_bad_step`` on (1-based); returns
    the list that collects the step of every training loss computed."""
    steps = []
    original = VAEModule._step

    def _step(self, batch, stage):
        loss = original(self, batch, stage)
        if stage != "train":
            return loss
        steps.append(self.global_step + 1)
        return loss * math.nan if self.global_step + 1 >= first_bad_step else loss

    monkeypatch.setattr(VAEModule, "_step", _step)
    return steps


def test_a_nan_at_a_later_step_fails_the_run_with_its_epoch_and_step_and_no_checkpoint(make_cfg, tmp_path,
                                                                                       monkeypatch):
    # 80 training images in batches of 16: epoch 2 holds steps 6 to 10, and the NaN starts at
    # step 8; every later loss is NaN too, and the first one is reported
    turn_nan_from(monkeypatch, 8)
    cfg = make_cfg("trainer.max_epochs=3", *SMALL)
    with pytest.raises(NonFiniteLoss, match=r"^train/loss is nan at epoch 2, step 8$"):
        train(cfg)
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "NonFiniteLoss: train/loss is nan at epoch 2, step 8"
    assert [m.step for m in tmp_store(tmp_path).get_metric_history(run.info.run_id, "train/loss")] == [1]
    checkpoint = torch.load(runs.checkpoint_path(tmp_path / "out", run.info.run_id), weights_only=True)
    assert checkpoint["global_step"] == 5  # the last checkpoint is epoch 1's: epoch 2 was never saved


def test_a_check_within_the_epoch_stops_training_at_once(monkeypatch):
    steps = turn_nan_from(monkeypatch, 12)  # 10 steps per epoch: epoch 2's second step
    monkeypatch.setattr(VAEModule, "check_every", 4)
    with pytest.raises(NonFiniteLoss, match=r"^train/loss is nan at epoch 2, step 12$"):
        fit(small_module(), batch_size=8, epochs=3)
    assert steps == list(range(1, 15))  # the look after epoch 2's fourth step (step 14) stopped it
