"""Rotary position embedding in one Triton kernel (`Rotary.forward`'s torch ops: the reference).

The torch form takes ~11 kernels a call (two table gathers, a cast, four products, two sums, a
cat and a cast back); MLA calls it twice a layer (q_pe, k_pe), so a decode step of DeepSeek-V3
launched ~1300 kernels of a few microseconds each for rotary alone. Here one program rotates one
token's heads: it reads the token's position, the cos/sin rows of that position from the tables
(already scaled by YaRN's attention factor) and writes the rotated pairs, computed in fp32, in
x's dtype. Pairs are (2i, 2i + 1) (`interleave`, as DeepSeek's checkpoints expect) or
(i, i + r/2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(
    x_ptr,  # [T, h, r], last dim contiguous
    pos_ptr,  # [T] int64
    cos_ptr,  # [L, r/2] fp32
    sin_ptr,
    out_ptr,  # [T, h, r] contiguous
    H,
    stride_xt,
    stride_xh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    i = tl.arange(0, HALF)  # [r/2]
    ok = (heads < H)[:, None]
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * HALF + i)[None, :]  # [1, r/2]
    sin = tl.load(sin_ptr + pos * HALF + i)[None, :]
    if INTERLEAVE:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    src = x_ptr + t.to(tl.int64) * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(src + first[None, :], mask=ok, other=0.0).to(tl.float32)  # [BH, r/2]
    x2 = tl.load(src + second[None, :], mask=ok, other=0.0).to(tl.float32)
    dst = out_ptr + (t.to(tl.int64) * H + heads[:, None]) * (2 * HALF)
    dtype = out_ptr.dtype.element_ty
    tl.store(dst + first[None, :], (x1 * cos - x2 * sin).to(dtype), mask=ok)
    tl.store(dst + second[None, :], (x2 * cos + x1 * sin).to(dtype), mask=ok)


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
) -> torch.Tensor:
    """x [T, h, r] (any strides but a contiguous last dim), positions [T] int64 (each below
    the tables' length), cos/sin tables [L, r/2] fp32 -> rotated [T, h, r] contiguous in x's
    dtype."""
    T, H, R = x.shape
    if R % 2 or cos.shape[-1] != R // 2 or sin.shape != cos.shape:
        raise ValueError(f"x {tuple(x.shape)} does not fit tables {tuple(cos.shape)}")
    half = R // 2
    if half & (half - 1):
        raise ValueError(f"rope_dim {R}: the kernel wants a power of two")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((T, H, R), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(H), 32)
    if T:
        _rope[(T, triton.cdiv(H, block_h))](
            x, positions, cos.contiguous(), sin.contiguous(), out, H, x.stride(0), x.stride(1),
            HALF=half, BLOCK_H=block_h, INTERLEAVE=interleave,
        )  # fmt: skip
    return out
