"""What bounds the AMX GEMM kernel: variants of kernels_amx with parts removed (their results
are wrong; only their times matter), one V3 layer at T=1024, interleaved in one process. Needs a
CPU with AMX.

    python bench/amx_ablate.py > amx_ablate.jsonl

variants: full; no_rescale (C tiles never read back); no_unpack (int4 rows not unpacked: stale
A tiles); no_scales (weight scales not loaded); no_tile_ops (every tile instruction a no-op:
the vector work alone); only_tile_ops (no rescale, unpack or scales: the tile work alone).
"""

import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TMP = Path(tempfile.mkdtemp(prefix="amx_ablate_"))
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(TMP)]
import numpy as np  # noqa: E402
import torch  # noqa: E402
from cpu_moe import SHAPES, draw_routing, random_layer  # noqa: E402

from hetero.cpu_experts import amx, kernels_amx, ops  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402

src = (
    (ROOT / "hetero/cpu_experts/kernels_amx.py")
    .read_text()
    .replace('"cache": True', '"cache": False')
)
NOOP = "\nfrom numba import njit as _nj\n@_nj\ndef _noop(*a):\n    return\n"


def variant(name, text):
    (TMP / f"amxv_{name}.py").write_text(text)
    return importlib.import_module(f"amxv_{name}")


variants = {"full": src}
variants["no_rescale"] = src.replace(
    "    base = q % 2 * nt * TM * TM\n", "    return\n    base = q % 2 * nt * TM * TM\n"
)
variants["no_unpack"] = src.replace(
    "from hetero.cpu_experts.simd_amx import TM, prefetch_rows, rescale, unpack_rows",
    "from hetero.cpu_experts.simd_amx import TM, prefetch_rows, rescale"
    + NOOP
    + "unpack_rows = _noop\n",
)
variants["no_scales"] = src.replace(
    "sw[q % 2, r] = _scale(s, (row0 + r) * ng + k0 // G)", "sw[q % 2, r] = 1.0"
)
t = src
for op in ("tile_load", "tile_store", "tile_zero", "tile_dp_busd", "tile_dp_bssd"):
    t = t.replace(f"amx.{op}(", "_noop(")
variants["no_tile_ops"] = t.replace(
    "from hetero.cpu_experts import amx\n", "from hetero.cpu_experts import amx\n" + NOOP
)
variants["only_tile_ops"] = (
    variants["no_rescale"]
    .replace(
        "from hetero.cpu_experts.simd_amx import TM, prefetch_rows, rescale, unpack_rows",
        "from hetero.cpu_experts.simd_amx import TM, prefetch_rows, rescale"
        + NOOP
        + "unpack_rows = _noop\n",
    )
    .replace("sw[q % 2, r] = _scale(s, (row0 + r) * ng + k0 // G)", "sw[q % 2, r] = 1.0")
)
for k, v in variants.items():
    assert k == "full" or v != src, k
mods = {k: variant(k, v) for k, v in variants.items()}
amx.enable()
H, I, E, k = SHAPES["v3"]
gen = torch.Generator().manual_seed(0)
T = 1024
for spec in ["int4", "int4-g128"]:
    layer = random_layer(Format.parse(spec), H, I, E)
    x = torch.randn(T, H, generator=gen).numpy()
    scratch = {}
    res = {n: [] for n in mods}
    steps = {n: {} for n in mods}
    for it in range(4):
        for name, mod in mods.items():
            ids, w = draw_routing(T, E, k, gen)
            g = ops.group_by_expert(ids.numpy(), E)
            out = np.zeros((T, H), np.float32)
            ops.kernels_amx = mod
            times = {}
            t0 = time.perf_counter()
            ops.moe_gemm_amx(layer, x, w.float().numpy(), g, out, scratch, 4096, times)
            if it:
                res[name].append((time.perf_counter() - t0) * 1e3)
                for s_, v in times.items():
                    steps[name][s_] = steps[name].get(s_, 0) + v * 1e3 / 3
    ops.kernels_amx = kernels_amx
    for name in mods:
        print(
            json.dumps(
                {
                    "format": spec,
                    "tokens": T,
                    "variant": name,
                    "ms": round(float(np.median(res[name])), 1),
                    "gate_up_ms": round(steps[name]["gate_up"], 1),
                    "down_ms": round(steps[name]["down"], 1),
                }
            ),
            flush=True,
        )
