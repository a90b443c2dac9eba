#!/usr/bin/env bash
# Sets up .venv and runs the main job: `hetero serve` on the demo model (extra arguments go to
# it, e.g. --port 9000). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/hetero serve "$@"
