"""DeepSeek-V3's decode step from two v3-slice runs of different depths, by the marginal cost of a
MoE layer. Prints JSON lines.

    python bench/decode.py --moe-layers 3 --graphs > a.jsonl
    python bench/decode.py --moe-layers 6 --graphs > b.jsonl
    python bench/extrapolate.py a.jsonl b.jsonl

`bench/decode.py` alone charges everything a slice's step spends beyond its GPU time to its MoE
layers, so the slice's fixed part (embedding, LM head, sampling, the first layer that waits for
the token before it) is counted 58/3 times. The difference of two depths holds only what one
more MoE layer costs: V3 = t(M) + (58 - M) * (t(M') - t(M)) / (M' - M) + the 2 dense layers
the slice lacks, each costed as the slice's GPU-only time per layer. The CPU's busy time is
extrapolated the same way (on mean step times, as the engine's busy time is a mean), and
`v3_cpu_busy` is its share of the step. `bench/decode.py --workload v3` measures the whole
depth instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.workloads import full_layers  # noqa: E402


def rows(path: str) -> dict[tuple[int, str], dict]:
    """(batch, mode) -> the row, for a decode.py v3-slice file."""
    with open(path) as f:
        found = [json.loads(line) for line in f if line.strip()]
    return {
        (r["batch"], r["mode"]): r
        for r in found
        if r.get("workload") == "v3-slice"
        and "ms" in r  # not a trace row
        and r.get("mode") != "transformers_device_map"
    }


def extrapolate(a: dict, b: dict, gpu_only: dict, layers: int, moe: int) -> dict:
    """V3's ms per step from rows a and b (same batch and mode, different MoE depths)."""
    if a["moe_layers"] == b["moe_layers"]:
        raise SystemExit("the two runs must have different --moe-layers")
    a, b = sorted((a, b), key=lambda r: r["moe_layers"])
    per_moe = (b["ms"] - a["ms"]) / (b["moe_layers"] - a["moe_layers"])
    dense = gpu_only["ms"] / gpu_only["layers"]  # a dense layer: GPU only, never waits
    dense_missing = (layers - moe) - (a["layers"] - a["moe_layers"])
    ms = a["ms"] + (moe - a["moe_layers"]) * per_moe + dense_missing * dense
    out = {"per_moe_layer_ms": round(per_moe, 3), "v3_ms_per_step": round(ms, 1)}
    if "cpu_ms" in a and "cpu_ms" in b:  # the CPU's busy share by the same method, on means
        more = (moe - a["moe_layers"]) / (b["moe_layers"] - a["moe_layers"])
        mean = a["mean_ms"] + more * (b["mean_ms"] - a["mean_ms"]) + dense_missing * dense
        out["v3_cpu_busy"] = round((a["cpu_ms"] + more * (b["cpu_ms"] - a["cpu_ms"])) / mean, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs=2, help="decode.py JSON lines of two --moe-layers depths")
    args = p.parse_args()
    a, b = rows(args.runs[0]), rows(args.runs[1])
    layers, moe = full_layers("v3-slice")
    for key in sorted(a.keys() & b.keys()):
        batch, mode = key
        out = extrapolate(a[key], b[key], a[(batch, "gpu_only")], layers, moe)
        out["v3_tokens_per_s"] = round(1e3 * batch / out["v3_ms_per_step"], 2)
        out["single_depth_v3_tokens_per_s"] = a[key].get("v3_tokens_per_s")
        print(json.dumps({"bench": "decode_depths", "batch": batch, "mode": mode, **out}))


if __name__ == "__main__":
    main()
