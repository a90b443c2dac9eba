"""Per-core compute rate of each format's row kernel, on data that fits in L2 (no memory limit):
if a format's rate times the core count is below the host's read bandwidth, that format is
compute-bound at decode. JSON lines."""

from __future__ import annotations

import json
import os
import sys

import numba
import numpy as np
from numba import njit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.cpu_moe import median_ms, random_layer  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.cpu_experts.kernels import row_dot  # noqa: E402


@njit(nogil=True, fastmath=True)  # not cached: row_dot lives in another file
def gemv(w, s, x, out, G):
    for r in range(w.shape[0]):
        out[r] = row_dot(w[r], s[r], x, G)


def main() -> None:
    H, rows = 7168, 128  # 128 rows: <= 1.8 MB packed, stays in L2
    numba.set_num_threads(1)
    x = np.random.default_rng(0).standard_normal(H).astype(np.float32)
    for spec in ("bf16", "int8", "int8-g128", "int4", "int4-g64", "int4-g128"):
        fmt = Format.parse(spec)
        layer = random_layer(fmt, H, rows, 1)
        w, s = layer.w13[0, :, 0], layer.s13[0, :, 0]  # [rows, .]
        w, s = np.ascontiguousarray(w), np.ascontiguousarray(s)
        out = np.empty(rows, np.float32)
        gemv(w, s, x, out, fmt.group(H))
        ms = min(median_ms(lambda: gemv(w, s, x, out, fmt.group(H)), 50) for _ in range(3))
        rate = rows * H / ms / 1e6
        print(
            json.dumps(
                {
                    "bench": "cpu_kernel_micro",
                    "format": spec,
                    "threads": 1,
                    "gweights_per_s": round(rate, 2),
                    "gbytes_per_s": round(rate * fmt.bytes_per_row(H) / H, 2),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
