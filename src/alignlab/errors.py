"""User-facing errors.

Anything raised as :class:`UserError` is a problem with what the user gave us (a flag, a file, a row).
The command line prints its message on one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user: a flag value, a data file, a model path. The message is one line."""


class DataError(UserError):
    """A data file or dataset row is unusable. The message names the file and the line or row."""
