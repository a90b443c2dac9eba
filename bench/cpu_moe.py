"""One MoE layer's routed experts on the CPU: hetero's engine vs the host's read bandwidth and a
naive torch BF16 per-expert loop, in the same run. Prints JSON lines.

    python bench/cpu_moe.py --shape v3 --format bf16,int8,int4 --tokens 1,4,16,64,256,1024

Weights are random but laid out for a full layer (all 256 experts of DeepSeek-V3), and each
iteration draws fresh experts per token, so they come from RAM and not from the 300 MB L3.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from functools import partial

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hetero.cpu_experts import amx, kernels_amx_bf16  # noqa: E402
from hetero.cpu_experts.engine import CPUExperts, EngineConfig  # noqa: E402
from hetero.cpu_experts.formats import Format, PackedExperts, as_tensor  # noqa: E402

SHAPES = {  # hidden, moe_intermediate, experts, top-k
    "v3": (7168, 2048, 256, 8),
    "v2-lite": (2048, 1408, 64, 6),
    "tiny": (512, 256, 32, 4),
}


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _read_probe(a):
    """Sums a large array with numba's own threads: the host's read bandwidth."""
    n = a.shape[0]
    chunks = 256
    step = (n + chunks - 1) // chunks
    partial = np.zeros(chunks, a.dtype)
    for c in prange(chunks):
        seg = a[c * step : min(n, (c + 1) * step)]  # a loop from 0 over a slice vectorizes
        s = partial[c]
        for i in range(seg.shape[0]):
            s += seg[i]
        partial[c] = s
    return partial.sum()


@njit(parallel=True, nogil=True, cache=True)
def _fill(a, seed):
    """Random bytes, fast (a splitmix hash per 8-byte word)."""
    for i in prange(a.shape[0]):
        z = np.uint64(i) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        a[i] = z ^ (z >> np.uint64(31))


def random_bytes(shape, dtype, seed) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    words = np.empty((n + 7) // 8, np.uint64)
    _fill(words, seed)
    return words.view(np.uint8)[:n].view(dtype).reshape(shape)


def random_bf16(shape, seed) -> np.ndarray:
    """bf16 bits of |w| in [2^-8, 2^-6) with random signs: finite, realistic magnitudes."""
    return (random_bytes(shape, np.uint16, seed) & 0x80FF) | 0x3B80


def rates(ms: float, bytes_read: float, bw: float, H: int, I: int, T: int, k: int) -> dict:
    gbps = bytes_read / ms / 1e6
    return {
        "ms": round(ms, 3),
        "gbps": round(gbps, 1),
        "frac_read_bw": round(gbps / bw, 3),
        "tflops": round(2 * 3 * H * I * T * k / ms / 1e9, 3),
    }


def random_layer(fmt: Format, H: int, I: int, E: int, seed: int = 0) -> PackedExperts:
    """A full layer of random packed experts, finite values and realistic magnitudes."""
    if fmt.name == "bf16":
        w13, w2 = random_bf16((E, I, 2, H), seed), random_bf16((E, H, I), seed + 1)
        return PackedExperts(
            fmt, w13, np.zeros((E, I, 2, 0), np.float32), w2, np.zeros((E, H, 0), np.float32)
        )
    if fmt.name == "int8":
        w13, w2 = (
            random_bytes((E, I, 2, H), np.int8, seed),
            random_bytes((E, H, I), np.int8, seed + 1),
        )
        s13 = np.full((E, I, 2, fmt.groups(H)), 1e-4, np.float32)
        s2 = np.full((E, H, fmt.groups(I)), 1e-4, np.float32)
        return PackedExperts(fmt, w13, s13, w2, s2)
    w13, w2 = (
        random_bytes((E, I, 2, H // 2), np.uint8, seed),
        random_bytes((E, H, I // 2), np.uint8, seed + 1),
    )
    s13 = np.full((E, I, 2, fmt.groups(H)), 0x3A80, np.uint16)  # bf16 ~1e-3
    s2 = np.full((E, H, fmt.groups(I)), 0x3A80, np.uint16)
    return PackedExperts(fmt, w13, s13, w2, s2)


def draw_routing(
    T: int, E: int, k: int, gen: torch.Generator, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] (k distinct experts a token), weights [T, k]. alpha < 1: the T tokens choose
    experts as round(T ** alpha) independent tokens would (each token takes one of that many
    independent draws: hetero.predict's routing_alpha; serving's random-weight V3 read as 0.69)."""
    n = max(1, round(T**alpha))
    ids = torch.rand(n, E, generator=gen).topk(k, dim=-1).indices  # [n, k]
    if n < T:
        ids = ids[torch.randint(0, n, (T,), generator=gen)]  # [T, k]
    return ids, torch.rand(T, k, generator=gen)


