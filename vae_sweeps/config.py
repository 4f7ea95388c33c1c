"""Checks of the composed config, run at the start of every job before any training.

Hydra overrides bypass dataclass checks, so each value that the study's axes or the
trainer take is checked here; the first bad one raises a ConfigError whose message names
the key, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_sweeps.data import DATASETS
from vae_sweeps.errors import ConfigError
from vae_sweeps.losses import RECON_LOSSES
from vae_sweeps.models import ARCHITECTURES, MLP_DEPTHS
from vae_sweeps.module import OPTIMIZERS
from vae_sweeps.priors import KL_ESTIMATORS, PRIORS


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
    _choice("optim.name", cfg.optim.name, list(OPTIMIZERS), "optim.name=<name>")
    _positive_finite("optim.lr", cfg.optim.lr, "0.001")
    _int_at_least("seed", cfg.seed, 0, "0")
    if cfg.get("threads") is not None:
        _int_at_least("threads", cfg.threads, 1, "2")

    loss.c = float(loss.c)
    cfg.optim.lr = float(cfg.optim.lr)
