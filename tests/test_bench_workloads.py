"""bench/workloads.py's FP8 GEMV settings: `--fp8-tiles` specs parsed into Tiles, refused with
the fields named, and set on every FP8Linear of a model, the fused ones (kept out of the module
tree) included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workloads import fp8_tiles, random_model, set_fp8_tiles  # noqa: E402
from hetero.config import ModelConfig  # noqa: E402
from hetero.gpu.fp8_gemm import TILES, Tiles  # noqa: E402
from hetero.model.fp8 import FP8Linear  # noqa: E402
from hetero.testing import tiny_v3_config  # noqa: E402


def test_specs_parse_into_tiles():
    assert fp8_tiles("") == TILES
    assert fp8_tiles("mma=1+num_warps=8") == Tiles(mma=True, num_warps=8)
    assert fp8_tiles("mma=0+block_n=32") == Tiles(mma=False, block_n=32)
    for bad in ("warps=8", "mma", "mma=yes"):
        with pytest.raises(ValueError, match="NAME=INT"):
            fp8_tiles(bad)


def test_tiles_reach_every_fp8_linear_fused_ones_too():
    config = ModelConfig.from_hf(tiny_v3_config(q_lora_rank=128, moe_intermediate_size=128,
                                                intermediate_size=256))  # fmt: skip
    model = random_model(config, "cpu", torch.float32, fp8=True, attention="absorbed")
    model.fuse_projections()
    fused = [m.__dict__[n] for m in model.modules() for n in ("qkv_a", "gate_up")
             if isinstance(m.__dict__.get(n), FP8Linear)]  # fmt: skip
    assert fused, "the tiny model has FP8 matrices that fuse"
    tiles = Tiles(mma=True, block_n=32)
    set_fp8_tiles(model, tiles)
    linears = [m for m in model.modules() if isinstance(m, FP8Linear)] + fused
    assert linears and all(lin.tiles is tiles for lin in linears)


def test_kernel_gaps_counts_idle_time_and_overlap_once():
    from bench.timeline import kernel_gaps

    # a runs 0-10 us; b overlaps it 5-12; idle 12-20; c 20-30; idle 30-31; c again 31-35
    kernels = [("c(x)", 20.0, 30.0), ("a<int>", 0.0, 10.0), ("b", 5.0, 12.0), ("c(y)", 31.0, 35.0)]
    g = kernel_gaps(kernels)
    assert g["span_ms"] == 0.035 and g["busy_ms"] == 0.026 and g["idle_ms"] == 0.009
    assert g["idle_before_ms"] == {"c": 0.009} and g["kernels"] == 4
    assert g["kernel_ms"] == {"c": 0.014, "a": 0.01, "b": 0.007}
    assert g["kernel_calls"] == {"c": 2, "a": 1, "b": 1}


def test_routing_skew_makes_the_low_ids_hot():
    """bench/decode.py --routing-skew: each gate's bias falls with the expert id, so the first
    experts (the ones --gpu-experts keeps) take more than their share of the slots; routing
    without a correction bias is refused."""
    from bench.decode import skew_routing
    from hetero.testing import tiny_v2_config

    config = ModelConfig.from_hf(tiny_v3_config(n_routed_experts=32, n_group=4, topk_group=2))
    model = random_model(config, "cpu", torch.float32, fp8=False, attention="absorbed")
    skew_routing(model, config, 0.2)
    gate = model.model.layers[config.moe_layers[0]].mlp.gate
    x = torch.randn(400, config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = gate.torch_route(x)[1]
    share = (ids < 8).float().mean().item()  # the first quarter of the experts
    assert share > 0.4, share
    with pytest.raises(SystemExit, match="noaux_tc"):
        skew_routing(model, ModelConfig.from_hf(tiny_v2_config()), 0.2)


@pytest.mark.parametrize("attention", ["triton", "flashinfer"])
def test_kernel_attention_keeps_kv_b_proj_in_fp8(attention):
    """The kernels' backends keep no dense W_UK / W_UV copies (as the loader, `absorbs`): they
    read kv_b_proj's FP8 blocks."""
    config = ModelConfig.from_hf(tiny_v3_config(q_lora_rank=128, moe_intermediate_size=128,
                                                intermediate_size=256))  # fmt: skip
    model = random_model(config, "cpu", torch.float32, fp8=True, attention=attention)
    mla = model.model.layers[0].self_attn
    assert mla.backend == attention and isinstance(mla.kv_b_proj, FP8Linear)
    assert mla.w_uk is None and mla.w_uv is None


def test_set_fp8_small_and_prefill_reach_every_fp8_layer_the_fused_too():
    from bench.workloads import fp8_linears, set_fp8_prefill, set_fp8_small
    from hetero.model.fp8 import PREFILL_GEMMS

    config = ModelConfig.from_hf(tiny_v3_config(q_lora_rank=128, moe_intermediate_size=128,
                                                intermediate_size=256))  # fmt: skip
    model = random_model(config, "cpu", torch.float32, fp8=True)
    layers = list(fp8_linears(model))
    assert any(m.__dict__.get("qkv_a") is lin for m in model.modules() for lin in layers)
    assert all(lin.small_max_tokens == 0 for lin in layers)
    set_fp8_small(model, 64)
    assert all(lin.small_max_tokens == 64 for lin in layers)
    assert all(lin.prefill_gemms == PREFILL_GEMMS for lin in layers)
    layers[0].prefill_gemm = "cublas"  # (a layer that chose: chooses again)
    set_fp8_prefill(model, ("flashinfer", "triton"))
    assert all(lin.prefill_gemms == ("flashinfer", "triton") for lin in layers)
    assert all(lin.prefill_gemm is None for lin in layers)


def test_prefill_bench_reads_fp8_gemm_orders():
    """bench/prefill.py --fp8-gemms: each a comma list of hetero.gpu.fp8_prefill.ROUTES, the
    Triton kernel appended where not named; an unknown name is refused with the known ones."""
    from bench.prefill import parse_args

    args = parse_args(["--fp8-gemms", "cublas", "flashinfer,cublas", "triton,cublas"])
    assert args.fp8_gemms == [("cublas", "triton"), ("flashinfer", "cublas", "triton"),
                              ("triton", "cublas")]  # fmt: skip
    assert parse_args([]).fp8_gemms is None
    with pytest.raises(SystemExit):
        parse_args(["--fp8-gemms", "cudnn"])


def test_set_attention_resolves_auto_and_drops_the_captured_graphs(monkeypatch):
    """Backend "auto" between levels is what the loader makes of it (no flashinfer here: triton's
    path), "absorbed" keeps W_UK / W_UV dense, and the engine's decoders are dropped."""
    from types import SimpleNamespace

    from bench.workloads import set_attention
    from hetero.gpu import flashinfer_mla
    from hetero.model.attention import absorbed_attention, paged_attention

    monkeypatch.setattr(flashinfer_mla, "available", lambda: False)
    config = ModelConfig.from_hf(tiny_v3_config(q_lora_rank=128, moe_intermediate_size=128,
                                                intermediate_size=256))  # fmt: skip
    model = random_model(config, "cpu", torch.float32, fp8=True, attention="absorbed")
    runner = SimpleNamespace(decoders={(1, 1): object()})
    handle = SimpleNamespace(engine=SimpleNamespace(runner=runner))
    set_attention(model, handle, "auto")
    mla = model.model.layers[0].self_attn
    assert (mla.backend, mla.attend, mla.w_uk) == ("auto", paged_attention, None)
    assert runner.decoders == {}
    set_attention(model, handle, "absorbed")
    assert mla.attend is absorbed_attention and mla.w_uk is not None
