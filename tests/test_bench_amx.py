"""The AMX benches rewrite kernels_amx / kernels_amx_bf16's source into variants (amx_ablate's
parts removed, amx_layout's tile-order addressing). Their `--check` builds every variant and
fails if a rewrite no longer finds its text, so an edit to a kernel cannot leave a bench that
only breaks on the GPU machine (the one with AMX)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _check(script: str, *args: str) -> dict:
    run = subprocess.run([sys.executable, str(BENCH / script), "--check", *args],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tiles, want", [
    ("int8", {"full", "no_rescale", "no_unpack", "no_scales", "no_tile_ops", "only_tile_ops"}),
    ("bf16", {"full", "b3", "no_unpack", "no_tile_ops"}),
])  # fmt: skip
def test_amx_ablate_builds_every_variant(tiles, want):
    assert set(_check("amx_ablate.py", "--tiles", tiles)["variants"]) == want


def test_amx_layout_rewrites_apply():
    assert _check("amx_layout.py")["rewrites"] >= 7  # int8 tiles 5, bf16 tiles 2
