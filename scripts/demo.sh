#!/usr/bin/env bash
# Sets up .venv and runs the main job. Extra arguments go to `hetero generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hetero generate --prompt "def fibonacci(n):" --max-tokens 32 "$@"
