"""Would a tile-order weight layout help the AMX GEMM path? One V3 layer at T=1024, the kernels
of kernels_amx (int8 tiles: int8, int4-g128) and kernels_amx_bf16 (bf16 tiles: int4-g32, as
`auto` picks) on the packed rows as stored (row-major: an item reads its 16 rows side by side,
16 streams 7168 or 3584 bytes apart) against the same kernels on a copy laid out in tile order
(each 16-row slab chunk-major: a chunk's 16 rows in one contiguous block, 1 KB for int8 and
int4-g128, so each item reads one sequential stream and each tile load is 1 KB contiguous, as
kt-kernel repacks its weights at load). For int8 a third variant, `row_staged`, keeps the
stored rows but copies an item's 16 rows into a per-thread buffer first, one row after another
(16 sequential reads instead of 16 interleaved streams), and loads the tiles from there: if it
runs as fast as the tile order, the AMX path gets the gain without a new storage layout.
Interleaved in one process; the outputs must be equal.
Needs a CPU with AMX for the times (elsewhere the tiles are emulated: `--small` checks the
equality on a tiny layer in seconds).

    python bench/amx_layout.py [--formats int8,int4-g128,int4-g32] [--tokens 1024] > out.jsonl
    python bench/amx_layout.py --check   # the rewrites still apply to the kernels (any CPU)

A row's chunk is the bytes of k between two rescales (rr = min(G, 128)): 64 bytes of int8 (the
two tile loads of a chunk are chunks of 64) or rr/2 of int4 (one unpack); on bf16 tiles, one
group's G/2 bytes (one unpack_bf16). Only the weights' layout changes; scales, activations and
the rest of the call are the stored path's.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cpu_moe import SHAPES, draw_routing, random_layer  # noqa: E402
from kernel_variant import load, source  # noqa: E402

from hetero.cpu_experts import amx, kernels_amx, kernels_amx_bf16, ops  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.cpu_experts.jobs import EngineConfig  # noqa: E402

# kernels_amx.prefetch_ahead for weights in tile order: byte `pos` of each row's chunk stream
# is at pos * TM of its slab, the 16 rows' chunks `chunk` bytes apart
TILE_ORDER_AHEAD = """
from hetero.cpu_experts.simd_amx import prefetch_rows as _prefetch_rows


@njit(inline="always", nogil=True)
def _tile_order_ahead(a, row0, nrow0, rowb, pos, chunk):
    if pos < rowb:
        _prefetch_rows(a, row0 * rowb + pos * TM, chunk)
    elif nrow0 >= 0:
        _prefetch_rows(a, nrow0 * rowb + (pos - rowb) * TM, chunk)
