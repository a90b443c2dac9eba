"""mla_decode's tile settings at DeepSeek-V3's shapes: heads a program (block_h), cache tokens a
step (block_n), warps and pipeline stages, timed on one paged cache (page 64, bf16) per batch x
context, each against the default's output and against the device copy bandwidth and the
FLOPs it does (V3's 128 heads: ~245 FLOPs a cache byte, so bf16 tensor-core time bounds it).
Timed as a decode step runs it: a CUDA graph calls the kernel on copies of the cache (256 MB
of them, up to 64), none warm in L2, no Python launch between calls; ms a call (until
2026-12-04 each call was launched from Python between two events: small points measured the
launch).
`--grid splits`: the default tiles over several splits of the context
(mla_decode.split_count's choice, the earlier rule's, fixed counts). JSON lines;
`python bench/mla_sweep.py [--points 32x8192,1x4096] [--grid tiles|pipeline|splits]`."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import gpu_kernels_shapes as S  # noqa: E402
from bench.fp8_sweep import graphed  # noqa: E402
from bench.gpu_floor import cuda_ms, hbm_copy_gbps  # noqa: E402
from hetero.config import ModelConfig  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "models"
COLD_BYTES = 256 << 20  # caches a replay reads, summed: several times the H200's 50 MB of L2
TILES = [  # (block_h, block_n, num_warps, num_stages, splits); the default first (None: the rule)
    (None, 64, 8, 2, None),
    *((h, n, w, 2, None) for h, n, w in itertools.product((16, 32, 64), (32, 64), (4, 8))),
]
PIPELINE = [  # the default heads and warps with deeper pipelines over smaller token steps
    (64, 64, 8, 2, None),
    (64, 64, 8, 1, None),
    (64, 64, 8, 3, None),
    (64, 32, 8, 2, None),
    (64, 32, 8, 3, None),
    (64, 32, 8, 4, None),
    (64, 16, 8, 4, None),
]


def split_configs(B: int, ctx: int, heads: int, sms: int) -> list[tuple]:
    """The default tiles at the default rule's splits (None), the eleventh session's rule
    (~2 programs an SM) and a few fixed counts."""
    programs = B * triton.cdiv(heads, 64)
    old = max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(ctx, 256)))
    fixed = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= triton.cdiv(ctx, 64)]  # (rule: 256)
    return [(64, 64, 8, 2, n) for n in dict.fromkeys([None, old, *fixed])]


def main() -> None:
    from hetero.gpu.mla_decode import head_block, mla_decode, split_count

    p = argparse.ArgumentParser()
    p.add_argument("--points", default="32x8192,1x4096", help="batch x context, comma-separated")
    p.add_argument("--grid", choices=("tiles", "pipeline", "splits"), default="tiles",
                   help="tile shapes, pipeline stages, or splits of the context")  # fmt: skip
    fi_help = "also flashinfer's paged MLA kernel at each point (needs flashinfer)"
    p.add_argument("--flashinfer", action="store_true", help=fi_help)
    args = p.parse_args()
    c = ModelConfig.from_hf(MODELS / "deepseek-v3")
    C, R, h, scale = c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads, c.softmax_scale
    gen = torch.Generator(device="cuda").manual_seed(0)
    hbm = hbm_copy_gbps("cuda")
    for point in args.points.split(","):
        B, ctx = map(int, point.split("x"))
        latent, rope, table = S.paged(gen, [ctx] * B, C, R, 64)
        # copies of the layer's cache, each call of a replay on the next: as a decode step runs
        # 61 layers, none is read from L2, and the launches are the graph's, not Python's
        copies = min(64, max(1, -(-COLD_BYTES // (latent.nbytes + rope.nbytes))))
        caches = [(latent, rope)] + [(latent.clone(), rope.clone()) for _ in range(copies - 1)]
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q_lat = torch.randn(B, h, C, device="cuda", generator=gen, dtype=torch.bfloat16)
        q_pe = torch.randn(B, h, R, device="cuda", generator=gen, dtype=torch.bfloat16)
        want, nbytes = None, S.mla_decode_bytes(B, ctx, C, R)
        flops = S.mla_decode_flops(B, ctx, h, C, R)
        sms = torch.cuda.get_device_properties("cuda").multi_processor_count
        grid = {"tiles": TILES, "pipeline": PIPELINE}.get(args.grid) or split_configs(
            B, ctx, h, sms
        )
        for bh, bn, warps, stages, splits in grid:

            def run(lat=latent, rp=rope, splits=splits, bh=bh, bn=bn, w=warps, st=stages):
                return mla_decode(q_lat, q_pe, lat, rp, table, lens, scale, splits=splits,
                                  block_h=bh, block_n=bn, num_warps=w, num_stages=st)  # fmt: skip

            bh = bh or head_block(B, h, ctx, sms)
            row = {"bench": "mla_sweep", "batch": B, "ctx": ctx, "block_h": bh, "block_n": bn,
                   "num_warps": warps, "num_stages": stages,
                   "splits": splits if splits is not None else split_count(
                       B * triton.cdiv(h, bh), ctx, bn, sms)}  # fmt: skip
            try:
                out = run()
                replay = graphed(lambda: [run(lat, rp) for lat, rp in caches])  # noqa: B023
                ms = cuda_ms(replay) / copies
            except Exception as e:  # a tile that does not fit (shared memory, registers)
                print(json.dumps(row | {"error": str(e).split("\n")[0][:200]}), flush=True)
                continue
            want = out if want is None else want
            err = ((out.float() - want.float()).norm() / want.float().norm()).item()
            print(json.dumps(row | {
                "ms": round(ms, 4), "copies": copies, "tflops": round(flops / ms / 1e9, 1),
                "gbps": round(nbytes / ms / 1e6, 1), "hbm_gbps": round(hbm),
                "frac_hbm": round(nbytes / ms / 1e6 / hbm, 3), "rel_err_vs_default": err,
            }), flush=True)  # fmt: skip
        if args.flashinfer:
            point_row = {"bench": "mla_sweep", "batch": B, "ctx": ctx}
            ms, mode, err = flashinfer_ms(q_lat, q_pe, caches, table, [ctx] * B, scale, want)
            print(json.dumps(point_row | {
                "path": "flashinfer", "timing": mode, "ms": round(ms, 4), "copies": copies,
                "tflops": round(flops / ms / 1e9, 1), "frac_hbm": round(nbytes / ms / 1e6 / hbm, 3),
                "rel_err_vs_default": err,
            }), flush=True)  # fmt: skip


def flashinfer_ms(q_lat, q_pe, caches, table, lens, scale, want) -> tuple[float, str, float]:
    """flashinfer's kernel over the same pages (planned once): ms a call (in a CUDA graph over
    the cache copies where it captures, else launched from Python), and its error against
    mla_decode's output."""
    from hetero.gpu.flashinfer_mla import FlashInferMLA, shared_workspace

    B, h, C = q_lat.shape
    fi = FlashInferMLA(shared_workspace({}, q_lat.device))
    batch = SimpleNamespace(page_table=table, ctx_lens=lens, q_lens=[1] * B)
    fi.plan(batch, caches[0][0].shape[1], h, C, q_pe.shape[-1], scale, q_lat.dtype)
    out = fi.run(q_lat, q_pe, *caches[0])
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    calls = lambda: [fi.run(q_lat, q_pe, lat, rp) for lat, rp in caches]  # noqa: E731
    try:
        return cuda_ms(graphed(calls)) / len(caches), "graph", err
    except Exception:  # (a plan that does not capture: Python launches counted in)
        return cuda_ms(calls) / len(caches), "eager", err


if __name__ == "__main__":
    main()
