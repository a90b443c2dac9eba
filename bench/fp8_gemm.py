"""DeepSeek-V3's FP8 weights at decode sizes on the GPU: hetero's FP8 kernel against the naive path
(dequantize to bf16, then a cuBLAS matmul: FP8Linear's reference) and against a bf16 weight of
the same shape (twice the bytes), with the device's read bandwidth measured in the same run.
Prints JSON lines.

    python bench/fp8_gemm.py --tokens 1,4,16,64

Each point is the GPU time of 20 calls replayed from one CUDA graph (no launch overhead, as in
the graphed decoder); weights of a point together exceed the 50 MB L2, so they come from HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hetero.gpu.fp8_gemm import fp8_gemm  # noqa: E402
from hetero.model.fp8 import FP8Linear, block_dequantize, block_quantize  # noqa: E402

SHAPES = {  # name: (out N, in K), one V3 layer's non-expert matrices
    "q_a": (1536, 7168),
    "q_b": (24576, 1536),
    "kv_a": (576, 7168),
    "kv_b": (32768, 512),
    "o": (7168, 16384),
    "shared_gate": (2048, 7168),
    "shared_down": (7168, 2048),
    "dense_gate": (18432, 7168),
    "dense_down": (7168, 18432),
}
CALLS = 20


def graph_ms(fn, copies: int) -> float:
    """GPU ms of one call: CALLS calls (cycling over `copies` weight copies) in one graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i % copies)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(CALLS):
            fn(i % copies)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / CALLS)
    return best


def fp8_linear(q: torch.Tensor, s: torch.Tensor) -> FP8Linear:
    lin = FP8Linear(q.shape[1], q.shape[0]).cuda()
    lin.weight.data, lin.weight_scale_inv.data = q, s
    return lin


def read_gbps() -> float:
    """The device's read bandwidth: a sum over 2 GB (reads dominate, one tiny write)."""
    a = torch.ones(2**29, dtype=torch.float32, device="cuda")
    ms = graph_ms(lambda i: a.sum(), 1)
    return a.nbytes / ms / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,4,16,64")
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args()
    peak = read_gbps()
    env = {"device": torch.cuda.get_device_name(), "read_gbps": round(peak, 1)}
    print(json.dumps({"bench": "fp8_gemm", "probe": "read", **env}), flush=True)
    for name in args.shapes.split(","):
        for row in bench_shape(*SHAPES[name], [int(t) for t in args.tokens.split(",")], peak):
            print(json.dumps({"bench": "fp8_gemm", **env, "shape": name, **row}), flush=True)
        torch.cuda.empty_cache()


def bench_shape(N: int, K: int, tokens: list[int], peak: float):
    """Yields a row per token count for one weight shape [N, K]."""
    copies = max(1, -(-200 * 2**20 // (N * K)))  # > 200 MB of fp8 per point
    g = torch.Generator(device="cuda").manual_seed(N + K)
    ws = [torch.randn(N, K, device="cuda", generator=g) / K**0.5 for _ in range(copies)]
    qs = [block_quantize(w) for w in ws]
    lins = [fp8_linear(q, s) for q, s in qs]
    bf = [w.bfloat16() for w in ws]
    del ws
    for M in tokens:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        want = x.float() @ block_dequantize(*qs[0], (128, 128)).T
        got = fp8_gemm(x, *qs[0])
        err = ((got.float() - want).norm() / want.norm()).item()
        paths = {
            "kernel": lambda i: fp8_gemm(x, *qs[i]),
            "dequant_matmul": lambda i: F.linear(x, lins[i].dense_weight(torch.bfloat16)),
            "bf16_matmul": lambda i: F.linear(x, bf[i]),
        }
        ms = {k: graph_ms(f, copies) for k, f in paths.items()}
        row = {"N": N, "K": K, "tokens": M}
        for k, t in ms.items():
            nbytes = N * K * (2 if k == "bf16_matmul" else 1)
            row[f"{k}_us"] = round(1000 * t, 2)
            row[f"{k}_frac_read_bw"] = round(nbytes / t / 1e6 / peak, 3)
        row["kernel_vs_naive"] = round(ms["dequant_matmul"] / ms["kernel"], 2)
        row["kernel_vs_bf16"] = round(ms["bf16_matmul"] / ms["kernel"], 2)
        row["kernel_rel_err"] = float(f"{err:.2e}")
        yield row


if __name__ == "__main__":
    main()
