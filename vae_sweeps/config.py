"""Checks of the composed config, run at the start of every job before any training.

Hydra overrides bypass dataclass checks, so each value is checked here, and the first bad
one raises a ConfigError whose message names the key, the bad value and what is allowed.
This module is a dispatcher: the settings shared by every option (``model.latent_dim``,
``loss``, ``optim``, the trainer, the evaluation, tracking) are checked here, and each axis
option (a model, dataset or prior: ours or a user's) checks its own settings when it is built
(options.build; the model and prior on PyTorch's meta device, which allocates nothing). Every
key must also be one that its reader takes: a ``trainer.*`` key an argument of Lightning's
Trainer, an option's setting an argument of its ``_target_`` (both by their signatures), and
``loss``, ``optim`` and ``eval`` only the keys the job reads (``+trainer.epochs=1`` would
otherwise fail, or be ignored, after the run was created).

Nothing here imports Lightning (the Trainer's arguments are read from its source, and a data
option is plain Python until the job trains: data.py), so that a job refuses a bad value before
it spends seconds importing Lightning (vae_sweeps/__main__.py; tests/test_layout.py).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import inspect
import math
import os
from pathlib import Path
from urllib.parse import urlsplit

import torch
from omegaconf import DictConfig, OmegaConf

from vae_sweeps import options
from vae_sweeps.errors import ConfigError, refuse_password
from vae_sweeps.losses import recon_loss
from vae_sweeps.optimizers import OPTIMIZERS
from vae_sweeps.options import plain as _plain

# The most parameters a model may have: 4 GB of float32 weights, 16 GB with their gradients and
# Adam's two moments.
MAX_PARAMETERS = 10**9
# The schemes of the tracking stores that MLflow opens (postgresql+psycopg://... too); MLflow 3
# no longer opens its file store (./mlruns, file:...).
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
# The settings of the sections that the job reads key by key, with a note on what reads them: any
# other key (``+optim.weight_decay=0.1``) would be logged as a param, and change the run's
# identity, while nothing used it.
READ_KEYS = {
    "optim": (("name", "lr"), " (the optimiser is given optim.lr alone: vae_sweeps/module.py)"),
    "eval": (("iw_samples", "knn_k", "judge_epochs"), " (read by the end-of-run evaluation: vae_sweeps/backfill.py)"),
}
# Trainer arguments that the job sets itself (train.make_trainer), and ones that cannot work with
# the model's manual optimisation (module.py), beyond their defaults.
TRAINER_SET_BY_JOB = ("callbacks", "logger", "default_root_dir")
TRAINER_MANUAL_OPTIMISATION = {"gradient_clip_val": None, "accumulate_grad_batches": 1}


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


def accepted_arguments(target) -> tuple[str, ...] | None:
    """The keyword arguments that ``target`` (a class or a function) takes, by its signature;
    None when it takes any (``**kwargs``) or has no signature to read."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _known_keys(section: str, settings: dict, accepted, owner: str, note: str = "") -> None:
    """Refuse the first key of ``settings`` (the section ``section``) that is not in ``accepted``,
    the keys that ``owner`` takes."""
    for key, value in settings.items():
        if key in accepted:
            continue
        close = sorted(difflib.get_close_matches(key, accepted, n=2))
        hint = f" (did you mean {' or '.join(f'{section}.{k}' for k in close)}?)" if close else ""
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no settings"
        _fail(f"{section}.{key}", value, f"{owner} takes no setting {key}{hint}; {takes}{note}")


def _option_keys(axis: str, option: DictConfig, given: tuple[str, ...]) -> None:
    """Each setting of an axis option must be an argument of its ``_target_`` (one that takes
    ``**kwargs`` takes any; one that cannot be imported is left to options.build to report)."""
    from hydra.utils import get_object

    settings = {key: value for key, value in option.items() if key != "name" and not str(key).startswith("_")}
    target = option.get("_target_")
    try:
        accepted = accepted_arguments(get_object(target)) if target else None
    except Exception:  # not importable: options.build says so
        return
    if accepted is not None:
        own = tuple(key for key in accepted if key not in given)
        _known_keys(axis, settings, own, f"{axis}={option.name} ({target})", f" (the job gives {', '.join(given)})")


