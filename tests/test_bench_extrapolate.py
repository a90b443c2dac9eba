"""bench/extrapolate.py recovers a MoE layer's marginal cost from two slice depths."""

from __future__ import annotations

import json

from bench.decode import full_layers
from bench.extrapolate import extrapolate, rows


def slice_row(moe: int, fixed: float, per_moe: float, mode: str = "defer2") -> dict:
    return {
        "bench": "decode", "workload": "v3-slice", "batch": 1, "mode": mode,
        "layers": moe + 1, "moe_layers": moe, "ms": fixed + moe * per_moe,
    }  # fmt: skip


def test_two_depths_give_the_marginal_layer_and_charge_the_fixed_part_once(tmp_path):
    layers, moe = full_layers("v3-slice")
    fixed, per_moe, dense = 5.0, 3.0, 0.5  # ms: the slice's fixed part, a MoE layer, a dense one
    gpu_only = {"ms": 4 * dense, "layers": 4}
    got = extrapolate(slice_row(6, fixed, per_moe), slice_row(3, fixed, per_moe), gpu_only,
                      layers, moe)  # fmt: skip
    assert got["per_moe_layer_ms"] == per_moe
    want = fixed + moe * per_moe + (layers - moe - 1) * dense  # V3 has 2 more dense layers
    assert abs(got["v3_ms_per_step"] - want) < 0.05
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(slice_row(3, fixed, per_moe)) + "\n" + json.dumps({"mode": "x"}))
    assert list(rows(str(path))) == [(1, "defer2")]  # other workloads' and baseline rows dropped