"""

# the kernel's weight addressing, row-major -> tile order (row0 * rowb: the slab's first byte
# either way; a chunk of c bytes a row sits at chunk index * 16 * c, so byte `at` of each row's
# chunk stream is at `at * TM`)
REWRITES = (
    ("amx.tile_load(tiles, A0, w, row0 * rowb + k0, rowb)",
     "amx.tile_load(tiles, A0, w, row0 * rowb + k0 * TM, 64)"),
    ("amx.tile_load(tiles, A1, w, row0 * rowb + k0 + kt, rowb)",
     "amx.tile_load(tiles, A1, w, row0 * rowb + (k0 + kt) * TM, 64)"),
    ("unpack_rows(w, row0 * rowb, rowb, ab, rr)", "unpack_rows(w, row0 * rowb, rr // 2, ab, rr)"),
    ("unpack_rows(w, row0 * rowb + (k0 + rr) // 2, rowb,",
     "unpack_rows(w, row0 * rowb + (k0 + rr) // 2 * TM, rr // 2,"),
    ("prefetch_ahead(w, row0, nrow0, rowb, at + ahead + line)",
     "_tile_order_ahead(w, row0, nrow0, rowb, at + ahead + line, 64 if int8 else rr // 2)"),
    ("@njit(**JIT)\ndef tile_k(G):", TILE_ORDER_AHEAD + "\n\n@njit(**JIT)\ndef tile_k(G):"),
)  # fmt: skip


# kernels_amx_bf16 (int4-g32 by default): a group of G/2 bytes a row is its chunk
REWRITES_BF16 = (
    ("prefetch_ahead(w, row0, nrow0, rowb, k0 // 2 + ahead)",
     "_tile_order_ahead(w, row0, nrow0, rowb, k0 // 2 + ahead, 64)"),
    ("TK = 32  # k a product\n", TILE_ORDER_AHEAD + "\n\nTK = 32  # k a product\n"),
    ("unpack_bf16(w, row0 * rowb + g * G // 2, rowb,",
     "unpack_bf16(w, row0 * rowb + g * G // 2 * TM, G // 2,"),
)  # fmt: skip


# kernels_amx with int8's item rows copied first, one row after another, into a per-thread
# buffer (16 sequential reads of a row each, not 16 interleaved streams), the tiles loaded from it
REWRITES_STAGED = (
    ("        tiles, ab, sw, acc, cbuf = _thread_state(cfg, most)\n",
     "        tiles, ab, sw, acc, cbuf = _thread_state(cfg, most)\n"
     "        ab = np.empty(max(ab.shape[0], TM * K), np.uint8)\n"),
    ("    if not int8:\n        unpack_rows(w, row0 * rowb, rowb, ab, rr)\n",
     "    if not int8:\n        unpack_rows(w, row0 * rowb, rowb, ab, rr)\n"
     "    else:\n        wu = w.view(np.uint8)\n        for r in range(TM):\n"
     "            ab[r * K : (r + 1) * K] = wu[(row0 + r) * rowb : (row0 + r + 1) * rowb]\n"),
    ("amx.tile_load(tiles, A0, w, row0 * rowb + k0, rowb)", "amx.tile_load(tiles, A0, ab, k0, K)"),
    ("amx.tile_load(tiles, A1, w, row0 * rowb + k0 + kt, rowb)",
     "amx.tile_load(tiles, A1, ab, k0 + kt, K)"),
)  # fmt: skip


def variant_kernels(module=kernels_amx, rewrites=REWRITES, name=""):
    """`module`'s kernels with `rewrites` (by default: the weight addressing of the tile-order
    layout), as an uncached copy named `name`."""
    return load(
        name or f"tile_order_{module.__name__.rpartition('.')[2]}", source(module, rewrites)
    )


def tiles_of(fmt: Format, K: int) -> str:
    """The tiles ops.moe_gemm_amx takes for this format ("auto": bf16 for int4 groups of 32)."""
    return "bf16" if fmt.name == "int4" and fmt.group(K) == 32 else "int8"


def chunk_bytes(fmt: Format, K: int) -> int:
    if tiles_of(fmt, K) == "bf16":
        return fmt.group(K) // 2
    rr = kernels_amx.tile_k(fmt.group(K))[1]
    return 64 if fmt.name == "int8" else rr // 2


def tile_order(w: np.ndarray, chunk: int) -> np.ndarray:
    """Rows [..., rowb] (16-row slabs along the flattened leading dims) -> each slab
    chunk-major: [slab, chunk, 16 rows, chunk bytes], as an array of w's shape."""
    rows = w.reshape(-1, w.shape[-1])
    slabs = rows.reshape(-1, kernels_amx.TM, w.shape[-1] // chunk, chunk)
    return np.ascontiguousarray(slabs.transpose(0, 2, 1, 3)).reshape(w.shape)


def run(modules, layer, x, w, g, times, tiles):
    """out [T, H] of one call through `modules`' kernels (int8 tiles', bf16 tiles'), and its
    seconds."""
    ops.kernels_amx, ops.kernels_amx_bf16 = modules
    out = np.zeros_like(x)
    t0 = time.perf_counter()
    ops.moe_gemm_amx(layer, x, w, g, out, {}, EngineConfig.amx_prefetch_bytes, times, tiles)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default="int8,int4-g128,int4-g32")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--small", action="store_true", help="a tiny layer: the equality check only")
    p.add_argument("--check", action="store_true", help="only build the tile-order kernels")
    args = p.parse_args()
    if args.check:
        variant_kernels(), variant_kernels(kernels_amx_bf16, REWRITES_BF16)
        variant_kernels(rewrites=REWRITES_STAGED, name="staged_kernels_amx")
        n = len(REWRITES) + len(REWRITES_BF16) + len(REWRITES_STAGED)
        print(json.dumps({"bench": "amx_layout", "rewrites": n}))
        return
    H, I, E, k = (256, 128, 8, 2) if args.small else SHAPES["v3"]
    T = 40 if args.small else args.tokens
    amx.enable()
    every = {
        "row_major": (kernels_amx, kernels_amx_bf16),
        "tile_order": (variant_kernels(), variant_kernels(kernels_amx_bf16, REWRITES_BF16)),
        "row_staged": (
            variant_kernels(rewrites=REWRITES_STAGED, name="staged_kernels_amx"),
            kernels_amx_bf16,
        ),
    }
    gen = torch.Generator().manual_seed(0)
    for spec in args.formats.split(","):
        fmt = Format.parse(spec)
        tiles = tiles_of(fmt, H)
        stored = random_layer(fmt, H, I, E)
        tiled = dataclasses.replace(
            stored,
            w13=tile_order(stored.w13, chunk_bytes(fmt, H)),
            w2=tile_order(stored.w2, chunk_bytes(fmt, I)),
        )
        layers = {"row_major": stored, "tile_order": tiled, "row_staged": stored}
        mods = {n: m for n, m in every.items() if n != "row_staged" or fmt.name == "int8"}
        x = torch.randn(T, H, generator=gen).numpy()
        ms = {n: [] for n in mods}
        steps = {n: {} for n in mods}
        equal = True
        for it in range(args.iters + 1):
            ids, w = draw_routing(T, E, k, gen)
            g = ops.group_by_expert(ids.numpy(), E)
            outs = {}
            for name, mod in mods.items():
                times = {}
                outs[name], s = run(mod, layers[name], x, w.float().numpy(), g, times, tiles)
                if it:  # (the first: compiles)
                    ms[name].append(s * 1e3)
                    for step, v in times.items():
                        steps[name][step] = steps[name].get(step, 0) + v * 1e3 / args.iters
            equal &= all(np.array_equal(outs["row_major"], o) for o in outs.values())
            if args.small and not it:  # the control: the stored kernels misread the tiled copy
                wrong, _ = run(every["row_major"], tiled, x, w.float().numpy(), g, {}, tiles)
                assert not np.array_equal(wrong, outs["row_major"]), "the layouts do not differ"
        ops.kernels_amx, ops.kernels_amx_bf16 = every["row_major"]
        for name in mods:
            row = {"bench": "amx_layout", "format": spec, "tiles": tiles, "tokens": T,
                   "layout": name,
                   "ms": round(float(np.median(ms[name])), 1),
                   "gate_up_ms": round(steps[name]["gate_up"], 1),
                   "down_ms": round(steps[name]["down"], 1), "equal": equal}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
