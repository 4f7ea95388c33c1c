"""Errors that are the user's to fix: the CLI prints them as one paragraph, no traceback."""

from urllib.parse import urlsplit, urlunsplit


class UserError(Exception):
    """Bad input (config, data root, data files): reported before any training starts."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""


class DataError(UserError, RuntimeError):
    """Dataset files that are missing, cannot be downloaded, or are not valid IDX files."""


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
