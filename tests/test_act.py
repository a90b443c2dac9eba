"""SwiGLU's activation kernel (hetero.gpu.act.silu_mul) against torch's F.silu(gate) * up: in
Triton's interpreter without CUDA, on the GPU with it; and FP8Linear.silu_mul past the GEMV's
sizes, which now ends in that kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetero.model.fp8 import FP8Linear, block_quantize

pytest.importorskip("triton")
from hetero.gpu.act import silu_mul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 2 * 300), (2, 3, 2 * 1100)])  # partial column blocks
def test_silu_mul_equals_torch(shape, dtype):
    """Within one rounding of the dtype (torch divides by 1 + e^-x, the kernel multiplies by
    the sigmoid: the fp32 values can differ in their last bit before rounding)."""
    gu = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    got = silu_mul(gu.to(DEVICE)).cpu()
    want = swiglu(gu.float()).to(dtype)  # (CPU torch's bf16 silu rounds differently again)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    ulp = {torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=1e-6)


def test_silu_mul_refuses_an_odd_width():
    with pytest.raises(ValueError, match="want an even count"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [17, 40])
def test_fp8_silu_mul_past_the_gemv_equals_torch(M):
    """A fused gate|up FP8Linear at more rows than the GEMV takes: GEMM, then the one kernel;
    the same h as torch's silu and product on the same GEMM output, to one bf16 rounding."""
    g = torch.Generator().manual_seed(M)
    q, s = block_quantize(torch.randn(2 * 512, 1024, generator=g))
    lin = FP8Linear(1024, 2 * 512).cuda()
    lin.weight.data, lin.weight_scale_inv.data = q.cuda(), s.cuda()
    x = torch.randn(M, 1024, generator=g).bfloat16().cuda()
    got = lin.silu_mul(x)
    want = swiglu(lin(x).float()).bfloat16()
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-5)
