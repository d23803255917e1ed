#!/usr/bin/env bash
# The test suite: set-up (as scripts/main.sh, plus pytest and trl for the parity test), then pytest.
# Extra arguments go to pytest (for example `-m "not integration"` for the fast unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
