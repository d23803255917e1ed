#!/usr/bin/env bash
# The test suite: set-up (as scripts/main.sh, plus pytest and trl for the parity test), then pytest.
# Extra arguments go to pytest (for example `-m "not integration"` for the fast unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Two pytest workers (pytest-xdist): one at a time, the tests kept 1.3 of 2 cores busy on average (many use a
# tiny model or wait on subprocesses); two at a time fill them. `-n 0` runs them in one process.
exec .venv/bin/python -m pytest -q -n 2 "$@"
