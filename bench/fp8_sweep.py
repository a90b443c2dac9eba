"""fp8_gemm's launch settings at decode sizes on DeepSeek-V3's matrices: output rows a program
(block_n), warps, pipeline stages and programs an SM (the split-K degree), each against the
default's output, the weight's bytes over the device copy bandwidth measured in the same run
(the floor), and bf16 cuBLAS on the dequantized weight (the naive path). Split-K sums in the
kernel (tile counters, as FP8Linear runs it); CUDA-graph replays, so launch overhead from the
host does not count. A replay of one matrix keeps the smaller ones in L2; `--cold-mb 512` runs
it over copies of the weight instead, back to back as the decode step's matrices run. JSON
lines; `python bench/fp8_sweep.py`. `--small`: fp8_small's launch settings at serving's batch
sizes (17-64 rows) instead, beside cuBLAS's block-scaled GEMM on the same rows (FP8Linear's
path there by default) and the W8A16 kernel."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_floor import cuda_ms, hbm_copy_gbps  # noqa: E402
from hetero.gpu.fp8_gemm import TILES, Tiles, fp8_gemm, tile_counters  # noqa: E402
from hetero.gpu.fp8_prefill import scaled_mm_w8a8  # noqa: E402
from hetero.gpu.fp8_small import SMALL_TILES, SmallTiles, counters_for, fp8_small  # noqa: E402
from hetero.model.fp8 import block_dequantize, block_quantize  # noqa: E402

SHAPES = {  # N x K: V3's decode matrices (qkv_a and gate_up as fused at load)
    "qkv_a": (2112, 7168), "o": (7168, 16384), "shared_gate_up": (4096, 7168),
    "q_b": (24576, 1536), "shared_down": (7168, 2048), "dense_gate_up": (36864, 7168),
}  # fmt: skip
VARIANTS = [
    Tiles(block_n=n, num_warps=w, per_sm=ps, mma=mma)
    for mma, n, w, ps in itertools.product((True, False), (32, 64, 128), (4, 8), (4, 8))
]
# mma=False: one row on the CUDA cores, more rows keep the MMA
SWEEP = [TILES] + [t for t in VARIANTS if t != TILES]
SMALL = [SMALL_TILES] + [
    t for t in (SmallTiles(block_w=b, per_sm=ps, num_warps=w)
                for b, ps, w in itertools.product((64, 128), (1, 2, 4), (4, 8)))
    if t != SMALL_TILES
]  # fmt: skip


def small_paths(sweep: bool) -> list:
    """(name, tiles, fn(x, q, s, counters)) of --small: cuBLAS, the W8A16 kernel, fp8_small."""
    paths = [("torch._scaled_mm", None, lambda x, q, s, c: scaled_mm_w8a8(x, q, s, (128, 128))),
             ("fp8_gemm", None, lambda x, q, s, c: fp8_gemm(x, q, s, counters=None))]  # fmt: skip
    for t in SMALL if sweep else [SMALL_TILES]:
        paths.append(("fp8_small", t, lambda x, q, s, c, t=t: fp8_small(x, q, s, c, tiles=t)))
    return paths


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,16", help="tokens, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help="of " + ", ".join(SHAPES))
    p.add_argument("--k-unroll", help="instead of the sweep: the default tiles with block_n 32 "
                   "and 64 and these K-block unrolls (e.g. 1,2,4)")  # fmt: skip
    cold = "each replay runs the GEMV over copies of the weight filling this many MB: none in L2"
    p.add_argument("--cold-mb", type=int, default=0, help=cold + " (ms: a copy's)")
    p.add_argument("--small", action="store_true", help="fp8_small's settings (rows 17-64)")
    args = p.parse_args()
    if args.small:
        return small_sweep(args)
    sweep = SWEEP
    if args.k_unroll:
        sweep = [dataclasses.replace(TILES, block_n=b, k_unroll=int(u))
                 for b in (32, 64) for u in args.k_unroll.split(",")]  # fmt: skip
    hbm = hbm_copy_gbps("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        w = torch.randn(N, K, device="cuda", generator=gen) / K**0.5
        q, s = block_quantize(w)
        dense = block_dequantize(q, s, (128, 128)).to(torch.bfloat16)
        n = max(1, -(-args.cold_mb * 2**20 // q.numel()))  # copies, cold in L2 if > 1
        copies = [(q, s)] + [(q.clone(), s.clone()) for _ in range(n - 1)]
        floor_ms = (q.numel() + s.numel() * 4) / hbm / 1e6
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            base = {"bench": "fp8_sweep", "shape": name, "N": N, "K": K, "M": M, "copies": n,
                    "hbm_gbps": round(hbm), "floor_ms": round(floor_ms, 4)}  # fmt: skip
            naive = cuda_ms(graphed(lambda: x @ dense.T), 30)
            want = fp8_gemm(x, q, s).float()
            counters = tile_counters(N, max(M, 16), x.device)  # as FP8Linear keeps its own
            for tiles in sweep:
                row = base | dataclasses.asdict(tiles)
                run = lambda: fp8_gemm(x, q, s, tiles=tiles, counters=counters)  # noqa: B023, E731
                every = lambda: [fp8_gemm(x, a, b, tiles=tiles, counters=counters)  # noqa: B023, E731
                                 for a, b in copies]  # fmt: skip
                try:
                    out = run().float()
                    ms = cuda_ms(graphed(every), 30) / n
                except Exception as e:  # a tile that does not fit
                    print(json.dumps(row | {"error": str(e).split("\n")[0][:200]}), flush=True)
                    continue
                err = ((out - want).norm() / want.norm()).item()
                print(json.dumps(row | {
                    "ms": round(ms, 4), "frac_hbm": round(floor_ms / ms, 3),
                    "bf16_dequantized_ms": round(naive, 4), "vs_bf16": round(naive / ms, 3),
                    "rel_err_vs_default": err,
                }), flush=True)  # fmt: skip


def small_sweep(args) -> None:
    """--small: each path over cold copies of each matrix, CUDA-graph replays."""
    hbm = hbm_copy_gbps("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = "16,32,64" if args.rows == "1,16" else args.rows
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        q, s = block_quantize(torch.randn(N, K, device="cuda", generator=gen) / K**0.5)
        n = max(1, -(-max(args.cold_mb, 256) * 2**20 // q.numel()))  # copies: none in L2
        copies = [(q, s)] + [(q.clone(), s.clone()) for _ in range(n - 1)]
        counters = [counters_for(N, q.device) for _ in copies]
        floor_ms = (q.numel() + s.numel() * 4) / hbm / 1e6
        for M in map(int, rows.split(",")):
            x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            want = scaled_mm_w8a8(x, q, s, (128, 128))
            want = (want if want is not None else fp8_gemm(x, q, s)).float()
            for path, tiles, fn in small_paths(sweep=True):
                row = {"bench": "fp8_sweep", "mode": "small", "shape": name, "N": N, "K": K,
                       "M": M, "copies": n, "path": path, "hbm_gbps": round(hbm),
                       "floor_ms": round(floor_ms, 4)}  # fmt: skip
                row |= dataclasses.asdict(tiles) if tiles else {}
                every = lambda: [fn(x, a, b, c) for (a, b), c in zip(copies, counters)]  # noqa: B023, E731
                try:
                    out = fn(x, q, s, counters[0])
                    if out is None:
                        raise RuntimeError("not supported here")
                    ms = cuda_ms(graphed(every), 30) / n
                except Exception as e:  # a tile that does not fit, a path this torch lacks
                    print(json.dumps(row | {"error": str(e).split("\n")[0][:200]}), flush=True)
                    continue
                err = ((out.float() - want).norm() / want.norm()).item()
                print(json.dumps(row | {"ms": round(ms, 4), "frac_hbm": round(floor_ms / ms, 3),
                                        "rel_err_vs_cublas": err}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
