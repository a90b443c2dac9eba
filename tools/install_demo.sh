#!/usr/bin/env bash
# Puts a demo model trained on the GPU machine (bench/device_runs.sh train-demo) into the package:
#   bash tools/install_demo.sh DIR     # DIR holds model.safetensors.part.* and demo_meta.tgz
set -euo pipefail
src=${1:?usage: tools/install_demo.sh DIR}
dst=$(dirname "$0")/../hetero/demo
cat "$src"/model.safetensors.part.* > "$dst/model.safetensors"
tar xzf "$src/demo_meta.tgz" -C "$dst"
python3 - "$dst" <<'PY'
import sys
from hetero.loader import load_model
from hetero.demo import demo_dir
assert demo_dir() is not None, "hetero/demo is incomplete"
load_model(sys.argv[1], progress=False)
print("installed and loads:", demo_dir())
PY
ls -la "$dst"