def _loss_function(loss: DictConfig) -> None:
    """A loss option's ``_target_`` must name a function that imports, and its settings other
    than ``name`` and ``c`` (the VAE's weight of the loss) must be that function's keyword
    arguments (losses.recon_loss)."""
    target = loss.get("_target_")
    if target is None:
        _fail("loss._target_", target, "a loss option names its function, (logits, x) -> one value per image, "
              "e.g. _target_: vae_sweeps.losses.bce in conf/loss/<name>.yaml")
    try:
        recon_loss(_plain(loss))
    except Exception as err:
        why = " ".join(f"{type(err).__name__}: {err}".split())
        _fail("loss._target_", target, f"it cannot be imported ({why}); put its package on the "
              "path (PYTHONPATH=...), or name a function that exists, e.g. vae_sweeps.losses.bce")
    accepted = accepted_arguments(recon_loss({"name": loss.name, "_target_": target}))
    if accepted is not None:  # not a function that takes **kwargs
        own = ("name", "c", *(key for key in accepted if key not in ("logits", "x")))
        settings = {key: value for key, value in loss.items() if key != "_target_"}
        _known_keys("loss", settings, own, "loss", f" (loss={loss.name} is the function {target}: c weighs it, the "
                    "other settings are its keyword arguments)")


def _trainer_signature() -> tuple[str, ...] | None:
    """The keyword arguments of Lightning's ``Trainer.__init__``, read from its source file without
    importing Lightning (seconds, ten and more on a busy machine), which a job does only once its
    config is checked (vae_sweeps/__main__.py). Raises LookupError where the file does not hold it
    (another Lightning's layout)."""
    spec = importlib.util.find_spec("pytorch_lightning")  # a top-level package: found, not imported
    if spec is None or spec.origin is None:
        raise LookupError("pytorch_lightning is not installed")
    source = Path(spec.origin).parent / "trainer" / "trainer.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and method.name == "__init__":
                    arguments = method.args
                    if arguments.kwarg is not None:  # **kwargs: any key
                        return None
                    return tuple(a.arg for a in [*arguments.args[1:], *arguments.kwonlyargs])
    raise LookupError(f"no Trainer.__init__ in {source}")


@functools.lru_cache(maxsize=None)
def trainer_arguments() -> tuple[str, ...]:
    """The arguments of Lightning's Trainer that a config may set."""
    try:
        accepted = _trainer_signature()
    except (LookupError, OSError, SyntaxError):  # elsewhere than expected: from the class itself
        from pytorch_lightning import Trainer

        accepted = accepted_arguments(Trainer)
    return tuple(key for key in accepted or () if key not in TRAINER_SET_BY_JOB)


def _trainer_keys(trainer: DictConfig) -> None:
    for key, value in trainer.items():
        if key in TRAINER_SET_BY_JOB:
            _fail(f"trainer.{key}", value, "the job sets it itself (vae_sweeps/train.py: make_trainer)")
        if key in TRAINER_MANUAL_OPTIMISATION and _plain(value) != TRAINER_MANUAL_OPTIMISATION[key]:
            _fail(f"trainer.{key}", value, "the model steps its optimiser itself (manual optimisation, "
                  "vae_sweeps/module.py), which Lightning does not clip or accumulate for; leave it out")
    _known_keys("trainer", dict(trainer.items()), trainer_arguments(), "Lightning's Trainer",
                " (e.g. trainer.max_epochs=30)")


def build_on_meta(model: DictConfig, prior: DictConfig, image_shape: tuple[int, ...]) -> list[torch.nn.Module]:
    """The model's encoder and decoder and the prior, built on PyTorch's meta device (shapes
    only, no memory): each checks its own settings. Raises ConfigError; returns [] if a shape
    is beyond what PyTorch can describe."""
    try:
        with torch.device("meta"):
            encoder, decoder = options.build("model", model, image_shape=tuple(image_shape))
            return [encoder, decoder, options.build("prior", prior, latent_dim=model.latent_dim)]
    except ConfigError as err:  # "Storage size calculation overflowed", "Overflow when unpacking long"
        if "overflow" not in str(err).lower():
            raise
    return []


def _parameters(model: DictConfig, prior: DictConfig, image_shape: tuple[int, ...]) -> int | None:
    """The parameters of this model and prior; None if PyTorch cannot count them."""
    modules = build_on_meta(model, prior, image_shape)
    return sum(p.numel() for module in modules for p in module.parameters()) if modules else None


def _too_large(count: int | None) -> bool:
    return count is None or count > MAX_PARAMETERS


