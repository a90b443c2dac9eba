"""MLA's cache write in one Triton kernel: kv_a's latent normalized, its rope key rotated, both
stored in the paged cache (MLA.forward's unfused path: the RMSNorm, the Rotary and
PagedKVCache.write, four kernels a layer at decode, is the reference).

One program a token: it reads the token's kv_a row [c + r], normalizes the latent c as RMSNorm
does (sum of squares in fp32, the normalized row rounded to kv_a's dtype, times the weight),
rotates the r rope values at the token's position with the same cos/sin tables as Rotary, and
writes both to the token's cache row (its slot in the layer's pages).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write(
    kv_ptr,  # [T, c + r], the last dim contiguous
    w_ptr,  # [c] the latent's norm weight
    pos_ptr,  # [T] int64
    cos_ptr,  # [L, r/2] fp32
    sin_ptr,
    slot_ptr,  # [T] int64: the token's row in the layer's pages
    lat_ptr,  # [rows, c] the layer's latent pages
    rope_ptr,  # [rows, r]
    C,
    stride_kv,
    eps,
    BLOCK_C: tl.constexpr,
    HALF: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    src = kv_ptr + t * stride_kv
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(src + cols, mask=ok, other=0.0).to(tl.float32)  # [BC]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    normed = (x * rstd).to(kv_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    row = tl.load(slot_ptr + t).to(tl.int64)
    tl.store(lat_ptr + row * C + cols, (w * normed).to(lat_ptr.dtype.element_ty), mask=ok)
    i = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * HALF + i)
    sin = tl.load(sin_ptr + pos * HALF + i)
    if INTERLEAVE:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    x1 = tl.load(src + C + first).to(tl.float32)  # [r/2]
    x2 = tl.load(src + C + second).to(tl.float32)
    dst = rope_ptr + row * (2 * HALF)
    dtype = rope_ptr.dtype.element_ty
    # rounded to kv_a's dtype first, as Rotary returns it before the cache's cast
    a = (x1 * cos - x2 * sin).to(kv_ptr.dtype.element_ty)
    b = (x2 * cos + x1 * sin).to(kv_ptr.dtype.element_ty)
    tl.store(dst + first, a.to(dtype))
    tl.store(dst + second, b.to(dtype))


def kv_write(
    kv_a: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    slots: torch.Tensor,
    latent: torch.Tensor,
    rope: torch.Tensor,
) -> None:
    """kv_a [T, c + r] (rows may be strided), the latent's norm weight [c], positions [T] int64,
    cos/sin tables [L, r/2] fp32 (L above every position), slots [T] int64 (rows of the layer's
    pages), the layer's pages latent [P, page, c] and rope [P, page, r]: writes
    norm(latent) and rotated(k_pe) of each token into its row. The norm's result is rounded as
    RMSNorm rounds it (in weight * x's dtype), so the latent pages must hold that dtype."""
    T, D = kv_a.shape
    C, R = latent.shape[-1], rope.shape[-1]
    if D != C + R or weight.shape != (C,) or cos.shape[-1] != R // 2 or sin.shape != cos.shape:
        shapes = [tuple(t.shape) for t in (kv_a, weight, latent, rope, cos)]
        raise ValueError(f"kv_a, weight, latent, rope, cos shapes {shapes} do not agree")
    if R % 2 or (R // 2) & (R // 2 - 1):
        raise ValueError(f"rope_dim {R}: the kernel wants a power of two")
    if latent.dtype != torch.result_type(weight, kv_a):
        raise ValueError(f"latent pages of {latent.dtype}, the norm gives "
                         f"{torch.result_type(weight, kv_a)}")  # fmt: skip
    if positions.shape != (T,) or slots.shape != (T,):
        raise ValueError(f"positions {tuple(positions.shape)}, slots {tuple(slots.shape)} "
                         f"for {T} tokens")  # fmt: skip
    if not (latent.is_contiguous() and rope.is_contiguous()):
        raise ValueError("latent and rope pages must be contiguous")
    if kv_a.stride(-1) != 1:
        kv_a = kv_a.contiguous()
    if T:
        BLOCK_C = triton.next_power_of_2(C)
        _kv_write[(T,)](
            kv_a, weight, positions, cos.contiguous(), sin.contiguous(), slots, latent, rope, C,
            kv_a.stride(0), eps, BLOCK_C=BLOCK_C, HALF=R // 2, INTERLEAVE=interleave,
            num_warps=max(1, min(4, BLOCK_C // 256)),
        )  # fmt: skip
