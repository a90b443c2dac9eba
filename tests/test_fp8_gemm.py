"""The FP8 decode kernel (hetero.gpu.fp8_gemm) against dequantize-then-matmul: in Triton's
interpreter on tiny shapes without CUDA, on the GPU at DeepSeek-V3's shapes with it."""

from __future__ import annotations

import pytest
import torch

from hetero.model.fp8 import FP8Linear, block_dequantize, block_quantize

pytest.importorskip("triton")
from hetero.gpu.fp8_gemm import fp8_gemm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.float() @ block_dequantize(q, s, (128, 128)).T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "M, N, K, programs",
    [
        (1, 576, 256, 1),  # partial row block (DeepSeek's kv_a_proj has 576 rows), no split
        (3, 200, 384, 8),  # split-K over 3 K blocks, partial last row tile
        (17, 130, 300, 4),  # two token tiles, partial K block, a split with no K block left
        (5, 64, 128, 1),
    ],
)
def test_fp8_gemm_equals_dequantized_matmul(M, N, K, programs):
    g = torch.Generator().manual_seed(M * N + K)
    q, s = block_quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g)
    q, s, x = q.to(DEVICE), s.to(DEVICE), x.to(DEVICE)
    want = reference(x, q, s)
    assert rel(fp8_gemm(x, q, s, programs=programs), want) < 1e-5  # fp32: exact but for order
    xb = x.bfloat16()
    got = fp8_gemm(xb, q, s, programs=programs)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # bf16 activations are exact in the kernel's tf32; the output is rounded to bf16 once
    assert rel(got, reference(xb, q, s)) < 4e-3


def test_fp8_gemm_keeps_leading_dims_and_strides():
    g = torch.Generator().manual_seed(1)
    q, s = block_quantize(torch.randn(96, 256, generator=g))
    x = torch.randn(2, 3, 512, generator=g)[..., ::2]  # [2, 3, 256], not contiguous
    got = fp8_gemm(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), programs=2)
    assert got.shape == (2, 3, 96)
    assert rel(got.cpu(), reference(x.reshape(6, 256), q, s).view(2, 3, 96)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("N, K", [(24576, 1536), (7168, 16384), (576, 7168), (2048, 7168)])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_cuda_fp8_linear_uses_the_kernel_at_v3_shapes(M, N, K):
    """FP8Linear on CUDA at decode sizes (the kernel) equals its dequantizing path."""
    g = torch.Generator().manual_seed(N + K)
    q, s = block_quantize(torch.randn(N, K, generator=g) / K**0.5)
    lin = FP8Linear(K, N).cuda()
    lin.weight.data.copy_(q.cuda())
    lin.weight_scale_inv.data.copy_(s.cuda())
    x = torch.randn(M, K, generator=g).cuda().bfloat16()
    want = reference(x, lin.weight, lin.weight_scale_inv)
    assert rel(lin(x), want) < 4e-3
