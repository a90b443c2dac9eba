"""SwiGLU's activation on the GPU: h = silu(gate) * up of a fused gate|up output in one kernel,
where torch takes two (silu, then the product) and writes an intermediate between them.

`silu_mul_as_torch` rounds as torch's `F.silu(gate) * up` does in a 16-bit dtype (gate, its
silu and the product each rounded to it), so the fused kernels (fp8_gemm's reduction, this
one) give the same h as the torch reference path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_mul_as_torch(gate, up, dtype: tl.constexpr):
    """silu(gate) * up rounded as torch's F.silu(gate) * up in `dtype`: gate, silu, product."""
    gate = gate.to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    return act * up.to(dtype).to(tl.float32)


@triton.jit
def _silu_mul_rows(gu_ptr, h_ptr, I, stride_m, BLOCK: tl.constexpr):
    """h[m, cols] from row m of gu [M, 2I] (gate | up), BLOCK columns a program."""
    m, b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = cols < I
    row = gu_ptr + m * stride_m
    gate = tl.load(row + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(row + I + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    tl.store(h_ptr + m * I + cols, silu_mul_as_torch(gate, up, dtype).to(dtype), mask=ok)


def silu_mul(gu: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gu [..., 2I] (gate then up, as FP8Linear.silu_mul's fused weight gives them) -> h [..., I]
    = silu(gate) * up in gu's dtype."""
    if gu.shape[-1] % 2:
        raise ValueError(f"gate|up of {gu.shape[-1]} columns: want an even count")
    lead, I = gu.shape[:-1], gu.shape[-1] // 2
    gu2 = gu.reshape(-1, 2 * I)
    if gu2.stride(-1) != 1:
        gu2 = gu2.contiguous()
    M = gu2.shape[0]
    h = torch.empty(M, I, device=gu.device, dtype=gu.dtype)
    if M and I:
        _silu_mul_rows[(M, triton.cdiv(I, block))](gu2, h, I, gu2.stride(0), BLOCK=block)
    return h.view(*lead, I)