def _model_size(model: DictConfig, prior: DictConfig, image_shape: tuple[int, ...]) -> None:
    count = _parameters(model, prior, image_shape)
    if not _too_large(count):
        return
    # what sizes it: the latent dim, the model's widths (lists) and the prior's counts, each with
    # its option's own value (conf/<axis>/<name>.yaml)
    sizes = [("model", "latent_dim", model.latent_dim)]
    sizes += [("model", key, _plain(value)) for key, value in model.items()
              if isinstance(_plain(value), list) and _is_size(_plain(value))]
    sizes += [("prior", key, _plain(value)) for key, value in prior.items()
              if key != "name" and _is_size(_plain(value))]
    own = {axis: options.option_config(axis, option.name) or {}
           for axis, option in (("model", model), ("prior", prior))}
    # named first, and suggested: the first setting that, at its option's own value, makes the
    # model small enough; else the first away from its option's own value
    changed = [(axis, key, value) for axis, key, value in sizes if key in own[axis] and own[axis][key] != value]
    fixes = [(axis, key, value) for axis, key, value in changed
             if not _too_large(_parameters(*_with(model, prior, axis, key, own[axis][key]), image_shape))]
    example = ""
    if changed:
        culprit = (fixes or changed)[0]
        sizes.remove(culprit)
        sizes.insert(0, culprit)
        axis, key, _ = culprit
        example = f", e.g. {axis}.{key}={own[axis][key]} ({(model if axis == 'model' else prior).name}'s own)"
    named = [f"{axis}.{key}={value}" for axis, key, value in sizes]
    has = f"{count:,} parameters" if count is not None else "more parameters than PyTorch can count"
    raise ConfigError(f"{named[0]} with {', '.join(named[1:])} is not allowed: this {model.name} would have "
                      f"{has}, more than {MAX_PARAMETERS:,} (16 GB of float32 weights, gradients and Adam's "
                      f"moments); choose smaller sizes{example}.")


def _with(model: DictConfig, prior: DictConfig, axis: str, key: str, value) -> tuple[DictConfig, DictConfig]:
    """(model, prior) with ``axis``.``key`` set to ``value``."""
    changed = OmegaConf.merge({"model": model, "prior": prior}, {axis: {key: value}})
    return changed.model, changed.prior


def _is_size(value) -> bool:
    """An integer or a list of integers: a setting that may size the model."""
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(_is_int(v) for v in values)


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
    """Raise ConfigError on the first value that is not allowed. Changes nothing in ``cfg``: the
    run identity normalises its own values (``loss.c=1`` is ``loss.c=1.0``, identity.params).
    Run once where a job enters (vae_sweeps/__main__.py), and by the study sweeper for every job
    before any starts."""
    model, loss = cfg.model, cfg.loss
    options.check_name("model", model)
    _int_at_least("model.latent_dim", model.latent_dim, 1, "2 (the study uses 1, 2, 5, 10, 20)")
    options.check_name("loss", loss)
    _positive_finite("loss.c", loss.c, "1.0")
    _loss_function(loss)
    options.check_name("prior", cfg.prior)
    options.check_name("data", cfg.data)
    _option_keys("data", cfg.data, ("seed",))
    datamodule = options.build("data", cfg.data, seed=cfg.seed)  # reads no file yet
    _option_keys("model", model, ("image_shape",))
    _option_keys("prior", cfg.prior, ("latent_dim",))
    _model_size(model, cfg.prior, datamodule.image_shape)
    for section, (keys, note) in READ_KEYS.items():
        _known_keys(section, dict(cfg[section].items()), keys, section, note)
    _trainer_keys(cfg.trainer)

    _int_at_least("trainer.max_epochs", cfg.trainer.max_epochs, 1, "30")
    _int_at_least("eval.iw_samples", cfg.eval.iw_samples, 1, "50")
    _int_at_least("eval.knn_k", cfg.eval.knn_k, 1, "5")
    if datamodule.train_images:  # the k-NN's reference set: the training images less validation's
        train_images = datamodule.train_images - datamodule.val_size
        if 0 < train_images < cfg.eval.knn_k:
            _fail("eval.knn_k", cfg.eval.knn_k, f"it must be at most the number of training images, {train_images} "
                  f"({datamodule.train_images} less data.val_size={datamodule.val_size}), e.g. eval.knn_k=5")
    _int_at_least("eval.judge_epochs", cfg.eval.judge_epochs, 1, "5")
    _int_at_least("jobs_per_gpu", cfg.jobs_per_gpu, 1, "4")
    _choice("optim.name", cfg.optim.name, list(OPTIMIZERS), "optim.name=<name>")
    _positive_finite("optim.lr", cfg.optim.lr, "0.001")
    _int_at_least("seed", cfg.seed, 0, "0")
    if cfg.get("threads") is not None:
        _int_at_least("threads", cfg.threads, 1, "2")
    validate_tracking(cfg)
