"""One job: check the config, load the data, train, test, and track it all in MLflow."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from vae_sweeps import figures, tracking
from vae_sweeps.config import validate
from vae_sweeps.data import ImageDataModule
from vae_sweeps.module import VAEModule

log = logging.getLogger(__name__)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())
# Lightning 2.6 with torch >= 2.10 warns about its own use of a torch API; nothing to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def make_datamodule(cfg: DictConfig) -> ImageDataModule:
    data = cfg.data
    return ImageDataModule(name=data.name, root=str(data.root), download=data.download,
                           batch_size=data.batch_size, val_size=data.val_size, seed=cfg.seed)


def make_trainer(cfg: DictConfig, callbacks: list[pl.Callback], output_dir: Path) -> pl.Trainer:
    options = plain(cfg.trainer)
    if options.get("enable_progress_bar") is None:  # a bar in a terminal, none in logs
        options["enable_progress_bar"] = sys.stderr.isatty()
    return pl.Trainer(**options, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      default_root_dir=output_dir)


def caption(cfg: DictConfig, run_id: str) -> str:
    return (f"{cfg.model.name} | {cfg.loss.name} | latent dim {cfg.model.latent_dim} | c = {cfg.loss.c:g} | "
            f"{cfg.data.name} | seed {cfg.seed} | {cfg.trainer.max_epochs} epochs | run {run_id[:8]}")


def log_figures(client, run_id: str, module: VAEModule, datamodule: ImageDataModule, text: str) -> None:
    curves = {stage: [(m.step, m.value) for m in client.get_metric_history(run_id, f"{stage}/loss")]
              for stage in ("train", "val")}
    images, labels = datamodule.splits["test"]
    for name, fig in figures.run_figures(module.vae, images, labels, datamodule.classes, curves, text).items():
        client.log_figure(run_id, fig, f"figures/{name}.png")


def train(cfg: DictConfig) -> dict:
    """Run one job of the study; returns its test metrics and MLflow run id.

    Bad config values and missing or damaged data raise (ConfigError, DataError) before an
    MLflow run exists. Once the run exists, it ends FINISHED, or FAILED (KILLED on an
    interrupt) with the reason in its ``error`` tag.
    """
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = make_datamodule(cfg)
    datamodule.load()

    client, experiment_id = tracking.open_store(tracking.resolve_uri(cfg.tracking.uri), cfg.tracking.experiment)
    run_id = tracking.start_run(client, experiment_id, cfg, output_dir)
    log.info("MLflow run %s (%s)", run_id, tracking.run_name(cfg))
    try:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = VAEModule(model=plain(cfg.model), loss=plain(cfg.loss), optim=plain(cfg.optim))
        trainer = make_trainer(cfg, [tracking.MLflowMetrics(client, run_id)], output_dir)
        trainer.fit(module, datamodule=datamodule)
        test = trainer.test(module, datamodule=datamodule, verbose=False)[0]

        checkpoint = output_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(checkpoint, weights_only=False)  # with optimizer state
        client.log_artifact(run_id, str(checkpoint), "checkpoints")
        log_figures(client, run_id, module, datamodule, caption(cfg, run_id))
    except BaseException as err:
        interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, **{k: float(v) for k, v in test.items()}}
