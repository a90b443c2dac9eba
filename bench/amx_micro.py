"""AMX micro-benchmark: time-stamp ticks a tile product (16 x 16 x 64 int8) takes, alone and
with the operand traffic around it that kernels_amx's GEMM path has. Needs a CPU with AMX.

    python bench/amx_micro.py > amx_micro.jsonl

modes: 0 products only (4 independent C tiles); 1 + a B tile load before each, from a span of
`span` bytes (4 KB: L1, 256 KB: L2, 4 MB: L3, 64 MB: DRAM); 2 + zeroing, storing and rescaling
each C tile (simd_amx.rescale); 3 as 2 without the rescale; 4 as 1 with a fresh A tile too.
(2026-11-23's numbers came from the same sequences written out per mode.)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
from numba import njit, prange

from hetero.cpu_experts import amx
from hetero.cpu_experts.kernels_q8 import cycle_rate
from hetero.cpu_experts.simd_amx import rescale
from hetero.cpu_experts.simd_sync import cycle_counter

CFG = amx.config(
    {
        0: (16, 64),
        5: (16, 64),
        6: (16, 64),
        7: (16, 64),
        1: (16, 64),
        2: (16, 64),
        3: (16, 64),
        4: (16, 64),
    }
)


@njit(nogil=True)
def run(mode, n, bbuf, span, cbuf, acc, xs, xsum, sw, abuf):
    tiles = np.zeros(amx.TILES_BYTES, np.uint8)
    amx.tile_config(tiles, CFG)
    amx.tile_load(tiles, 1, abuf, 0, 64)
    amx.tile_load(tiles, 3, bbuf, 0, 64)
    loads, fresh_a, zero_store, rescaled = mode != 0, mode == 4, mode in (2, 3), mode == 2
    t0 = cycle_counter()
    off = 0
    for _i in range(n):  # (the mode's tests are loop-invariant: LLVM hoists them)
        if fresh_a:
            amx.tile_load(tiles, 1, abuf, off, 64)
        if zero_store:
            amx.tile_zero(tiles, 0)
            amx.tile_zero(tiles, 5)
            amx.tile_zero(tiles, 6)
            amx.tile_zero(tiles, 7)
        if loads:
            amx.tile_load(tiles, 3, bbuf, off, 64)
        amx.tile_dp_busd(tiles, 0, 1, 3)
        if loads:
            amx.tile_load(tiles, 4, bbuf, off + 1024, 64)
            amx.tile_dp_busd(tiles, 5, 1, 4)
            amx.tile_load(tiles, 3, bbuf, off + 2048, 64)
        else:
            amx.tile_dp_busd(tiles, 5, 1, 3)
        amx.tile_dp_busd(tiles, 6, 1, 3)
        if loads:
            amx.tile_load(tiles, 4, bbuf, off + 3072, 64)
            amx.tile_dp_busd(tiles, 7, 1, 4)
        else:
            amx.tile_dp_busd(tiles, 7, 1, 3)
        if zero_store:
            amx.tile_store(tiles, 0, cbuf, 0, 64)
            amx.tile_store(tiles, 5, cbuf, 1024, 64)
            amx.tile_store(tiles, 6, cbuf, 2048, 64)
            amx.tile_store(tiles, 7, cbuf, 3072, 64)
        if rescaled:
            for t in range(4):
                c, a = cbuf[t * 256 : (t + 1) * 256], acc[t * 256 : (t + 1) * 256]
                rescale(c, a, xs, xsum, sw, 8)
        off = (off + 4096) % span
    t1 = cycle_counter()
    amx.tile_store(tiles, 0, cbuf, 0, 64)
    amx.tile_release(tiles)
    return (t1 - t0) / n / 4  # ticks a product


@njit(parallel=True, nogil=True)
def run_all(mode, n, bbuf, span, out, abuf):
    for p in prange(out.shape[0]):
        cbuf = np.zeros(1024, np.int32)
        acc = np.zeros(1024, np.float32)
        xs = np.ones(16, np.float32)
        xsum = np.zeros(16, np.int32)
        sw = np.ones(16, np.float32)
        out[p] = run(mode, n, bbuf[p], span, cbuf, acc, xs, xsum, sw, abuf[p])


def main():
    if not amx.enable():
        raise SystemExit("amx_micro: this CPU has no AMX tiles (or Linux refused them)")
    import numba

    ghz = cycle_rate(0.1) / 1e9
    for threads in (1, 16):
        bbuf = np.full((threads, 64 << 20), 3, np.int8)
        abuf = np.full((threads, 64 << 20), 5, np.uint8)
        for mode, span in [
            (0, 4096),
            (1, 4096),
            (1, 256 << 10),
            (1, 4 << 20),
            (1, 64 << 20),
            (2, 4096),
            (3, 4096),
            (2, 256 << 10),
            (4, 256 << 10),
            (4, 64 << 20),
        ]:
            out = np.zeros(threads)
            numba.set_num_threads(threads)
            run_all(mode, 1000, bbuf, span, out, abuf)
            run_all(mode, 200000 if span <= 4096 else 20000, bbuf, span, out, abuf)
            r = {
                "threads": threads,
                "mode": mode,
                "span": span,
                "tsc_ghz": round(ghz, 2),
                "ticks_per_product": round(float(out.mean()), 1),
            }
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
