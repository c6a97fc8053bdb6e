#!/usr/bin/env bash
# Install the dev extras into .venv (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. tools/test.sh tests/model -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev
# -P: the checkout's root stays off sys.path; its kernels/ (sailor_engine.kernels' source) would
# otherwise shadow Hugging Face's `kernels` package, which transformers imports
exec .venv/bin/python -P -m pytest -q "$@"
