"""The AMX benches rewrite kernels_amx / kernels_amx_bf16's source into variants (amx_ablate's
parts removed, amx_layout's tile-order addressing), and cpu_vector_micro rewrites kernels_q8
back to its old slicing. Their `--check` builds every variant and
fails if a rewrite no longer finds its text, so an edit to a kernel cannot leave a bench that
only breaks on the GPU machine (the one with AMX). bench/amx_asm.py's machine code of the
kernels for that machine's CPU is checked here too."""

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


def test_cpu_vector_micro_rewrite_applies():
    assert _check("cpu_vector_micro.py")["check"] == "ok"


def test_amx_layout_rewrites_apply():
    assert _check("amx_layout.py")["rewrites"] >= 11  # tile order: int8 tiles 5, bf16 2; staged 4


def test_amx_kernels_compile_for_sapphire_rapids_without_calls_or_divisions_in_their_loops():
    """bench/amx_asm.py compiles the AMX kernels for a Sapphire Rapids Xeon (on any x86-64
    host; nothing runs). Between their first and last tile instruction, where the chunk loops
    are, no call (numba's reference counting, libm's expf) and no integer division; and SiLU
    is vector code, not expf calls."""
    run = subprocess.run([sys.executable, str(BENCH / "amx_asm.py")], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["kernel"].rpartition(".")[2] for r in rows} == {"gate_up", "down"}
    assert len(rows) == 6  # 3 formats x 2 kernels
    for r in rows:
        assert sum(r["tile"].get(op, 0) for op in ("tdpbusd", "tdpbssd", "tdpbf16ps")) > 0, r
        assert r["between_tile_ops"]["calls"] == 0, r
        assert r["between_tile_ops"]["divisions"] == 0, r
        assert "expf" not in r["call_targets"], r
