"""bench/gpu_kernels.py's device-free half on a CPU: the V3 shapes, the FLOP and byte counts (on
small cases counted by hand), the JSON record, --only parsing, the random inputs and the torch
attention reference; and the script's refusal without CUDA. No timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_kernels_shapes as S

ROOT = Path(__file__).resolve().parent.parent
LIMIT = {"hbm_gbps": 1000.0, "bf16_tflops": 100.0}
ENV = {"device": "test", "date": "2026-01-01T00:00:00+00:00"}


def test_v3_shapes_come_from_the_config():
    shapes = S.fp8_shapes(S.v3_config())
    assert shapes["q_a"] == (1536, 7168)
    assert shapes["q_b"] == (24576, 1536)  # 128 heads x (128 nope + 64 rope)
    assert shapes["kv_a"] == (576, 7168)
    assert shapes["o"] == (7168, 16384)
    assert shapes["dense_gate"] == (18432, 7168) and shapes["dense_down"] == (7168, 18432)
    assert shapes["shared_gate"] == (2048, 7168)
    full, quick = S.plan(False), S.plan(True)
    assert full.fp8_tokens == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert set(full.fp8_shapes) == set(shapes) and set(quick.fp8_shapes) <= set(shapes)
    assert set(quick.moe_formats) <= set(full.moe_formats) == set(S.MOE_FORMATS)


def test_which_fp8_kernels_run_at_which_sizes():
    assert S.fp8_kernels(1) == ["fp8_gemm"]
    assert S.fp8_kernels(16) == ["fp8_gemm", "fp8_gemm_w8a8"]
    assert S.fp8_kernels(32) == S.fp8_kernels(64) == ["fp8_gemm", "fp8_small", "fp8_gemm_w8a8"]
    assert S.fp8_kernels(128) == ["fp8_gemm_w8a8"]


def test_gemm_counts():
    assert S.gemm_flops(2, 3, 4) == 48
    assert S.fp8_weight_bytes(256, 384) == 256 * 384 + 4 * 2 * 3  # 2 x 3 blocks of scales
    assert S.fp8_weight_bytes(576, 7168) == 576 * 7168 + 4 * 5 * 56  # a partial row block
    assert S.gemm_bytes(2, 3, 4, weight_bytes=100) == 100 + 2 * 2 * 4 + 2 * 2 * 3


def test_mla_counts():
    assert S.mla_decode_bytes(B=2, ctx=3, C=4, R=2) == 2 * 3 * 6 * 2
    assert S.mla_decode_flops(B=1, ctx=2, h=3, C=4, R=2) == 2 * 3 * 2 * 6 + 2 * 3 * 2 * 4
    assert S.extend_keys(T=3, prefix=2) == 3 + 4 + 5  # token i sees prefix + i + 1 keys
    assert S.extend_keys(T=4, prefix=0) == 1 + 2 + 3 + 4
    assert S.mla_extend_flops(T=3, prefix=2, h=1, C=4, R=2) == 2 * 12 * 6 + 2 * 12 * 4
    assert S.mla_extend_bytes(T=1, prefix=2, h=1, C=4, R=2) == (3 * 6 + 6 + 4) * 2
    assert S.attention_ref_bytes(scores=10, tokens=2, C=4, R=2) == 2 * 6 * 2 + 10 * 12


def test_expert_and_router_counts():
    H, I = 256, 128
    assert S.expert_bytes("fp8", H, I) == 3 * H * I + 4 * (2 * 1 * 2 + 2 * 1)
    # int4-g32, H=64, I=32: gate/up rows hold H/2 bytes + H/32 bf16 scales; down rows I/2 + I/32
    assert S.expert_bytes("int4-g32", 64, 32) == 2 * 32 * (32 + 2 * 2) + 64 * (16 + 2 * 1)
    assert S.moe_flops(pairs=2, H=3, I=4) == 2 * 2 * 3 * 3 * 4
    assert S.router_bytes(T=1, E=2, H=3, k=1) == 2 * 2 * 3 + 2 * 3 + 12


def test_roofline_picks_the_binding_limit():
    assert S.roofline_ms(1e9, 1e9, LIMIT) == (1.0, "hbm")  # 1 GB at 1000 GB/s: 1 ms
    assert S.roofline_ms(1e12, 1e6, LIMIT) == (10.0, "bf16")  # 1 TFLOP at 100 TFLOP/s
    fp8 = {**LIMIT, "fp8_tflops": 200.0}
    assert S.roofline_ms(1e12, 1e6, fp8, fp8=True) == (5.0, "fp8")
    assert S.roofline_ms(1e12, 1e6, LIMIT, fp8=True) == (10.0, "bf16")  # fp8 not measured


def test_record_carries_speedup_fractions_and_limits():
    row = S.record("fp8", {"M": 1}, "k", 2.0, "base", 6.0, 1e9, 1e9, LIMIT, ENV, rel_err=0.01)
    assert row["bench"] == "gpu_kernels" and row["section"] == "fp8" and row["M"] == 1
    assert row["speedup"] == 3.0 and row["baseline_ms"] == 6.0
    assert row["gbps"] == 500.0 and row["tflops"] == 0.5
    assert row["frac_hbm"] == 0.5 and row["frac_compute"] == 0.005
    assert row["bound"] == "hbm" and row["frac_of_limit"] == 0.5
    assert row["limit"] == LIMIT and row["device"] == "test" and row["rel_err"] == 0.01
    skipped = S.record("mla", {}, "k", 2.0, "base", None, 1.0, 1.0, LIMIT, ENV)
    assert skipped["baseline_ms"] is None and skipped["speedup"] is None
    json.dumps(row)  # a JSON line


def test_emit_prints_and_appends(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    S.emit({"a": 1}, str(out))
    S.emit({"a": 2}, str(out))
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    assert capsys.readouterr().out.splitlines() == ['{"a": 1}', '{"a": 2}']


def test_only_parses_sections_and_rejects_unknown_ones(capsys):
    assert S.parse_args([], "doc").only == S.SECTIONS
    args = S.parse_args(["--only", "router,fp8", "--quick", "--out", "x.jsonl"], "doc")
    assert args.only == ("router", "fp8") and args.quick and args.out == "x.jsonl"
    with pytest.raises(SystemExit) as e:
        S.parse_args(["--only", "fp8,attention"], "doc")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section 'attention'" in err and "fp8, mla, moe, router" in err


def test_without_cuda_the_script_says_so(monkeypatch):
    from bench import gpu_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_kernels.main(["--quick"])
    assert isinstance(e.value.code, str) and "CUDA is not available" in e.value.code


def test_the_script_runs_from_a_shell_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = [sys.executable, str(ROOT / "bench" / "gpu_kernels.py")]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--only" in helped.stdout
    refused = subprocess.run([*run, "--only", "router"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "CUDA is not available" in refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""


def test_inputs_have_the_kernels_layouts():
    g = torch.Generator().manual_seed(0)
    q, s = S.fp8_weight(g, 200, 300)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300) and s.shape == (2, 3)
    assert torch.isfinite(q.float()).all() and (s > 0).all()
    w13, s13, w2, s2 = S.int4_arrays(g, n=2, H=64, I=32, G=32)
    assert w13.shape == (2, 32, 2, 32) and s13.shape == (2, 32, 2, 2)
    assert w2.shape == (2, 64, 16) and s2.shape == (2, 64, 1)
    assert w13.dtype == w2.dtype == torch.uint8 and s13.dtype == s2.dtype == torch.bfloat16
    latent, rope, table = S.paged(g, [5, 17], C=8, R=4, page=4)
    assert table.shape == (2, 5) and table.tolist()[0][2:] == [0, 0, 0]  # 2 pages, then 5
    used = table[table > 0]  # each page once, page 0 (padding) never
    assert sorted(used.tolist()) == list(range(1, 8)) == list(range(1, latent.shape[0]))
    assert rope.shape == (8, 4, 4) and latent.dtype == torch.bfloat16


def test_int4_inputs_pass_the_fused_kernel():
    """The random packed arrays meet fused_moe_int4's checks and give finite sums (Triton's
    interpreter on a CPU; conftest sets TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    from hetero.gpu.fused_moe import fused_moe_int4

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(2)
    H, I, n = 128, 64, 2
    arrays = S.int4_arrays(g, n, H, I, G=32)
    x = torch.randn(3, H, device=dev, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], device=dev)
    local = torch.tensor([0, 1, -1, -1], dtype=torch.int32, device=dev)  # 4 experts, 0 and 1 here
    y = fused_moe_int4(x, ids, torch.ones(3, 2, device=dev), local, *arrays, 32)
    assert y.shape == (3, H) and torch.isfinite(y).all()
    assert (y[1] == 0).all() and (y[0] != 0).any()  # token 1 chose no local expert


def test_latent_reference_is_causal_attention_over_the_pages():
    g = torch.Generator().manual_seed(1)
    C, R, h, ctx, T, scale = 8, 4, 3, 10, 4, 0.3
    latent, rope, table = S.paged(g, [ctx, ctx], C, R, page=4)
    latent, rope = latent.float(), rope.float()
    q_lat, q_pe = torch.randn(2, T, h, C, generator=g), torch.randn(2, T, h, R, generator=g)
    got = S.latent_ref(q_lat, q_pe, latent, rope, table, ctx, scale)
    for b in range(2):
        lat = latent[table[b].long()].flatten(0, 1)[:ctx]  # [ctx, C]
        rp = rope[table[b].long()].flatten(0, 1)[:ctx]
        for t in range(T):
            n = ctx - T + t + 1  # keys up to the token itself
            s = (q_lat[b, t] @ lat[:n].T + q_pe[b, t] @ rp[:n].T) * scale  # [h, n]
            torch.testing.assert_close(got[b, t], s.softmax(-1) @ lat[:n])
    assert S.rel_err(got, got) == 0.0
