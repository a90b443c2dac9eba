"""Fusing the FP8 matrices that read the same input (hetero.model.fp8.fuse_fp8: MLA's q_a and
kv_a, SwiGLU's gate and up): the same logits, the same state_dict, no memory added."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hetero.config import ModelConfig
from hetero.model import ForwardBatch, Transformer
from hetero.model.fp8 import FP8Linear, block_quantize, fuse_fp8, to_fp8
from hetero.testing import tiny_v3_config

BLOCK = (32, 32)  # q_lora_rank 96 and the MLPs' widths are whole blocks of 32 rows


def fp8_model(seed: int = 0) -> Transformer:
    config = ModelConfig.from_hf(tiny_v3_config())
    model = Transformer(config)
    to_fp8(model, lambda name: True, BLOCK)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FP8Linear):
                w = torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.in_features)
                m.weight.data, m.weight_scale_inv.data = block_quantize(w, BLOCK)
        for name, p in model.named_parameters():
            if p.dtype == torch.float32 and "scale" not in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1, generator=gen)
    return model.eval()


def logits(model: Transformer) -> torch.Tensor:
    """A prompt of 7 tokens, then two decode steps: all logits [9, V]."""
    cache = model.new_cache(1, 16)
    prompt = torch.tensor([3, 9, 4, 12, 7, 1, 30])
    out = [model(prompt, ForwardBatch.build([0], [7], [7]), cache)]
    for n, t in ((8, 5), (9, 11)):
        out.append(model(torch.tensor([t]), ForwardBatch.build([0], [1], [n]), cache))
    return torch.cat(out)


def test_fused_model_gives_the_same_logits_and_state_dict():
    model = fp8_model()
    want = logits(model)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    model.fuse_projections()
    dense, moe = model.model.layers[0], model.model.layers[-1]
    assert not dense.is_moe and moe.is_moe
    for block in model.model.layers:
        assert block.self_attn.qkv_a.out_features == 96 + 64 + 16
    assert dense.mlp.gate_up.out_features == 2 * 320
    assert moe.mlp.shared_experts.gate_up.out_features == 2 * 96
    torch.testing.assert_close(logits(fp8_model()), want)  # (the same seed: the same model)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert sum(p.numel() for p in model.parameters()) == count


def test_parts_become_views_of_the_fused_weight():
    a, b = FP8Linear(64, 32, BLOCK), FP8Linear(64, 40, BLOCK)  # the last part may end mid-block
    for m in (a, b):
        m.weight.data, m.weight_scale_inv.data = block_quantize(
            torch.randn(m.out_features, 64), BLOCK
        )
    x = torch.randn(3, 64)
    want = torch.cat([a(x), b(x)], dim=-1)
    fused = fuse_fp8([a, b])
    torch.testing.assert_close(fused(x), want)
    assert a.weight.data_ptr() == fused.weight.data_ptr()
    assert b.weight_scale_inv.data_ptr() == fused.weight_scale_inv[1:].data_ptr()
    torch.testing.assert_close(torch.cat([a(x), b(x)], dim=-1), want)


@pytest.mark.parametrize(
    "parts",
    [
        lambda: [FP8Linear(64, 40, BLOCK), FP8Linear(64, 32, BLOCK)],  # first ends mid-block
        lambda: [FP8Linear(64, 32, BLOCK), FP8Linear(32, 32, BLOCK)],  # other inputs
        lambda: [FP8Linear(64, 32, BLOCK), nn.Linear(64, 32)],  # not FP8
        lambda: [FP8Linear(64, 32, BLOCK), FP8Linear(64, 32, (16, 16))],  # other blocks
    ],
)
def test_parts_that_do_not_fuse(parts):
    assert fuse_fp8(parts()) is None
