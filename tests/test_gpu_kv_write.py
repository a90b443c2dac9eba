"""The fused cache write (hetero.gpu.kv_write) against MLA's unfused path on the same kv_a: the
latent's RMSNorm, the rope key's Rotary and PagedKVCache.write, in Triton's interpreter without
CUDA, at DeepSeek-V3's shapes on the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from hetero.config import ModelConfig  # noqa: E402
from hetero.gpu.kv_write import kv_write  # noqa: E402
from hetero.model import ForwardBatch  # noqa: E402
from hetero.model.batch import PagedKVCache  # noqa: E402
from hetero.model.layers import RMSNorm, Rotary  # noqa: E402
from hetero.testing import tiny_v3_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unfused(config, norm, rotary, kv_a, batch, cache, layer):
    """MLA.forward's own path on the CPU: norm, rotary, write."""
    c = config.kv_lora_rank
    latent, k_pe = kv_a.split([c, config.qk_rope_head_dim], dim=-1)
    longest = int(batch.positions.max()) + 1
    k_pe = rotary(k_pe[:, None, :], batch.positions, longest)[:, 0]
    cache.write(layer, batch, norm(latent), k_pe)


def check(config, dtype, tables, q_lens, ctx_lens, page, device=DEVICE):
    gen = torch.Generator().manual_seed(sum(ctx_lens))
    c, r = config.kv_lora_rank, config.qk_rope_head_dim
    norm = RMSNorm(c, config.rms_norm_eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(c, generator=gen))
    rotary = Rotary(config)
    batch = ForwardBatch.paged(tables, q_lens, ctx_lens, page, "cpu")
    T = sum(q_lens)
    wide = torch.randn(T, c + r + 24, generator=gen).to(dtype)  # rows strided, as qkv_a's split
    kv_a = wide[:, :-24]
    pages = 1 + max(max(t) for t in tables)
    want = PagedKVCache(config, pages, page, dtype=dtype)
    unfused(config, norm, rotary, kv_a, batch, want, layer=1)
    got = PagedKVCache(config, pages, page, device=device, dtype=dtype)
    cos, sin = rotary.to(device).full_tables(max(ctx_lens), device)
    kv_write(kv_a.to(device), norm.weight.to(device), norm.eps, batch.positions.to(device), cos,
             sin, config.rope.interleave, batch.slot_mapping.to(device), got.latent[1],
             got.rope[1])  # fmt: skip
    # the same roundings: equal but for the order of the fp32 sum of squares, which can move a
    # bf16 latent by an ulp or two (as test_gpu_norm allows)
    tol = (1e-6, 1e-6) if dtype == torch.float32 else (2e-2, 1.6e-2)
    for a, b in ((got.latent, want.latent), (got.rope, want.rope)):
        torch.testing.assert_close(a.cpu().float(), b.float(), atol=tol[0], rtol=tol[1])
    assert got.latent[1].abs().sum() > 0 and got.latent[0].abs().sum() == 0  # layer 1 only


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_write_equals_norm_rotary_and_write(interleave, dtype):
    config = ModelConfig.from_hf(tiny_v3_config(rope_interleave=interleave))
    # a decode row and two prompts' chunks, crossing page boundaries, on scattered pages
    check(config, dtype, tables=[[3], [1, 4], [2, 5, 6]], q_lens=[1, 5, 7], ctx_lens=[4, 9, 19],
          page=8)  # fmt: skip


def test_fused_write_refuses_what_it_cannot_store():
    config = ModelConfig.from_hf(tiny_v3_config())
    c, r = config.kv_lora_rank, config.qk_rope_head_dim
    cache = PagedKVCache(config, 2, 4, dtype=torch.bfloat16)
    cos = sin = torch.zeros(8, r // 2)
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="latent pages of torch.bfloat16"):
        kv_write(torch.zeros(1, c + r), torch.ones(c), 1e-6, one, cos, sin, True, one,
                 cache.latent[0], cache.rope[0])  # fmt: skip
    with pytest.raises(ValueError, match="do not agree"):
        kv_write(torch.zeros(1, c + r + 2), torch.ones(c), 1e-6, one, cos, sin, True, one,
                 cache.latent[0], cache.rope[0])  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_write_at_v3_shapes():
    config = ModelConfig.from_hf(Path(__file__).parent / "data" / "models" / "deepseek-v3")
    tables = [[1 + 2 * i, 2 + 2 * i] for i in range(32)]  # 32 decode rows, 5..98 tokens
    check(config, torch.bfloat16, tables, [1] * 32, [5 + 3 * i for i in range(32)], page=64)
