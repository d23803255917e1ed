"""What the side-by-side benchmarks share: run one side's command as a child process and measure it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def run_measured(cmd: list[str], out: str, label: str, metrics: Path | None = None) -> dict:
    """Run ``cmd`` with stdout/stderr in ``out + ".stdout"`` / ``".stderr"``; returns ``{"wall_seconds",
    "peak_rss_bytes", "load_before_after", "row_times"}``: peak RSS is ``os.wait4``'s ``ru_maxrss`` (the child
    alone), ``row_times`` the moments each complete line appeared in ``metrics`` (polled every 0.1 s; empty
    without ``metrics``). Exits with the child's stderr tail when it fails."""
    log_out, log_err = Path(out + ".stdout"), Path(out + ".stderr")
    row_times: list[float] = []
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_out, "w") as fout, open(log_err, "w") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, text=True)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if metrics is not None and metrics.exists():
                with open(metrics, encoding="utf-8") as handle:
                    complete = sum(1 for line in handle if line.endswith("\n"))
                now = time.perf_counter()
                row_times.extend([now] * (complete - len(row_times)))
            time.sleep(0.1)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(log_err.read_text()[-6000:])
        raise SystemExit(f"{label} failed with status {status}")
    return {"wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "load_before_after": [load_before, os.getloadavg()[0]], "row_times": row_times}
