"""AMX bf16 tile schedules: nanoseconds a 16 x 16 x 32 bf16 product takes under each order of
tile loads and products that kernels_amx_bf16 could use, with A and B tiles streamed from spans
the size of an item's operands (A: the unpacked rows, 224 KB for V3's K; B: two token tiles' B
tiles, 448 KB, in L2), and from 16 KB spans (L1: what blocking k across an item's slabs could
keep there). Tile registers are not renamed: a load into a tile waits for every
earlier product that reads it, so the order decides how much of a load's latency is hidden.
Needs a CPU with AMX.

    python bench/amx_schedules.py > amx_schedules.jsonl

schedules (rows x token tiles of C in the tile unit; loads a product):
  products   4 C tiles, operands never reloaded (the tile unit's own rate)
  products2  2 C tiles, operands never reloaded (two accumulation chains only)
  1x2        one A tile, two B tiles into two C (kernels_amx_bf16 at two token tiles): 1.5
  1x4        one A tile, four B tiles (two registers) into four C (at 4+ token tiles): 1.25
  2x2        two A, two B, four C (kernels_amx_bf16._slab_pair_times_tiles): 1.0
  1x2db      1x2 with two register sets, alternate chunks (a load never waits on the
             products of the chunk before): 1.5
  2x1db      two A (two 16-row slabs), one B, two C, two register sets: 1.5
  4x1        four A (two registers), one B, four C (four slabs at one token tile): 1.25
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numba
import numpy as np
from numba import njit, prange

from hetero.cpu_experts import amx
from hetero.cpu_experts.amx import tile_dp_bf16ps as dp
from hetero.cpu_experts.amx import tile_load as ld

CFG = amx.config({t: (16, 64) for t in range(8)})
T = 1024  # bytes a tile
SCHEDULES = ("products", "products2", "1x2", "1x4", "2x2", "1x2db", "2x1db", "4x1")


@njit(nogil=True)
def _run(which, n, a, b, na, nb, sums):
    """Products of `n` rounds of schedule `which` (its index in SCHEDULES); A tiles from a
    (na of them, in turn), B tiles from b (nb). Returns the products done; its C tiles end in
    sums [4 * 256] f32 (two-C schedules: the first two)."""
    t = np.zeros(amx.TILES_BYTES, np.uint8)
    amx.tile_config(t, CFG)
    amx.tile_zero(t, 0)
    amx.tile_zero(t, 5)
    amx.tile_zero(t, 6)
    amx.tile_zero(t, 7)
    ld(t, 1, a, 0, 64)  # the operands of the schedules that never load them
    ld(t, 2, a, T, 64)
    ld(t, 3, b, 0, 64)
    ld(t, 4, b, T, 64)
    ia, ib, done = 0, 0, 0
    for _ in range(n):
        pa, pb = ia * T, ib * T  # this round's first A and B tiles
        if which == 0:
            dp(t, 0, 1, 3)
            dp(t, 5, 1, 4)
            dp(t, 6, 2, 3)
            dp(t, 7, 2, 4)
            done += 4
        elif which == 1:
            dp(t, 0, 1, 3)
            dp(t, 5, 1, 4)
            dp(t, 0, 2, 3)
            dp(t, 5, 2, 4)
            done += 4
        elif which == 2:  # two chunks: A0 then A1, each against B0 and B1
            ld(t, 1, a, pa, 64)
            ld(t, 3, b, pb, 64)
            dp(t, 0, 1, 3)
            ld(t, 4, b, pb + T, 64)
            dp(t, 5, 1, 4)
            ld(t, 2, a, pa + T, 64)
            ld(t, 3, b, pb + 2 * T, 64)
            dp(t, 0, 2, 3)
            ld(t, 4, b, pb + 3 * T, 64)
            dp(t, 5, 2, 4)
            done += 4
        elif which == 3:
            ld(t, 1, a, pa, 64)
            ld(t, 3, b, pb, 64)
            dp(t, 0, 1, 3)
            ld(t, 4, b, pb + T, 64)
            dp(t, 5, 1, 4)
            ld(t, 3, b, pb + 2 * T, 64)
            dp(t, 6, 1, 3)
            ld(t, 4, b, pb + 3 * T, 64)
            dp(t, 7, 1, 4)
            done += 4
        elif which == 4:
            ld(t, 1, a, pa, 64)
            ld(t, 2, a, pa + T, 64)
            ld(t, 3, b, pb, 64)
            dp(t, 0, 1, 3)
            dp(t, 6, 2, 3)
            ld(t, 4, b, pb + T, 64)
            dp(t, 5, 1, 4)
            dp(t, 7, 2, 4)
            done += 4
        elif which == 5:  # C 0, 5; set one: A 1, B 3 4; set two: A 2, B 6 7
            ld(t, 1, a, pa, 64)
            ld(t, 3, b, pb, 64)
            ld(t, 4, b, pb + T, 64)
            dp(t, 0, 1, 3)
            dp(t, 5, 1, 4)
            ld(t, 2, a, pa + T, 64)
            ld(t, 6, b, pb + 2 * T, 64)
            ld(t, 7, b, pb + 3 * T, 64)
            dp(t, 0, 2, 6)
            dp(t, 5, 2, 7)
            done += 4
        elif which == 6:  # C 0, 5; set one: A 1 2, B 3; set two: A 4 6, B 7
            ld(t, 1, a, pa, 64)
            ld(t, 2, a, pa + T, 64)
            ld(t, 3, b, pb, 64)
            dp(t, 0, 1, 3)
            dp(t, 5, 2, 3)
            ld(t, 4, a, pa + 2 * T, 64)
            ld(t, 6, a, pa + 3 * T, 64)
            ld(t, 7, b, pb + T, 64)
            dp(t, 0, 4, 7)
            dp(t, 5, 6, 7)
            done += 4
        else:  # C 0 5 6 7; B 3; A through 1 and 2
            ld(t, 3, b, pb, 64)
            ld(t, 1, a, pa, 64)
            dp(t, 0, 1, 3)
            ld(t, 2, a, pa + T, 64)
            dp(t, 5, 2, 3)
            ld(t, 1, a, pa + 2 * T, 64)
            dp(t, 6, 1, 3)
            ld(t, 2, a, pa + 3 * T, 64)
            dp(t, 7, 2, 3)
            done += 4
        ia, ib = (ia + 4) % na, (ib + 4) % nb
    amx.tile_store(t, 0, sums, 0, 64)
    amx.tile_store(t, 5, sums, T, 64)
    if which in (0, 3, 4, 7):
        amx.tile_store(t, 6, sums, 2 * T, 64)
        amx.tile_store(t, 7, sums, 3 * T, 64)
    amx.tile_release(t)
    return done


@njit(parallel=True, nogil=True)
def _run_all(which, n, a, b, na, nb, done, sums):
    for p in prange(done.shape[0]):
        done[p] = _run(which, n, a[p], b[p], na, nb, sums[p])


def operands(threads: int, a_bytes: int, b_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each thread's A and B spans, every bf16 value 0.5 (a product adds 8 to each C value)."""
    a = np.full((threads, a_bytes // 2), 0x3F00, np.uint16).view(np.uint8)
    b = np.full((threads, b_bytes // 2), 0x3F00, np.uint16).view(np.uint8)
    return a, b


def measure(which: int, threads: int, a: np.ndarray, b: np.ndarray, rounds: int) -> float:
    """ns a product on each thread (wall time over the products one thread does)."""
    done = np.zeros(threads, np.int64)
    sums = np.zeros((threads, 4 * T // 4), np.float32)
    numba.set_num_threads(threads)
    na, nb = a.shape[1] // T, b.shape[1] // T
    _run_all(which, 100, a, b, na, nb, done, sums)  # compiled, tiles granted, spans touched
    t0 = time.perf_counter()
    _run_all(which, rounds, a, b, na, nb, done, sums)
    return (time.perf_counter() - t0) * 1e9 / done[0]


def check() -> dict:
    """Each schedule's products, emulated where the CPU has no AMX: every C value it stores is
    8 a product (0.5 x 0.5 x 32 k), all of them together 8 x 256 x the products done."""
    a, b = operands(1, 8 * T, 8 * T)
    for which, name in enumerate(SCHEDULES):
        done, sums = np.zeros(1, np.int64), np.zeros((1, T), np.float32)
        _run_all(which, 3, a, b, 8, 8, done, sums)
        if done[0] != 12 or sums.sum() != 8 * 256 * 12:
            raise SystemExit(f"amx_schedules: {name} did {done[0]} products, sums {sums.sum()}")
    return {"check": "ok", "schedules": len(SCHEDULES)}


def main() -> None:
    if "--check" in sys.argv:
        print(json.dumps(check()))
        return
    if not amx.enable():
        raise SystemExit("amx_schedules: this CPU has no AMX tiles (or Linux refused them)")
    most = numba.config.NUMBA_NUM_THREADS
    for threads in sorted({1, most}):
        for where, a_kb, b_kb in (("L2", 224, 448), ("L1", 16, 16)):
            a, b = operands(threads, a_kb << 10, b_kb << 10)
            for which, name in enumerate(SCHEDULES):
                ns = min(measure(which, threads, a, b, 200_000) for _ in range(3))
                row = {"threads": threads, "operands": where, "schedule": name,
                       "ns_per_product": round(ns, 2),
                       "tflops_per_core": round(16 * 16 * 32 * 2 / ns / 1e3, 3)}  # fmt: skip
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
