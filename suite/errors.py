"""One exception type for every user-facing error: the CLI prints its message on one line, no traceback."""


class SplitleakError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class ConfigError(SplitleakError):
    """A configuration value is missing, unknown or out of range."""


class ModelError(SplitleakError):
    """A model cannot be found, loaded or split."""


class DataError(SplitleakError):
    """A data file or dataset cannot be read or has no usable text."""


class ProtocolError(SplitleakError):
    """A message on the wire is malformed, of the wrong version or kind."""
