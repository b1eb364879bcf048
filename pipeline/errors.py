"""User-facing errors: one line that says what is wrong and how to fix it."""


class TaildiffError(Exception):
    """An error caused by the user's input; `pipeline/run.py` prints it as one line and exits 2."""


class ConfigError(TaildiffError):
    """A config file or --set override is invalid."""


class DataError(TaildiffError):
    """Dataset files are missing, unreadable or inconsistent."""
