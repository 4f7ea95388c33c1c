"""Errors that are the user's to fix: the CLI prints them as one paragraph, no traceback."""

import argparse
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class UserError(Exception):
    """Bad input (config, data root, data files): reported before any training starts."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""


class DataError(UserError, RuntimeError):
    """Dataset files that are missing, cannot be downloaded, or are not valid IDX files."""


class BadValue(ValueError):
    """Raised by an axis option's code (a model, dataset or prior, the project's or a user's) for
    one of its own arguments: ``key`` (the argument, e.g. ``hidden``), the bad ``value`` and what
    is ``allowed``. The config check turns it into a ConfigError that names the full key
    (``model.hidden``), before any training starts."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def positive_int(key: str, value, example: str) -> int:
    """``value``, if it is an integer >= 1 (not a bool); else BadValue for ``key``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadValue(key, value, f"it must be a positive integer, e.g. {example}")
    return value


def refuse_password(source: str, uri: str) -> None:
    """Raise ConfigError if the URI ``uri``, given as ``source``, holds a password. Credentials stay
    out of the command line and the config: Hydra saves both under outputs/, and MLflow prints
    the tracking URI. (Here, not in tracking.py: the CLI checks this before importing MLflow.)"""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # not a URL: the checks of the value say so
        return
    if password:
        bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        raise ConfigError(f"{source} holds a password in its URI, which would be saved under outputs/ and printed by "
                          f"MLflow. Give it without credentials ({source}={bare}) and set MLFLOW_TRACKING_USERNAME "
                          "and MLFLOW_TRACKING_PASSWORD in the environment instead, which MLflow sends to the tracking "
                          "server (for a PostgreSQL database: PGPASSWORD or ~/.pgpass).")


class SweepFailed(BaseException):
    """The end of a sweep that the CLI reports as ``error: <message>`` and exits with ``status``:
    2 when jobs have bad values and none was started, 1 when jobs failed (``returns``: the
    JobReturns of every launched job, one list per batch). Raised by the study sweeper
    (hydra_plugins/vae_sweeps_sweeper/study_sweeper.py), whose module Hydra executes anew when
    it scans its plugins, so the class is defined here, once; and by the sweep's tracking
    callback (tracking.PrepareTracking) for a store that cannot be used.

    A BaseException, as SystemExit and KeyboardInterrupt are: Hydra's ``run_and_report``, around
    the sweep, prints any Exception as a traceback and exits 1, and this one must reach the CLI."""

    def __init__(self, message: str, status: int, returns=()):
        super().__init__(message)
        self.status = status
        self.returns = list(returns)


def redact(uri: str) -> str:
    """``uri`` without its password, if it has one."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def config_folder(text: str) -> Path:
    """The --config-dir of a command that is not a Hydra app (the report, the back-fill), as
    argparse reads it: a folder that exists, or argparse's error (exit 2) saying what to give."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder: give the folder that holds your options "
                                         "(<folder>/<axis>/<name>.yaml), e.g. --config-dir examples/conf")
    return Path(text)
