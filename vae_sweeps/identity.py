"""What a run is: its params, the settings that decide its results, its identity and its names.

Every part of the project that asks "is this the same run?" asks here: the sweeper (skip what
is FINISHED, drop duplicate jobs), a job (resume its KILLED run, refuse a second live one) and
the report (group the seeds of one configuration).

- **params**: the resolved config, flattened to ``group.key`` strings (as MLflow stores them),
  without paths, the tracking settings (the URI may hold a password) and ``force``; a number
  setting given as an integer as its float (``loss.c=1`` is ``loss.c=1.0``), so that equal
  settings are one run whether or not the config was checked (config.validate leaves it as given).
- **result settings**: the params that change what a run computes (seed included; not threads,
  progress bars and the like).
- **identity** (``run_key``): a hash of the result settings that differ from their defaults.
  The defaults are those of the config composed with the run's own options of the study's
  axes (``model=cnn``, ``data=fashion_mnist``, ...), so a setting added later with a default
  (as ``prior`` and ``eval`` were) changes no identity: a run logged before it existed is the same run as a new
  config that keeps the default. A run's identity is computed from its params, never from a
  stored tag, so it is the same whichever version of vae_sweeps logged it.
- **names**: ``run_name`` (the MLflow run name) and ``caption`` (its description and the
  figures' caption line).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[1]  # the project's folder: conf/, experiments/, results/
CONF_DIR = PROJECT / "conf"

# Not params: Hydra's own settings, machine-specific paths, the tracking settings (the URI may
# hold credentials), free-form tags, force, and the tuning's settings (a trial's run logs the values
# it trains with; vae_sweeps/tuning.py).
NOT_PARAMS = ("hydra", "paths", "tracking", "tags", "force", "data.root", "tune")
# Params that do not change a run's results either (a section name covers the whole section).
NOT_RESULTS = (*NOT_PARAMS, "threads", "jobs_per_gpu", "data.download", "data.verify",
               "trainer.enable_progress_bar", "trainer.enable_model_summary")
# Settings that take any number (config.validate): an integer given for one is the same setting as
# its float, and is logged (and hashed) as the float, as every run so far has logged it.
FLOAT_SETTINGS = ("loss.c", "optim.lr")
# The study's axes whose option is chosen by name (``model=cnn``); the option's ``name`` key says
# which one a run used.
AXES = ("data", "model", "loss", "prior")


# The user's config folder of a command that is not a Hydra app (the report, the back-fill:
# their --config-dir), searched after conf/ as a job's --config-dir is (project_config).
_USER_CONFIG: list[str] = []


@contextlib.contextmanager
def project_config(config_dir: str | Path | None = None):
    """Hydra, ready to compose the project's config: inside a Hydra app the app's own (its
    search path, ``--config-dir`` included), elsewhere (the report, the back-fill, tests) from
    ``conf/`` and ``config_dir``, a user's folder of options (``conf/<axis>/<name>.yaml``)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        _USER_CONFIG[:] = [Path(config_dir).resolve().as_uri()] if config_dir else []
        try:
            yield
        finally:
            _USER_CONFIG.clear()


def search_path() -> list[str]:
    """The override that adds a command's --config-dir to Hydra's search path (none without one)."""
    return [f"hydra.searchpath=[{','.join(_USER_CONFIG)}]"] if _USER_CONFIG else []


def compose(overrides: list[str]) -> DictConfig:
    """The project's config composed with ``overrides`` (project_config)."""
    from hydra import compose as hydra_compose

    with project_config():
        return hydra_compose(config_name="config", overrides=[*search_path(), *overrides])


def flatten(cfg: DictConfig, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """The resolved config as flat ``group.key`` strings, without the keys in ``leave_out``
    (a section name leaves out the whole section)."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in leave_out:
                continue
            if isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                flat[name] = str(value)

    sections = [key for key in cfg if key not in leave_out]  # unresolvable ones (hydra) stay out
    walk(OmegaConf.to_container(OmegaConf.masked_copy(cfg, sections), resolve=True), "")
    return flat


def params(cfg: DictConfig) -> dict[str, str]:
    """A run's MLflow params: the flattened config without NOT_PARAMS, FLOAT_SETTINGS as floats."""
    flat = flatten(cfg, NOT_PARAMS)
    for key in FLOAT_SETTINGS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, int) and not isinstance(value, bool):
            flat[key] = str(float(value))
    return flat


def is_result_setting(key: str) -> bool:
    return not any(key == other or key.startswith(f"{other}.") for other in NOT_RESULTS)


def result_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """The params (of a config or of a logged run) that change what a run computes."""
    return {key: str(value) for key, value in settings.items() if is_result_setting(key)}


def same_value(a, b) -> bool:
    """Whether two values of a setting are the same: as numbers where both read as numbers (a
    param is a string: "1", "1.0" and 1.0 are one value), else as text."""
    try:
        return math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return str(a) == str(b)


def matches(settings: Mapping, wanted: Mapping) -> bool:
    """Whether a run's params (or a table's record of them) have each ``wanted`` value
    (``same_value``; None: the run lacks that param). The back-fill's filters and the tables'
    cells both pick runs with it."""
    def lacks(value) -> bool:
        return value is None or (isinstance(value, float) and math.isnan(value))

    return all(lacks(settings.get(key)) if value is None
               else not lacks(settings.get(key)) and same_value(settings[key], value)
               for key, value in wanted.items())


