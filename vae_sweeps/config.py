"""Checks of the composed config, run at the start of every job before any training.

Hydra overrides bypass dataclass checks, so each value that the study's axes or the
trainer take is checked here; the first bad one raises a ConfigError whose message names
the key, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import urlsplit

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_sweeps import models, priors
from vae_sweeps.data import DATASETS, TRAIN_IMAGES
from vae_sweeps.errors import ConfigError, refuse_password
from vae_sweeps.losses import RECON_LOSSES
from vae_sweeps.models import ARCHITECTURES, MLP_DEPTHS
from vae_sweeps.module import OPTIMIZERS
from vae_sweeps.priors import KL_ESTIMATORS, PRIORS

# The most parameters a model may have: 4 GB of float32 weights, 16 GB with their gradients and
# Adam's two moments.
MAX_PARAMETERS = 10**9
# The schemes of the tracking stores that MLflow opens (postgresql+psycopg://... too); MLflow 3
# no longer opens its file store (./mlruns, file:...).
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _fail(key: str, value, allowed: str) -> None:
    raise ConfigError(f"{key}={_plain(value)!r} is not allowed: {allowed}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(key: str, value, allowed, how: str) -> None:
    if value not in allowed:
        _fail(key, value, f"choose one of {', '.join(allowed)} ({how})")


def _int_at_least(key: str, value, low: int, example: str) -> None:
    if not _is_int(value) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        _fail(key, value, f"it must be {kind}, e.g. {key}={example}")


def _positive_finite(key: str, value, example: str) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        _fail(key, value, f"it must be a finite number > 0, e.g. {key}={example}")


def _widths(key: str, value, count: int | None, example: str, least: int = 0) -> None:
    """A list of positive integers: exactly ``count`` of them, or (count None) at least ``least``."""
    widths = _plain(value)
    ok = isinstance(widths, list) and all(_is_int(w) and w > 0 for w in widths)
    if not ok or len(widths) != (len(widths) if count is None else count) or len(widths) < least:
        need = f"exactly {count}" if count is not None else f"at least {least}"
        _fail(key, value, f"it must be a list of {need} positive integers, e.g. {key}={example}")


def parameter_count(model: DictConfig, prior: DictConfig) -> int | None:
    """The parameters of the VAE that these settings build, counted on PyTorch's meta device
    (shapes only, no memory); None if a shape is beyond what PyTorch can describe."""
    try:
        with torch.device("meta"):
            modules = [*models.build(model.name, model.latent_dim, model.hidden, model.get("channels")),
                       priors.build(_plain(prior), model.latent_dim)]
    except (RuntimeError, TypeError):  # "Storage size calculation overflowed", "Overflow when unpacking long"
        return None
    return sum(p.numel() for module in modules for p in module.parameters())


def _model_size(model: DictConfig, prior: DictConfig) -> None:
    count = parameter_count(model, prior)
    if count is None or count > MAX_PARAMETERS:
        sizes = [f"model.{key}={_plain(model[key])}" for key in ("latent_dim", "hidden", "channels")
                 if model.get(key) is not None]
        sizes += [f"prior.components={prior.components}"] if prior.name == "gmm" else []
        has = f"{count:,} parameters" if count is not None else "more parameters than PyTorch can count"
        raise ConfigError(f"{sizes[0]} with {', '.join(sizes[1:])} is not allowed: this {model.name} would have "
                          f"{has}, more than {MAX_PARAMETERS:,} (16 GB of float32 weights, gradients and Adam's "
                          "moments); choose smaller sizes, e.g. model.latent_dim=2.")


def _tracking_uri(key: str, uri) -> None:
    refuse_password(key, str(uri))  # first: the message below shows the URI
    try:
        parts = urlsplit(str(uri))
    except ValueError:  # not a URL
        parts = urlsplit("")
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg://...
    if scheme == "sqlite":
        ok = str(uri).startswith("sqlite:///")
    elif scheme in ("http", "https"):
        ok = bool(parts.hostname)
    else:
        ok = scheme in TRACKING_SCHEMES
    if not isinstance(uri, str) or not ok:
        _fail(key, uri, "it must be a SQLite database (sqlite:///mlruns/mlflow.db, the default), a tracking server "
              "(http://127.0.0.1:5000 from make server, or https://...) or a database server (postgresql://..., "
              "mysql://..., mssql://...); MLflow 3 no longer opens file stores such as ./mlruns")


def validate_tracking(cfg: DictConfig) -> None:
    """The tracking settings: the URI (and MLFLOW_TRACKING_URI, which wins over it) and the
    experiment. Part of ``validate``; a sweep also checks them alone, before it creates the store."""
    _tracking_uri("tracking.uri", cfg.tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        _tracking_uri("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
    experiment = cfg.tracking.experiment
    if not isinstance(experiment, str) or not experiment.strip():
        _fail("tracking.experiment", experiment, "it must be a non-empty name, e.g. tracking.experiment=vae_sweeps")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first value that is not allowed; then store float settings
    as floats, so that ``loss.c=1`` and ``loss.c=1.0`` log (and group) as one setting."""
    model, loss, data = cfg.model, cfg.loss, cfg.data
    _choice("model.name", model.name, ARCHITECTURES, "model=<name> on the command line")
    _int_at_least("model.latent_dim", model.latent_dim, 1, "2 (the study uses 1, 2, 5, 10, 20)")
    if model.name in MLP_DEPTHS:
        depth = MLP_DEPTHS[model.name]
        _widths("model.hidden", model.hidden, depth - 1, f"[{', '.join(['256'] * (depth - 1))}] "
                f"({model.name} has {depth - 1} hidden layer(s))")
    else:
        _widths("model.channels", model.get("channels"), None, "[32,64]", least=1)
        _widths("model.hidden", model.hidden, None, "[256]")

    _choice("loss.name", loss.name, list(RECON_LOSSES), "loss=<name> on the command line")
    _positive_finite("loss.c", loss.c, "1.0")

    prior = cfg.prior
    _choice("prior.name", prior.name, PRIORS, "prior=<name> on the command line")
    if prior.name == "gmm":
        _int_at_least("prior.components", prior.components, 1, "10")
        _choice("prior.kl", prior.kl, KL_ESTIMATORS, "prior.kl=<estimator>")
    _model_size(model, prior)

    _choice("data.name", data.name, list(DATASETS), "data=<name> on the command line")
    _int_at_least("data.batch_size", data.batch_size, 1, "128")
    _int_at_least("data.val_size", data.val_size, 1, "5000")
    root = Path(str(data.root))
    if root.exists() and not root.is_dir():
        _fail("data.root", str(data.root), "it must be a directory, the one that holds MNIST/raw/ or "
              "FashionMNIST/raw/ (set data.root=... or VAE_SWEEPS_DATA_DIR)")

    _int_at_least("trainer.max_epochs", cfg.trainer.max_epochs, 1, "30")
    _int_at_least("eval.iw_samples", cfg.eval.iw_samples, 1, "50")
    _int_at_least("eval.knn_k", cfg.eval.knn_k, 1, "5")
    train_images = TRAIN_IMAGES - data.val_size  # the k-NN's reference set
    if 0 < train_images < cfg.eval.knn_k:
        _fail("eval.knn_k", cfg.eval.knn_k, f"it must be at most the number of training images, {train_images} "
              f"({TRAIN_IMAGES} less data.val_size={data.val_size}), e.g. eval.knn_k=5")
    _int_at_least("eval.judge_epochs", cfg.eval.judge_epochs, 1, "5")
    _int_at_least("jobs_per_gpu", cfg.jobs_per_gpu, 1, "4")
    _choice("optim.name", cfg.optim.name, list(OPTIMIZERS), "optim.name=<name>")
    _positive_finite("optim.lr", cfg.optim.lr, "0.001")
    _int_at_least("seed", cfg.seed, 0, "0")
    if cfg.get("threads") is not None:
        _int_at_least("threads", cfg.threads, 1, "2")
    validate_tracking(cfg)

    loss.c = float(loss.c)
    cfg.optim.lr = float(cfg.optim.lr)
