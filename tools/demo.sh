#!/usr/bin/env bash
# Install sailor-engine into .venv (idempotent) and run the end-to-end demo on the CPU.
# Extra arguments go to `sailor-engine demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/sailor-engine demo "$@"
