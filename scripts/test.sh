#!/usr/bin/env bash
# Sets up .venv with the test extras, lints, and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
