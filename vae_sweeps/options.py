"""The options of the study's axes: each is one config file, ``conf/<axis>/<name>.yaml``.

An option's config holds its ``name`` (the file's name: what ``model=<name>`` selects and what
run names, tables and the run identity show), a Hydra ``_target_`` (the class or function that
builds it: ours in ``vae_sweeps``, or a user's in their own package) and the target's keyword
arguments. ``build`` calls the target with those arguments (not ``name``) plus what the job
supplies (``latent_dim`` to a prior, ``image_shape`` to a model, ``seed`` to a dataset).

The target checks its own arguments and raises ``errors.BadValue`` for a bad one; ``build``
turns that, an import that fails and an argument the target does not take into a ConfigError
that names the full key (``model.hidden=[400]``) and what is allowed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_sweeps.errors import BadValue, ConfigError, UserError
from vae_sweeps.identity import compose, project_config, search_path

log = logging.getLogger(__name__)


def plain(value):
    """An OmegaConf node as plain Python (dicts, lists); other values as they are."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def names(axis: str) -> tuple[str, ...]:
    """The options of ``axis`` that the config search path holds (``conf/<axis>/*.yaml``, and
    those of a ``--config-dir``)."""
    with project_config():
        return _names(axis, tuple(search_path()))


@functools.lru_cache(maxsize=None)
def _names(axis: str, overrides: tuple[str, ...]) -> tuple[str, ...]:
    from hydra.core.global_hydra import GlobalHydra

    return tuple(GlobalHydra.instance().config_loader().get_group_options(axis, overrides=list(overrides)))


def option_config(axis: str, name: str) -> dict | None:
    """The config of option ``name`` of ``axis`` as its file gives it; None if there is no such option."""
    return _option_config(axis, name, tuple(search_path()))


@functools.lru_cache(maxsize=None)
def _option_config(axis: str, name: str, searched: tuple[str, ...]) -> dict | None:
    # ``searched`` (compose adds it) is here to key the cache: a user's folder changes the answer
    try:
        return plain(compose([f"{axis}={name}", "paths.output_dir=."])[axis])
    except Exception as err:  # no such option (any more)
        log.debug("No option %s=%s: %s", axis, name, err)
        return None


@functools.lru_cache(maxsize=None)
def default(axis: str) -> dict:
    """The config of the default option of ``axis`` (``conf/config.yaml``'s defaults list)."""
    return plain(compose(["paths.output_dir=."])[axis])


def check_name(axis: str, option: Mapping) -> None:
    """An option's ``name`` must be one of the axis's options: the run identity and the report
    find an option's defaults by its name."""
    name, allowed = option.get("name"), names(axis)
    if name not in allowed:
        raise ConfigError(f"{axis}.name={plain(name)!r} is not allowed: choose one of {', '.join(allowed)} "
                          f"({axis}=<name> on the command line; an option is a file conf/{axis}/<name>.yaml "
                          "whose name: is its file's name).")


def build(axis: str, option: Mapping, **given: Any):
    """The object that ``option`` (an ``axis`` option's config) describes: its ``_target_`` called
    with its other settings and ``given``. A config logged before options had a ``_target_`` (an
    older run's checkpoint) is completed from the option's file."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    settings = dict(plain(option))
    name = settings.pop("name", None)
    if "_target_" not in settings:
        settings = {**{k: v for k, v in (option_config(axis, name) or {}).items() if k != "name"}, **settings}
    target = settings.get("_target_")
    if not target:
        raise ConfigError(f"{axis}={name} is not allowed: its config has no _target_, the class or function that "
                          f"builds it (conf/{axis}/{name}.yaml: _target_: my_package.MyClass).")
    try:
        return instantiate(settings, **given, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, BadValue):
            raise ConfigError(f"{axis}.{cause.key}={plain(cause.value)!r} is not allowed: {cause.allowed}.") from cause
        if isinstance(cause, UserError):
            raise cause from None
        why = " ".join((f"{type(cause).__name__}: {cause}" if cause is not None else str(err)).split())
        hint = ("install its package, or put it on PYTHONPATH" if isinstance(cause, ImportError) or cause is None
                else f"its settings are {', '.join(sorted(k for k in settings if k != '_target_'))}"
                     f" and the job gives {', '.join(sorted(given)) or 'nothing'}")
        raise ConfigError(f"{axis}={name} is not allowed: {axis}._target_={target!r} could not build it ({why}); "
                          f"{hint}.") from err
