"""What bounds the AMX GEMM kernel: variants of kernels_amx with parts removed (their results
are wrong; only their times matter), one V3 layer at T=1024, interleaved in one process. Needs a
CPU with AMX.

    python bench/amx_ablate.py [--tiles bf16] > amx_ablate.jsonl
    python bench/amx_ablate.py --check [--tiles bf16]   # the variants build (any CPU)

int8 tiles (kernels_amx): full; no_rescale (C tiles never read back); no_unpack (int4 rows not
unpacked: stale A tiles); no_scales (weight scales not loaded); no_tile_ops (every tile
instruction a no-op: the vector work alone); only_tile_ops (no rescale, unpack or scales: the
tile work alone).
bf16 tiles (kernels_amx_bf16, int4-g32): full; no_unpack (the tile work alone); no_tile_ops (the
vector work alone); 2x2, 1x2db and kb (the other orders of kernels_amx_bf16.ORDERS) and
no_unpack_2x2, no_unpack_1x2db, no_unpack_kb (their tile work alone). (Three B tiles in
rotation instead of two, measured 2026-11-23 on the H100 machine: no gain.)
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cpu_moe import SHAPES, draw_routing, random_layer  # noqa: E402
from kernel_variant import load, rewrite, source  # noqa: E402

from hetero.cpu_experts import amx, kernels_amx, kernels_amx_bf16, ops  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.cpu_experts.jobs import EngineConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tiles", choices=("int8", "bf16"), default="int8")
p.add_argument("--check", action="store_true", help="only build the variants (any CPU; tests)")
ARGS = p.parse_args()
TILES = ARGS.tiles
ORIGINAL = kernels_amx_bf16 if TILES == "bf16" else kernels_amx
src = source(ORIGINAL)
AHEAD = EngineConfig.amx_prefetch_bytes
NOOP = "\nfrom numba import njit as _nj\n@_nj\ndef _noop(*a):\n    return\n"


def int8_variants(src: str) -> dict[str, str]:
    variants = {"full": src}
    variants["no_rescale"] = rewrite(
        src, "    base = q % 2 * nt * TM * TM\n", "    return\n    base = q % 2 * nt * TM * TM\n"
    )
    no_unpack = ("    unpack_rows,\n)\n", ")\n" + NOOP + "unpack_rows = _noop\n")
    no_scales = ("load_scales(s, row0 * ng + g, ng, sw[q % 2])", "sw[q % 2] = 1.0")
    variants["no_unpack"] = rewrite(src, *no_unpack)
    variants["no_scales"] = rewrite(src, *no_scales)
    t = src
    for op in ("tile_load", "tile_store", "tile_zero", "tile_dp_busd", "tile_dp_bssd"):
        t = rewrite(t, f"amx.{op}(", "_noop(", every=True)
    variants["no_tile_ops"] = rewrite(
        t, "from hetero.cpu_experts import amx\n", "from hetero.cpu_experts import amx\n" + NOOP
    )
    variants["only_tile_ops"] = rewrite(rewrite(variants["no_rescale"], *no_unpack), *no_scales)
    return variants


def bf16_variants(src: str) -> dict[str, str]:
    variants = {"full": src}
    variants["no_unpack"] = rewrite(
        src,
        "from hetero.cpu_experts.simd_amx import unpack_bf16",
        "from hetero.cpu_experts.simd_amx import prefetch_rows" + NOOP + "unpack_bf16 = _noop\n",
    )
    t = src
    for op in ("tile_load", "tile_store", "tile_zero", "tile_dp_bf16ps"):
        t = rewrite(t, f"amx.{op}(", "_noop(", every=True)
    t = rewrite(t, "_sums_moved_by(amx.tile_store), _sums_moved_by(amx.tile_load)",
                "_sums_moved_by(_noop), _sums_moved_by(_noop)")  # fmt: skip
    variants["no_tile_ops"] = rewrite(
        t, "from hetero.cpu_experts import amx\n", "from hetero.cpu_experts import amx\n" + NOOP
    )
    return variants


variants = (bf16_variants if TILES == "bf16" else int8_variants)(src)
for k, v in variants.items():
    assert k == "full" or v != src, k
mods = {k: load(f"amxv_{k}", v) for k, v in variants.items()}
runs = {name: (mod, "1x4") for name, mod in mods.items()}  # variant -> (kernels, bf16 order)
if TILES == "bf16":  # the other orders (kernels_amx_bf16.ORDERS): whole, and the tile work alone
    for order in ("2x2", "1x2db", "kb"):
        runs |= {order: (mods["full"], order), f"no_unpack_{order}": (mods["no_unpack"], order)}
if ARGS.check:
    print(json.dumps({"tiles": TILES, "variants": sorted(runs)}))
    raise SystemExit(0)
amx.enable()
H, I, E, k = SHAPES["v3"]
gen = torch.Generator().manual_seed(0)
T = 1024
for spec in ["int4"] if TILES == "bf16" else ["int4", "int4-g128", "int8"]:  # (auto's formats)
    layer = random_layer(Format.parse(spec), H, I, E)
    x = torch.randn(T, H, generator=gen).numpy()
    scratch = {}
    res = {n: [] for n in runs}
    steps = {n: {} for n in runs}
    for it in range(4):
        for name, (mod, order) in runs.items():
            ids, w = draw_routing(T, E, k, gen)
            g = ops.group_by_expert(ids.numpy(), E)
            out = np.zeros((T, H), np.float32)
            setattr(ops, ORIGINAL.__name__.rpartition(".")[2], mod)
            times = {}
            t0 = time.perf_counter()
            ops.moe_gemm_amx(layer, x, w.float().numpy(), g, out, scratch, AHEAD, times, TILES,
                             order)  # fmt: skip
            if it:
                res[name].append((time.perf_counter() - t0) * 1e3)
                for s_, v in times.items():
                    steps[name][s_] = steps[name].get(s_, 0) + v * 1e3 / 3
    setattr(ops, ORIGINAL.__name__.rpartition(".")[2], ORIGINAL)
    for name in runs:
        print(
            json.dumps(
                {
                    "format": spec,
                    "tokens": T,
                    "tiles": TILES,
                    "variant": name,
                    "ms": round(float(np.median(res[name])), 1),
                    "gate_up_ms": round(steps[name]["gate_up"], 1),
                    "down_ms": round(steps[name]["down"], 1),
                }
            ),
            flush=True,
        )
