#!/usr/bin/env bash
# Sets up .venv and runs the test suite (CPU only; GPU tests are marked `gpu` and skipped without one).
# Extra flags go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@"
