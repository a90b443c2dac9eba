"""Which CPU GEMM should the prefill path use? One expert's matmuls through torch (bf16 oneDNN,
`torch._int_mm` int8) and hetero's dequantization kernel, on the same shapes. JSON lines."""

from __future__ import annotations

import json
import os
import sys

import numba
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.cpu_moe import median_ms, random_layer  # noqa: E402
from hetero.cpu_experts import kernels  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402


def main() -> None:
    H, I = 7168, 2048
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    for M in (8, 32, 128, 512):
        a = torch.randn(M, H, dtype=torch.bfloat16)
        b = torch.randn(2 * I, H, dtype=torch.bfloat16)
        ms = median_ms(lambda: a @ b.T, 20)
        row = {"bench": "cpu_gemm", "M": M, "N": 2 * I, "K": H, "threads": threads}
        print(
            json.dumps(
                {
                    **row,
                    "op": "bf16 matmul",
                    "ms": round(ms, 3),
                    "tflops": round(2 * M * H * 2 * I / ms / 1e9, 2),
                }
            ),
            flush=True,
        )
        ai, bi = (
            torch.randint(-127, 127, (max(M, 32), H), dtype=torch.int8),
            torch.randint(-127, 127, (H, 2 * I), dtype=torch.int8),
        )
        try:
            ms = median_ms(lambda: torch._int_mm(ai, bi), 20)
            print(
                json.dumps(
                    {
                        **row,
                        "M": max(M, 32),
                        "op": "torch._int_mm",
                        "ms": round(ms, 3),
                        "tops": round(2 * max(M, 32) * H * 2 * I / ms / 1e9, 2),
                    }
                ),
                flush=True,
            )
        except RuntimeError as e:
            print(json.dumps({**row, "op": "torch._int_mm", "error": str(e)[:200]}), flush=True)
    for spec in ("int8", "int4", "int4-g64"):
        layer = random_layer(Format.parse(spec), H, I, 4)
        out = np.empty((2 * I, H), np.uint16)
        w, s = layer.w13[1].reshape(2 * I, -1), layer.s13[1].reshape(2 * I, -1)
        kernels.dequantize_rows(w, s, out)
        ms = median_ms(lambda: kernels.dequantize_rows(w, s, out), 20)
        print(
            json.dumps(
                {
                    "bench": "cpu_dequant",
                    "format": spec,
                    "rows": 2 * I,
                    "K": H,
                    "threads": numba.get_num_threads(),
                    "ms": round(ms, 3),
                    "gweights_per_s": round(2 * I * H / ms / 1e6, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
