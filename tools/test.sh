#!/usr/bin/env bash
# Install the dev extras into .venv (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. tools/test.sh tests/model -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev
exec .venv/bin/python -m pytest -q "$@"