def choices(settings: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The options of the study's axes that ``settings`` name (absent: the default option)."""
    return tuple((axis, str(settings[f"{axis}.name"])) for axis in AXES if f"{axis}.name" in settings)


def defaults(options: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    """The result settings of the config composed with these axis options and nothing else:
    what a run that named only these options would have used. {} if they do not compose (an
    option that no longer exists, or a user's without their --config-dir)."""
    return _defaults(options, tuple(search_path()))


@functools.lru_cache(maxsize=None)
def _defaults(options: tuple[tuple[str, str], ...], searched: tuple[str, ...]) -> dict[str, str]:
    # ``searched`` (compose adds it) is here to key the cache: a user's folder changes the answer
    overrides = [f"{axis}={option}" for axis, option in options] + ["paths.output_dir=."]
    try:
        cfg = compose(overrides)
    except Exception as err:  # an option that does not exist (any more): no defaults to drop
        log.debug("No defaults for %s: %s", overrides, err)
        return {}
    return result_settings(params(cfg))


def completed(settings: Mapping[str, str]) -> dict[str, str]:
    """``settings`` with every result setting they lack filled in with its default: a run logged
    before a setting existed ran with that setting's default."""
    return {**defaults(choices(settings)), **{key: str(value) for key, value in settings.items()}}


def distinct(settings: Mapping[str, str]) -> dict[str, str]:
    """The result settings that differ from their defaults (an axis option too: a run that
    names the default option is the same as one logged before that axis existed)."""
    results = result_settings(settings)
    base = {**defaults(choices(results)), **{k: v for k, v in defaults().items() if k.endswith(".name")}}
    return {key: value for key, value in results.items() if base.get(key) != value}


def key_of(settings: Mapping[str, str], leave_out: tuple[str, ...] = ()) -> str:
    """The identity of a run with these params (a config's or a logged run's): a short hash."""
    kept = {key: value for key, value in distinct(settings).items() if key not in leave_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def run_key(cfg: DictConfig) -> str:
    """The identity of the run that ``cfg`` would log."""
    return key_of(params(cfg))


def group_key(settings: Mapping[str, str]) -> str:
    """The identity without the seed: the runs of one configuration over its seeds."""
    return key_of(settings, leave_out=("seed",))


def _prior_label(prior) -> str:
    return prior.name + (f"_{prior.kl}" if prior.get("kl") else "")


# The result settings that a run's name and caption show by themselves.
NAMED = ("model.name", "loss.name", "model.latent_dim", "loss.c", "prior.name", "prior.kl", "data.name", "seed")
# The longest list of other settings that a run name spells out; beyond it, the name ends with the
# run's identity (run_key) and the caption lists them.
NAMED_EXTRA_CHARS = 40


def unnamed(cfg: DictConfig) -> dict[str, str]:
    """The result settings away from their defaults (``distinct``) that the name's fixed parts
    (NAMED) do not show: ``trainer.max_epochs``, ``model.hidden``, ``data.val_size``, ..."""
    return {key: value for key, value in distinct(params(cfg)).items() if key not in NAMED}


def run_name(cfg: DictConfig) -> str:
    """The MLflow run name, e.g. ``mlp3-bce-z2-c1-mnist-s0`` (the prior shown unless it is the
    default one), then any other setting away from its default, by its last part
    (``...-s0-max_epochs=1``); where those are long, the run's identity instead (``...-s0-3fa2c1d0``)."""
    prior = "" if cfg.prior.name == defaults().get("prior.name") else f"-{_prior_label(cfg.prior)}"
    name = (f"{cfg.model.name}-{cfg.loss.name}-z{cfg.model.latent_dim}-c{cfg.loss.c:g}{prior}"
            f"-{cfg.data.name}-s{cfg.seed}")
    extra = ",".join(f"{key.rpartition('.')[2]}={value.replace(' ', '')}" for key, value in unnamed(cfg).items())
    if not extra:
        return name
    return f"{name}-{extra if len(extra) <= NAMED_EXTRA_CHARS else run_key(cfg)[:8]}"


def caption(cfg: DictConfig, run_id: str) -> str:
    """One line that says what a run is: its description in MLflow and its figures' caption. It
    names every setting away from its default that the run name cannot show in full."""
    extra = ", ".join(f"{key} {value}" for key, value in cfg.prior.items()
                      if key not in ("name", "_target_") and value is not None)
    prior = cfg.prior.name + (f" ({extra})" if extra else "")
    others = "".join(f" | {key}={value}" for key, value in unnamed(cfg).items()
                     if key != "trainer.max_epochs" and not key.startswith("prior."))  # shown above
    return (f"{cfg.model.name} | {cfg.loss.name} | latent dim {cfg.model.latent_dim} | c = {cfg.loss.c:g} | "
            f"prior {prior} | {cfg.data.name} | seed {cfg.seed} | {cfg.trainer.max_epochs} epochs{others} | "
            f"run {run_id[:8]}")
