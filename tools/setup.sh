#!/usr/bin/env bash
# Create .venv if missing and install sailor-engine into it, editable.
# Usage: tools/setup.sh [EXTRAS]   e.g. tools/setup.sh dev
# Idempotent: a stamp keyed on pyproject.toml (and the extras) skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  py=$(command -v python3.11 || command -v python3)
  "$py" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
  echo "installing sailor-engine${extras:+[$extras]} into .venv (log: .venv/install.log) ..."
  {
    .venv/bin/python -m pip install --upgrade pip &&
    # The pinned CPU torch first: an unpinned resolve would pull several GB of CUDA wheels.
    .venv/bin/python -m pip install torch==2.13.0 triton==3.7.1 &&
    .venv/bin/python -m pip install -e ".${extras:+[$extras]}"
  } > .venv/install.log 2>&1 || { tail -n 40 .venv/install.log; echo "install failed (full log: .venv/install.log)" >&2; exit 1; }
  touch "$stamp"
fi
