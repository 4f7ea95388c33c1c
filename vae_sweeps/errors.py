"""Errors that are the user's to fix: the CLI prints them as one paragraph, no traceback."""


class UserError(Exception):
    """Bad input (config, data root, data files): reported before any training starts."""


class ConfigError(UserError, ValueError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""


class DataError(UserError, RuntimeError):
    """Dataset files that are missing, cannot be downloaded, or are not valid IDX files."""
