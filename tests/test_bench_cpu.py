"""The AMX benches rewrite kernels_amx / kernels_amx_bf16's source into variants (amx_ablate's
parts removed, amx_layout's tile-order addressing), and cpu_vector_micro rewrites kernels_q8
back to its old slicing; amx_schedules' tile orders are checked by their sums. Their `--check`
builds every variant and fails if a rewrite no longer finds its text, so an edit to a kernel
cannot leave a bench that only breaks on the GPU machine (the one with AMX). bench/cpu_asm.py's
machine code of the kernels for that machine's CPU is checked here too."""

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
    ("bf16", {"full", "no_unpack", "no_tile_ops", "2x2", "1x2db", "kb", "no_unpack_2x2",
              "no_unpack_1x2db", "no_unpack_kb"}),
])  # fmt: skip
def test_amx_ablate_builds_every_variant(tiles, want):
    assert set(_check("amx_ablate.py", "--tiles", tiles)["variants"]) == want


def test_amx_schedules_each_schedule_does_its_products():
    assert _check("amx_schedules.py") == {"check": "ok", "schedules": 8}


def test_cpu_vector_micro_rewrite_applies():
    assert _check("cpu_vector_micro.py")["check"] == "ok"


def test_amx_layout_rewrites_apply():
    assert _check("amx_layout.py")["rewrites"] >= 11  # tile order: int8 tiles 5, bf16 2; staged 4


def test_cpu_kernels_compile_for_sapphire_rapids_without_calls_in_their_loops():
    """bench/cpu_asm.py compiles the CPU expert kernels for a Sapphire Rapids Xeon (on any
    x86-64 host; nothing runs). The AMX kernels: between their first and last tile instruction,
    where the chunk loops are, no call (numba's reference counting, libm's expf) and no integer
    division, and SiLU is vector code, not expf calls. The decode kernel: no reference counting
    between its first and last VNNI dot (simd_sync.borrowed)."""
    run = subprocess.run([sys.executable, str(BENCH / "cpu_asm.py")], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["kernel"]: r for r in map(json.loads, run.stdout.splitlines())}
    amx = [r for k, r in rows.items() if ".kernels_amx" in k]
    decode = [r for k, r in rows.items() if k.endswith("moe_gemv_q8")]
    assert len(amx) == 6 and len(decode) == 2, sorted(rows)  # 3 formats x 2; int4, int8
    for r in amx:
        assert sum(v for op, v in r["hot"].items() if op.startswith("tdp")) > 0, r
        assert r["between_hot"]["calls"] == {}, r
        assert r["between_hot"]["divisions"] == 0, r
        assert "expf" not in r["calls"], r
    for r in decode:
        assert r["hot"].get("vpdpbusd", 0) > 0, r
        assert not {"NRT_incref", "NRT_decref"} & set(r["between_hot"]["calls"]), r


def test_cpu_moe_reports_each_format_against_the_naive_loop_before_and_after():
    """bench/cpu_moe.py --naive-each (issue 19's ratio on a VM whose speed drifts): the naive
    loop's row, then each format's point with its ratio to the naive loop timed first and to
    the one timed right after it."""
    run = subprocess.run([sys.executable, str(BENCH / "cpu_moe.py"), "--shape", "tiny",
                          "--format", "int4,int8", "--tokens", "8", "--iters", "2",
                          "--threads", "2", "--naive-each", "--no-amx"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    points = [r for r in rows if r.get("tokens") == 8]
    assert [r["format"] for r in points] == ["torch-bf16-naive", "int4-g32", "int8"]
    naive = points[0]["ms"]
    for r in points[1:]:
        assert r["naive_ms"] == naive and r["naive_after_ms"] > 0
        # (from the unrounded ms: the printed ms are rounded to the microsecond)
        assert r["speedup_vs_naive"] == pytest.approx(naive / r["ms"], rel=0.02, abs=0.011)
        after = r["naive_after_ms"] / r["ms"]
        assert r["speedup_vs_naive_after"] == pytest.approx(after, rel=0.02, abs=0.011)