def time_routed(fn, x, routes, iters: int) -> float:
    """Median ms of fn(x, ids, weights) over `iters` calls, cycling through the drawn routes."""
    it = iter(routes * (iters // len(routes) + 2))
    fn(x, *next(it))
    return median_ms(lambda: fn(x, *next(it)), iters)


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def read_bandwidth(gb: float = 4.0) -> dict[str, float]:
    """GB/s reading a 4 GB array (13x the L3), best of 5, by three readers; the limit: their max."""
    a = random_bytes((int(gb * 2**30) // 8,), np.int64, 7)
    f = (a & 0x3FFFFFFF3FFFFFFF).view(np.float32)  # finite floats
    t = torch.from_numpy(f)
    readers = {
        "numba_i64": lambda: _read_probe(a),
        "numba_f32": lambda: _read_probe(f),
        "torch_sum": lambda: t.sum(),
    }
    out = {}
    for name, fn in readers.items():
        fn()
        out[name] = round(a.nbytes / min(median_ms(fn, 1) for _ in range(5)) / 1e6, 1)
    return out


def naive_torch_loop(w: dict[str, torch.Tensor], x, ids, weights) -> torch.Tensor:
    """What a user writes: per expert, gather its tokens, three bf16 matmuls, scatter back."""
    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        rows, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[rows]
        h = F.silu(F.linear(xe, w["gate"][e])) * F.linear(xe, w["up"][e])
        y.index_add_(0, rows, F.linear(h, w["down"][e]) * weights[rows, slot, None].to(x.dtype))
    return y


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="v3")
    p.add_argument("--format", default="bf16,int8,int4")
    p.add_argument("--tokens", default="1,4,16,64,256,1024")
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument("--iters", type=int, default=0, help="0: enough for ~1 s per point")
    p.add_argument("--gemm-min-tokens", type=int, default=EngineConfig.gemm_min_tokens)
    p.add_argument("--gemm-min-tokens-q8", type=int, default=EngineConfig.gemm_min_tokens_q8)
    p.add_argument("--gemm-min-tokens-amx", type=int, default=EngineConfig.gemm_min_tokens_amx)
    p.add_argument("--no-amx", action="store_true", help="no AMX GEMM path (where the CPU has it)")
    p.add_argument(
        "--amx-int4-tiles",
        default="auto",
        help="int4 on the AMX path: auto, bf16 or int8 tiles, or several (comma-separated: "
        "each int4 format is run with each)",
    )
    p.add_argument("--rows-per-item", type=int, default=EngineConfig.rows_per_item)
    p.add_argument(
        "--amx-bf16-order",
        default=EngineConfig.amx_bf16_order,
        choices=kernels_amx_bf16.ORDERS,
        help="the order of tile loads and products on the AMX bf16 tiles",
    )
    p.add_argument("--no-naive", action="store_true")
    p.add_argument(
        "--naive-each",
        action="store_true",
        help="the naive loop timed again right after each format's point, its bf16 weights kept "
        "(the ratio from adjacent times: a VM whose speed drifts within a run)",
    )
    p.add_argument("--prefetch-bytes", type=int, default=EngineConfig.prefetch_bytes)
    p.add_argument(
        "--amx-prefetch-bytes",
        type=int,
        default=EngineConfig.amx_prefetch_bytes,
        help="the AMX path's prefetch distance (capped at a row)",
    )
    p.add_argument("--hugepages", action="store_true", help="weights in transparent huge pages")
    p.add_argument(
        "--routing-alpha",
        type=float,
        default=1.0,
        help="T tokens route as T ** alpha independent ones (V3 serving: 0.69)",
    )
    p.add_argument(
        "--fp32-activations", action="store_true", help="int4 GEMV on fp32, not int8, activations"
    )
    args = p.parse_args()
    H, I, E, k = SHAPES[args.shape]
    threads = args.threads or os.cpu_count()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    probes = read_bandwidth()
    bw = max(probes.values())
    base = {
        "bench": "cpu_moe",
        "shape": args.shape,
        "threads": threads,
        "read_gbps": bw,
        "rows_per_item": args.rows_per_item,
        "gemm_min_tokens": args.gemm_min_tokens,
        "gemm_min_tokens_q8": args.gemm_min_tokens_q8,
        "amx": not args.no_amx and amx.has_amx(),
        "gemm_min_tokens_amx": args.gemm_min_tokens_amx,
        "routing_alpha": args.routing_alpha,
        "int8_activations": not args.fp32_activations,
        "prefetch_bytes": args.prefetch_bytes,
        "amx_prefetch_bytes": args.amx_prefetch_bytes,
        "amx_bf16_order": args.amx_bf16_order,
        "hugepages": args.hugepages,
    }
    print(json.dumps({**base, "probe": "read", **probes}), flush=True)
    gen = torch.Generator().manual_seed(0)
    naive, naive_w = {}, None
    if not args.no_naive:
        naive_w = naive_weights(H, I, E)
        naive = measure_naive(naive_w, tokens, gen, args.iters, bw, base, k)
        if not args.naive_each:
            naive_w = None
            gc.collect()
    int4_tiles = args.amx_int4_tiles.split(",")
    runs = [(Format.parse(spec), t) for spec in args.format.split(",") for t in int4_tiles]
    runs = [(fmt, t) for fmt, t in runs if fmt.name == "int4" or t == int4_tiles[0]]
    for fmt, tiles in runs:
        layer = random_layer(fmt, H, I, E)
        engine = CPUExperts(
            {0: layer},
            EngineConfig(
                threads=threads,
                gemm_min_tokens=args.gemm_min_tokens,
                gemm_min_tokens_q8=args.gemm_min_tokens_q8,
                amx=not args.no_amx,
                gemm_min_tokens_amx=args.gemm_min_tokens_amx,
                amx_int4_tiles=tiles,
                rows_per_item=args.rows_per_item,
                int8_activations=not args.fp32_activations,
                prefetch_bytes=args.prefetch_bytes,
                amx_prefetch_bytes=args.amx_prefetch_bytes,
                amx_bf16_order=args.amx_bf16_order,
                hugepages=args.hugepages,
            ),
        )
        for T in tokens:
            x = torch.randn(T, H, generator=gen)
            routes = [draw_routing(T, E, k, gen, args.routing_alpha) for _ in range(64)]
            unique = float(np.mean([len(r[0].unique()) for r in routes]))
            bytes_read = unique * layer.expert_bytes()
            iters = args.iters or max(5, min(200, int(2000 / max(1, T))))
            engine.stats.amx_s.clear()
            jobs = engine.stats.jobs
            ms = time_routed(partial(engine.forward, 0), x, routes, iters)
            row = {**base, "format": str(fmt), "tokens": T, "unique_experts": round(unique, 1),
                   **rates(ms, bytes_read, bw, H, I, T, k)}  # fmt: skip
            if fmt.name == "int4" and base["amx"]:
                row["amx_int4_tiles"] = tiles
            if engine.stats.amx_s:  # the AMX path's steps, ms a call
                calls = engine.stats.jobs - jobs
                row["amx_ms"] = {
                    n: round(1e3 * t / calls, 2) for n, t in engine.stats.amx_s.items()
                }
            if T in naive:
                row["naive_ms"] = naive[T]
                row["speedup_vs_naive"] = round(naive[T] / ms, 2)
            if naive_w is not None:  # the naive loop again, right after this point
                after = measure_naive(naive_w, [T], gen, args.iters, bw, base, k, quiet=True)[T]
                row["naive_after_ms"] = after
                row["speedup_vs_naive_after"] = round(after / ms, 2)
            print(json.dumps(row), flush=True)
        engine.close()
        del layer, engine
        gc.collect()


def naive_weights(H, I, E) -> dict[str, torch.Tensor]:
    """A full layer of bf16 expert weights for the naive loop."""
    w = {
        "gate": torch.empty(E, I, H, dtype=torch.bfloat16),
        "up": torch.empty(E, I, H, dtype=torch.bfloat16),
        "down": torch.empty(E, H, I, dtype=torch.bfloat16),
    }
    for t in w.values():
        t.copy_(as_tensor(random_bf16(t.shape, 3)))
    return w


def measure_naive(w, tokens, gen, iters, bw, base, k, quiet=False) -> dict[int, float]:
    """The naive torch BF16 loop over the layer `w` (naive_weights) at each of `tokens`, ms; also
    torch's own bf16 matmul of one expert-sized GEMM ([T/32, H] x [H, I]) for the compute
    reference, printed with it (quiet: neither printed nor timed)."""
    (E, I, H), out = w["gate"].shape, {}
    for T in tokens:
        x = torch.randn(T, H, generator=gen, dtype=torch.bfloat16)
        routes = [draw_routing(T, E, k, gen) for _ in range(16)]
        ms = time_routed(
            partial(naive_torch_loop, w), x, routes, iters or max(3, min(50, 500 // T))
        )
        out[T] = round(ms, 3)
        if quiet:
            continue
        bytes_read = np.mean([len(r[0].unique()) for r in routes]) * 3 * H * I * 2
        row = {
            **base,
            "format": "torch-bf16-naive",
            "tokens": T,
            **rates(ms, bytes_read, bw, H, I, T, k),
        }
        m = max(1, T // 32)
        a, b = torch.randn(m, H, dtype=torch.bfloat16), w["gate"][0].T.contiguous()
        gemm_ms = median_ms(partial(torch.matmul, a, b), 20)
        row["torch_gemm_shape"] = [m, H, I]
        row["torch_gemm_tflops"] = round(2 * m * H * I / gemm_ms / 1e9, 3)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    main()
