"""One live run per output directory: an advisory lock file inside ``output_dir``.

Two runs writing checkpoints, ``metrics.jsonl`` and the final model into the same folder corrupt each other
silently. :class:`OutputDirLock` refuses the second run with a one-line :class:`~alignlab.errors.UserError`
that says who holds the folder.

How it works: the run opens ``output_dir/.alignlab.lock`` and takes an exclusive, non-blocking
``fcntl.flock`` on it, then writes its pid, host name, start time and command line into the file. The kernel
drops a ``flock`` when the holding process dies, however it dies (``kill -9``, out-of-memory killer,
power-off of a container), so a killed run never leaves a live lock behind. The file itself stays: a clean
release empties it, so a file that still holds a pid when the lock is taken was left by a run that stopped
without releasing it, and the new run logs a warning naming that run and takes over.

The file is never deleted: deleting a lock file races with a run that has just opened it (two runs could each
lock a different inode under the same name).

Scope and limits:
    - Advisory: only runs that take this lock are kept out; ``rm -rf output_dir`` is not.
    - ``flock`` works on local file systems and on NFS (Linux maps it to NFS byte-range locks); where the file
      system refuses locks (``ENOLCK``, ``EOPNOTSUPP``) the run logs a warning and goes on unlocked.
    - Distributed runs: take the lock on the main process only (every rank shares one ``output_dir``).
    - Same process: one :class:`OutputDirLock` object is re-entrant (nested ``with`` blocks or repeated
      :meth:`~OutputDirLock.acquire` calls nest; the lock is released when the outermost one ends). A second
      :class:`OutputDirLock` object on the same folder in the same process is refused exactly like another
      process, because ``flock`` locks belong to the open file, not to the process: two methods of one
      ``compare`` run must not share a folder either.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from alignlab.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".alignlab.lock"


def _describe(owner: dict) -> str:
    """``pid N on host H, started T`` from the lock file's contents (``unknown`` for missing fields)."""
    return (
        f"pid {owner.get('pid', 'unknown')} on host {owner.get('host', 'unknown')}, "
        f"started {owner.get('started', 'unknown')}"
    )


def _read_owner(path: Path) -> dict:
    """The holder's record written in the lock file, or ``{}`` when the file is empty or unreadable."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


class OutputDirLock:
    """Exclusive claim of ``output_dir`` by the running process; a context manager.

    Example::

        with OutputDirLock(config.output_dir):
            train(...)

    Args:
        output_dir: the run's output folder (created if missing).

    Raises (from :meth:`acquire` and ``__enter__``):
        UserError: another live run holds ``output_dir`` (another process, or another :class:`OutputDirLock`
            object in this process); the message names its pid, host and start time.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE_NAME
        self._fd: int | None = None
        self._depth = 0  # nesting depth of acquire() calls on this object
        self._unlocked = False  # True when the file system refused locks and the run goes on without one

    @property
    def held(self) -> bool:
        """Whether this object currently holds the folder (or runs unlocked on a file system without locks)."""
        return self._depth > 0

    def acquire(self) -> OutputDirLock:
        """Take the lock, or nest once more if this object already holds it. Returns ``self``.

        Raises:
            UserError: another live run holds the folder.
        """
        if self._depth > 0:
            self._depth += 1
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # not inherited by exec'd children
        try:
            if fcntl is None:
                raise OSError(errno.EOPNOTSUPP, "fcntl.flock is not available on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"output_dir {self.output_dir} is in use by a live run ({_describe(self._wait_for_owner())}); "
                "stop it or choose another --output_dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            logger.warning(
                "cannot lock %s (%s): a second run on this output_dir would not be detected", self.path, exc.strerror
            )
            self._unlocked, self._depth = True, 1
            return self
        previous = _read_owner(self.path)
        if previous:
            logger.warning(
                "output_dir %s: taking over the lock left by a run that stopped without releasing it (%s)",
                self.output_dir, _describe(previous),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd, self._depth = fd, 1
        return self

    def release(self) -> None:
        """Undo one :meth:`acquire`; the outermost one empties the lock file and unlocks it.

        Raises:
            RuntimeError: this object does not hold the lock.
        """
        if self._depth == 0:
            raise RuntimeError(f"release() of {self.path} without a matching acquire()")
        self._depth -= 1
        if self._depth > 0:
            return
        if self._unlocked:
            self._unlocked = False
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # empty file = released cleanly (a non-empty one found later means a killed run)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _wait_for_owner(self, timeout: float = 1.0) -> dict:
        """The holder's record; waits up to ``timeout`` seconds when the holder has locked but not yet written."""
        deadline = time.monotonic() + timeout
        owner = _read_owner(self.path)
        while not owner and time.monotonic() < deadline:
            time.sleep(0.05)
            owner = _read_owner(self.path)
        return owner

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
