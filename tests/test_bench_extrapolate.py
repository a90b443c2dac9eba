"""bench/extrapolate.py recovers a MoE layer's marginal cost from two slice depths."""

from __future__ import annotations

import json

from bench.extrapolate import extrapolate, rows
from bench.workloads import full_layers


def slice_row(moe: int, fixed: float, per_moe: float, mode: str = "defer2", cpu=None) -> dict:
    """cpu: (the CPU's busy ms in the fixed part, a MoE layer's)."""
    ms = fixed + moe * per_moe
    row = {
        "bench": "decode", "workload": "v3-slice", "batch": 1, "mode": mode,
        "layers": moe + 1, "moe_layers": moe, "ms": ms, "mean_ms": ms,
    }  # fmt: skip
    if cpu:
        row["cpu_ms"] = cpu[0] + moe * cpu[1]
    return row


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


def test_cpu_busy_charges_the_fixed_part_once():
    """A slice whose CPU idles through a fixed part (3 ms of its 5) and is busy 2.7 of each MoE
    layer's 3 ms: at V3's depth the busy share nears 0.9, far above the slice's own."""
    layers, moe = full_layers("v3-slice")
    gpu_only = {"ms": 2.0, "layers": 4}
    a, b = (slice_row(m, 5.0, 3.0, cpu=(2.0, 2.7)) for m in (3, 6))
    got = extrapolate(a, b, gpu_only, layers, moe)
    step = 5.0 + moe * 3.0 + (layers - moe - 1) * 0.5
    assert abs(got["v3_cpu_busy"] - (2.0 + moe * 2.7) / step) < 1e-3
    assert got["v3_cpu_busy"] > b["cpu_ms"] / b["ms"] + 0.05
    assert "v3_cpu_busy" not in extrapolate(slice_row(3, 5, 3), slice_row(6, 5, 3), gpu_only,
                                            layers, moe)  # fmt: skip


def test_gpu_floor_counts_what_a_decode_step_reads():
    """bench/gpu_floor.py: weights once (not the embedding table, the routed experts, or
    kv_b_proj once W_UK / W_UV are absorbed), the caches per sequence; frac = floor / time."""
    from bench.gpu_floor import gpu_floor, step_kv_bytes, step_weight_bytes
    from hetero.config import ModelConfig
    from hetero.model import Transformer
    from hetero.testing import tiny_v3_config

    config = ModelConfig.from_hf(tiny_v3_config())
    model = Transformer(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    embed = model.model.embed_tokens.weight.numel() * 4
    experts = sum(
        p.numel() * 4 for b in model.model.layers if b.is_moe for p in b.mlp.experts.parameters()
    )
    assert step_weight_bytes(model) == total - embed - experts
    model.absorb_attention()
    kv_b = sum(b.self_attn.kv_b_proj.weight.numel() * 4 for b in model.model.layers)
    absorbed = sum(
        (b.self_attn.w_uk.numel() + b.self_attn.w_uv.numel()) * 4 for b in model.model.layers
    )
    assert step_weight_bytes(model) == total - embed - experts - kv_b + absorbed
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    assert step_kv_bytes(config, 3, 100) == 3 * 100 * per_token
    row = gpu_floor(model, config, 3, 100, ms=2.0, hbm_gbps=1.0)
    floor_ms = (step_weight_bytes(model) + 3 * 100 * per_token) / 1e6
    assert row["floor_ms"] == round(floor_ms, 2) and row["frac_hbm"] == round(floor_ms / 2.0, 3)
