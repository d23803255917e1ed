"""OutputDirLock: a live run's output_dir refuses a second run; a killed run's lock is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.errors import UserError
from alignlab.train.lock import LOCK_FILE_NAME, OutputDirLock

SRC = str(Path(__file__).resolve().parents[1] / "src")

HOLDER = """
import sys, time
from alignlab.train.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate Python process that holds tmp_path/out until killed."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_run_is_refused_while_the_first_is_alive(tmp_path, holder):
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        OutputDirLock(out).acquire()
    message = str(info.value)
    host = socket.gethostname()
    assert message.startswith(f"output_dir {out} is in use by a live run (pid {holder.pid} on host {host}, started 20")
    assert message.endswith("stop it or choose another --output_dir")
    assert "\n" not in message
    assert holder.poll() is None  # refusing did not disturb the holder


def test_a_killed_run_leaves_no_live_lock(tmp_path, holder, caplog):
    out = tmp_path / "out"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    caplog.set_level(logging.WARNING, logger="alignlab.train.lock")
    with OutputDirLock(out) as lock:
        assert lock.held
        record = json.loads((out / LOCK_FILE_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert f"taking over the lock left by a run that stopped without releasing it (pid {holder.pid} " in caplog.text


def test_a_clean_release_empties_the_file_and_the_next_run_takes_over_silently(tmp_path, caplog):
    out = tmp_path / "new" / "out"
    caplog.set_level(logging.WARNING, logger="alignlab.train.lock")
    with OutputDirLock(out):
        assert (out / LOCK_FILE_NAME).read_text().strip()
    assert (out / LOCK_FILE_NAME).read_text() == ""
    with OutputDirLock(out):
        pass
    assert caplog.text == ""


def test_same_object_nests_a_second_object_in_the_same_process_is_refused(tmp_path):
    out = tmp_path / "out"
    lock = OutputDirLock(out)
    with lock:
        with lock:  # re-entrant: the same object nests
            assert lock.held
        assert lock.held  # still held: the outer block has not ended
        with pytest.raises(UserError, match=f"in use by a live run \\(pid {os.getpid()} "):
            OutputDirLock(out).acquire()  # another object (another run) in this process
    assert not lock.held
    with OutputDirLock(out):  # released: free for the next run
        pass
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        lock.release()
