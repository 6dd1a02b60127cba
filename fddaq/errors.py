"""The errors a user can cause and fix. The CLI prints their message on one line and exits 1;
any other exception is a bug and keeps its traceback."""


class FddaqError(Exception):
    """Base of every user-facing error: the message names the problem and what would fix it."""


class ConfigError(FddaqError):
    """An option or configuration value is invalid."""


class ModelError(FddaqError):
    """A model file or architecture spec cannot be loaded or does not fit."""


class DataError(FddaqError):
    """An image folder or data file is missing, empty or unusable."""


class ExportError(FddaqError):
    """A model cannot be exported, or the export runtime is missing."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): library errors
    wrapped into a user error must stay one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
