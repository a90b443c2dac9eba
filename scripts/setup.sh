#!/usr/bin/env bash
# Creates .venv (if missing) and installs hetero into it. Usage: scripts/setup.sh [EXTRAS]
# torch is pinned to the CPU wheel this machine type has on disk; on a GPU machine, install
# your CUDA torch into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $py -c "import torch" >/dev/null 2>&1; then
    $py -m pip install -q "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
$py -m pip install -q -e "$spec"
# tests/test_chat_page.py drives headless Chromium (skipped without it): install it where apt-get
# can (Debian, as root); anywhere else this is skipped silently
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
        >/dev/null 2>&1 || true
fi
