"""The CPU's packed int4 (hetero.cpu_experts.formats) dequantized on the GPU in one pass.

In each group of G weights along a row, byte j holds weight j (low nibble) and j + G/2 (high),
both + 8, and the group has one bf16 scale. A program takes BLOCK bytes of one row: it reads
them and their groups' scales once and writes the 2 * BLOCK weights (two stores of runs of G/2).
Reading 0.5 byte a weight and writing 2 (bf16), it runs at HBM speed: what a prefill wants
before its grouped GEMMs, which then read dense bf16 tiles instead of unpacking nibbles and
multiplying scales in every program that shares a weight tile (`fused_moe_int4`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # bytes of a row a program takes


@triton.jit
def _dequant_int4(q_ptr, s_ptr, out_ptr, K, G: tl.constexpr, BLOCK: tl.constexpr):
    r, j = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c = j * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] bytes of row r
    ok = c < K // 2
    b = tl.load(q_ptr + r * (K // 2) + c, mask=ok, other=0)
    grp = c // (G // 2)
    s = tl.load(s_ptr + r * (K // G) + grp, mask=ok, other=0.0).to(tl.float32)  # [BLOCK]
    k = grp * G + c % (G // 2)  # the low nibble's weight
    lo = ((b & 15).to(tl.int32) - 8).to(tl.float32) * s
    hi = ((b >> 4).to(tl.int32) - 8).to(tl.float32) * s
    dst = out_ptr + r * K + k
    tl.store(dst, lo.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + G // 2, hi.to(out_ptr.dtype.element_ty), mask=ok)


def dequant_int4(q: torch.Tensor, s: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """q [..., K/2] uint8, s [..., K/G] bf16 -> [..., K] in `dtype` (formats.dequantize_tensors'
    values, each weight's product with its scale rounded once to `dtype`)."""
    G, K = group, 2 * q.shape[-1]
    if q.dtype != torch.uint8 or s.dtype != torch.bfloat16:
        raise ValueError(f"q {q.dtype} / s {s.dtype}: want uint8 / bfloat16")
    if K % G or s.shape != (*q.shape[:-1], K // G):
        raise ValueError(f"s {tuple(s.shape)} does not fit q {tuple(q.shape)} in groups of {G}")
    out = torch.empty(*q.shape[:-1], K, dtype=dtype, device=q.device)
    rows = q.numel() // (K // 2)
    if rows:
        grid = (rows, triton.cdiv(K // 2, BLOCK))
        _dequant_int4[grid](q.contiguous(), s.contiguous(), out, K, G=G, BLOCK=BLOCK)
    return out
