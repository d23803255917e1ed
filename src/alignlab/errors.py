"""User-facing errors.

Anything raised as :class:`UserError` is a problem with what the user gave us (a flag, a file, a row).
The command line prints its message on one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user: a flag value, a data file, a model path. The message is one line."""


class DataError(UserError):
    """A data file or dataset row is unusable. The message names the file and the line or row."""


ERROR_FILE_ENV = "ALIGNLAB_ERROR_FILE"
"""When set, the command line writes a failed command's one-line error to this file (``alignlab compare`` sets
it for each method's process, so its report shows the real error rather than the last line of a log)."""


def record_error(message: str) -> None:
    """Write ``message`` (one line) to the file named by :data:`ERROR_FILE_ENV`, if set; never raises."""
    import os

    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(" ".join(str(message).split()) + "\n")
    except OSError:
        pass
