"""The CPU kernels' vector pieces against what they replaced, on any x86-64 CPU with AVX-512
(no AMX needed), interleaved in one process: JSON lines with the two times and their ratio.

- `silu`: the AMX path's SiLU of a 16 x 16 tile of gate/up sums (simd_amx.silu_tile) against
  the scalar loop with one libm expf a value that it replaced; ns a value.
- `unpack_bf16`: int4 rows to bf16 A tiles by a vpermw table (AVX-512 BW) against converting
  each nibble to float and scaling (the same intrinsic with the table path off); ns a weight,
  for groups of 32, 64 and 128.
- `decode`: the decode kernel (kernels_q8.moe_gemv_q8) on 8 of 16 V3-sized experts at 1 and
  4 tokens, with the weights borrowed (simd_sync.borrowed) against a copy of the kernel that
  slices them as before (numba then counts every row's views on one shared cache line); ms,
  and the weights' GB/s against the read bandwidth measured in the same run.

    python bench/cpu_vector_micro.py [--parts silu,unpack_bf16,decode] > out.jsonl
    python bench/cpu_vector_micro.py --check   # its rewrite of kernels_q8 still applies
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cpu_moe import draw_routing, random_layer, read_bandwidth  # noqa: E402
from kernel_variant import load, source  # noqa: E402
from numba import njit  # noqa: E402

from hetero.cpu_experts import kernels_q8, ops, simd_amx  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.cpu_experts.kernels_amx import silu_rows  # noqa: E402

TM = 16


def best_of(fn, reps: int = 5) -> float:
    """The fastest of `reps` timed calls, seconds."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@njit(nogil=True, fastmath=True)
def _silu_vector(acc, h, n):
    for i in range(n):
        silu_rows(acc, h, i % (h.shape[0] - 2), 2, i % (h.shape[2] // 8))


@njit(nogil=True, fastmath=True)
def _silu_scalar(acc, h, n):  # the loop silu_rows had before (fifteenth session)
    for i in range(n):
        u0, slab = i % (h.shape[0] - 2), i % (h.shape[2] // 8)
        for t in range(2):
            for j in range(TM // 2):
                for m in range(TM):
                    g = acc[t * TM * TM + 2 * j * TM + m]
                    up = acc[t * TM * TM + (2 * j + 1) * TM + m]
                    h[u0 + t, m, slab * TM // 2 + j] = g / (np.float32(1.0) + np.exp(-g)) * up


def silu() -> None:
    rng = np.random.default_rng(0)
    acc = (rng.standard_normal(2 * TM * TM) * 4).astype(np.float32)
    h = np.zeros((64, TM, 2048), np.float32)
    n = 200_000
    old, new = (best_of(lambda f=f: f(acc, h, n)) for f in (_silu_scalar, _silu_vector))
    values = n * 2 * TM * TM // 2
    print(json.dumps({"part": "silu", "old_ns_a_value": round(old / values * 1e9, 3),
                      "new_ns_a_value": round(new / values * 1e9, 3),
                      "speedup": round(old / new, 2)}), flush=True)  # fmt: skip


def _unpacker():
    @njit(nogil=True, fastmath=True)
    def run(w, s, ab, K, G, reps):
        for _ in range(reps):
            for g in range(K // G):
                simd_amx.unpack_bf16(w, g * G // 2, K // 2, s, g, K // G, ab,
                                     g * G // 32 * TM * 32, G)  # fmt: skip

    return run


def unpack_bf16() -> None:
    if not simd_amx._has_avx512bw():
        print(json.dumps({"part": "unpack_bf16", "skipped": "no AVX-512 BW"}), flush=True)
        return
    rng = np.random.default_rng(0)
    K, reps = 7168, 2000
    w = rng.integers(0, 256, TM * K // 2, dtype=np.uint8)
    s = (rng.standard_normal(TM * K // 32).astype(np.float32) * 0.01).view(np.uint32) >> 16
    s = s.astype(np.uint16)
    ab = np.zeros(TM * K, np.uint16)
    table = _unpacker()
    table(w, s, ab, K, 32, 1)  # compiled with the table path
    has = simd_amx._has_avx512bw
    simd_amx._has_avx512bw = lambda: False
    floats = _unpacker()
    floats(w, s, ab, K, 32, 1)  # compiled with the float path
    simd_amx._has_avx512bw = has
    for G in (32, 64, 128):
        old, new = (best_of(lambda f=f: f(w, s, ab, K, G, reps)) for f in (floats, table))
        per = reps * TM * K
        print(json.dumps({"part": "unpack_bf16", "group": G,
                          "old_ns_a_weight": round(old / per * 1e9, 4),
                          "new_ns_a_weight": round(new / per * 1e9, 4),
                          "speedup": round(old / new, 2)}), flush=True)  # fmt: skip


def _owned_kernel():
    """kernels_q8 with the weights sliced as they were before simd_sync.borrowed."""
    rewrites = (
        ("w13b, s13b, w2b, s2b = borrowed(w13), borrowed(s13), borrowed(w2), borrowed(s2)", "pass"),
        ("w13b[experts[a]], s13b[experts[a]]", "w13[experts[a]], s13[experts[a]]"),
        ("w2b[experts[a]], s2b[experts[a]]", "w2[experts[a]], s2[experts[a]]"),
    )  # fmt: skip
    return load("q8_owned", source(kernels_q8, rewrites))


def decode() -> None:
    limit = max(read_bandwidth(2.0).values())
    owned = _owned_kernel()
    H, I, E, k = 7168, 2048, 16, 8
    gen = torch.Generator().manual_seed(0)
    for spec in ("int4", "int8"):
        layer = random_layer(Format.parse(spec), H, I, E)
        offset = ops._q8_offset(layer, True)
        for T in (1, 4):
            x = torch.randn(T, H, generator=gen).numpy()
            ids, w = draw_routing(T, E, k, gen)
            g = ops.group_by_expert(ids.numpy(), E)
            ys = {}

            def call(module, name):
                ys[name] = np.zeros((g.pair_token.shape[0], H), np.float32)
                module.moe_gemv_q8(x, w.float().numpy(), g.experts, g.ptr, g.pair_token,
                                   g.pair_slot, layer.w13, layer.s13, layer.w2, layer.s2,
                                   ys[name], 16, offset, 4096, numba.get_num_threads())  # fmt: skip

            times = {"owned": [], "borrowed": []}
            for _ in range(21):  # alternated
                for name, module in (("owned", owned), ("borrowed", kernels_q8)):
                    times[name].append(best_of(lambda m=module, n=name: call(m, n), 1))
            old, new = (float(np.median(times[n][1:])) for n in ("owned", "borrowed"))
            arrays = (layer.w13, layer.s13, layer.w2, layer.s2)
            read = g.experts.shape[0] * sum(a.nbytes for a in arrays) / E  # read once
            print(json.dumps({"part": "decode", "format": spec, "tokens": T,
                              "experts": int(g.experts.shape[0]),
                              "old_ms": round(old * 1e3, 3), "new_ms": round(new * 1e3, 3),
                              "speedup": round(old / new, 3),
                              "new_frac_read_bw": round(read / new / 1e9 / limit, 3),
                              "read_gbps": limit, "threads": numba.get_num_threads(),
                              "equal": bool(np.array_equal(ys["owned"], ys["borrowed"]))}),
                  flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="silu,unpack_bf16,decode")
    p.add_argument("--check", action="store_true", help="only build the old decode kernel")
    args = p.parse_args()
    if args.check:
        _owned_kernel()
        print(json.dumps({"bench": "cpu_vector_micro", "check": "ok"}))
        return
    parts = {"silu": silu, "unpack_bf16": unpack_bf16, "decode": decode}
    for name in args.parts.split(","):
        parts[name]()


if __name__ == "__main__":
    main()
