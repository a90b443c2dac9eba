"""MLA's absorbed per-head products straight from kv_b_proj's FP8 blocks (DeepSeek-V3's format:
float8_e4m3fn rows [heads (nope + v), kv_rank], a float32 scale per 128 x 128 block):

    q_lat[t, h, c] = sum_d q_nope[t, h, d] W_UK[h, d, c]   (W_UK: the head's first `nope` rows)
    o[t, h, v]     = sum_c out_lat[t, h, c] W_UV[h, v, c]  (W_UV: its last `v` rows)

The attention kernels' backends on the GPU keep no dense W_UK / W_UV (`runtime.absorbs`: as fast
as the bf16 copies, which hold twice the bytes); the torch path without copies dequantizes all
of kv_b_proj at every call (~120 us a layer on the H100), these kernels read its FP8 bytes as
stored. A weight tile is dequantized in registers to
the activations' dtype, as `FP8Linear.dense_weight` rounds it, so the products are those of the
dense copies up to the order of the fp32 sums. One program a head (and a block of tokens; for
W_UK also a block of kv_rank columns)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w_tile(w_ptr, s_ptr, rows, c0, cols, row_ok, col_ok, C, stride_s, SN: tl.constexpr,
            SK: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """kv_b_proj's rows x cols [R, BC] (cols from c0, within one SK-wide scale block: BC
    divides SK), dequantized (fp8 x its block's scale, in fp32) and rounded to dtype; the
    scales are one a row (its row block's, in the tile's column block)."""
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=ok, other=0.0)
    s = tl.load(s_ptr + (rows // SN) * stride_s + c0 // SK, mask=row_ok, other=0.0)  # [R]
    return (w.to(tl.float32) * s[:, None]).to(dtype)


@triton.jit
def _uk(x_ptr, w_ptr, s_ptr, y_ptr, T, H, C, stride_xt, stride_xh, stride_s,
        NOPE: tl.constexpr, V: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr):  # fmt: skip
    """y [T, H, C] (contiguous) = x [T, H, NOPE] (any strides but the last) . W_UK."""
    h, cb, tb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    ds = tl.arange(0, BLOCK_D)  # [BD]
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    t_ok, d_ok, c_ok = ts < T, ds < NOPE, cs < C
    x = tl.load(x_ptr + ts.to(tl.int64)[:, None] * stride_xt + h * stride_xh + ds[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [BT, BD]  # fmt: skip
    w = _w_tile(w_ptr, s_ptr, h * (NOPE + V) + ds, cb * BLOCK_C, cs, d_ok, c_ok, C, stride_s,
                SN, SK, x.dtype)  # [BD, BC]  # fmt: skip
    y = tl.dot(x, w, input_precision=PRECISION)  # [BT, BC] fp32
    dst = y_ptr + (ts.to(tl.int64)[:, None] * H + h) * C + cs[None, :]
    tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _uv(x_ptr, w_ptr, s_ptr, y_ptr, T, H, C, stride_xt, stride_xh, stride_s,
        NOPE: tl.constexpr, V: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr):  # fmt: skip
    """y [T, H, V] (contiguous) = x [T, H, C] (any strides but the last) . W_UV^T."""
    h, tb = tl.program_id(0), tl.program_id(1)
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    vs = tl.arange(0, BLOCK_V)  # [BV]
    t_ok, v_ok = ts < T, vs < V
    rows = h * (NOPE + V) + NOPE + vs
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)  # [BC]
        c_ok = cs < C
        x = tl.load(x_ptr + ts.to(tl.int64)[:, None] * stride_xt + h * stride_xh + cs[None, :],
                    mask=t_ok[:, None] & c_ok[None, :], other=0.0)  # [BT, BC]  # fmt: skip
        w = _w_tile(w_ptr, s_ptr, rows, c0, cs, v_ok, c_ok, C, stride_s, SN, SK, x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    dst = y_ptr + (ts.to(tl.int64)[:, None] * H + h) * V + vs[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & v_ok[None, :])


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block, nope: int, v: int,
           last: int) -> tuple[int, int, int]:  # fmt: skip
    T, H, D = x.shape
    rows, C = weight.shape
    if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        raise ValueError(f"weight {weight.dtype} / scale {scale.dtype}: want e4m3fn / float32")
    if rows != H * (nope + v) or D != last:
        raise ValueError(f"x {tuple(x.shape)} does not fit kv_b_proj {rows}x{C} with {H} heads "
                         f"of {nope} + {v} rows")  # fmt: skip
    if scale.shape != (triton.cdiv(rows, block[0]), triton.cdiv(C, block[1])):
        raise ValueError(f"scale {tuple(scale.shape)} does not fit weight {rows}x{C} in {block}")
    if not weight.is_contiguous() or x.stride(-1) != 1:
        raise ValueError("weight must be contiguous, x's last dim too")
    return T, H, C


def _tiles(T: int, x: torch.Tensor, C: int, block: tuple[int, int]) -> tuple[int, int, str]:
    """Tokens a program (>= 16: tl.dot's least), kv_rank columns a tile (within one scale
    block: so its scales are one a row) and the dot's precision (fp32: exact)."""
    if block[1] & (block[1] - 1) or block[1] < 16:
        raise ValueError(f"block {block}: its K size must be a power of two >= 16")
    bc = max(16, min(128, block[1], triton.next_power_of_2(C)))
    return (
        max(16, min(64, triton.next_power_of_2(T))),
        bc,
        ("ieee" if x.dtype == torch.float32 else "tf32"),
    )


def uk_fp8(q_nope, weight, scale, block: tuple[int, int], nope: int, v: int) -> torch.Tensor:
    """q_nope [T, H, nope] -> q_lat [T, H, kv_rank] in its dtype, W_UK from kv_b_proj's FP8
    weight [H (nope + v), kv_rank] and block scales."""
    T, H, C = _check(q_nope, weight, scale, block, nope, v, nope)
    y = torch.empty(T, H, C, device=q_nope.device, dtype=q_nope.dtype)
    bt, bc, precision = _tiles(T, q_nope, C, block)
    if T:
        _uk[(H, triton.cdiv(C, bc), triton.cdiv(T, bt))](
            q_nope, weight, scale, y, T, H, C, q_nope.stride(0), q_nope.stride(1),
            scale.stride(0), NOPE=nope, V=v, SN=block[0], SK=block[1], BLOCK_T=bt,
            BLOCK_D=max(16, triton.next_power_of_2(nope)), BLOCK_C=bc, PRECISION=precision,
        )  # fmt: skip
    return y


def uv_fp8(out_lat, weight, scale, block: tuple[int, int], nope: int, v: int) -> torch.Tensor:
    """out_lat [T, H, kv_rank] -> o [T, H, v] in its dtype, W_UV from kv_b_proj's FP8 weight."""
    T, H, C = _check(out_lat, weight, scale, block, nope, v, weight.shape[1])
    y = torch.empty(T, H, v, device=out_lat.device, dtype=out_lat.dtype)
    bt, bc, precision = _tiles(T, out_lat, C, block)
    if T:
        _uv[(H, triton.cdiv(T, bt))](
            out_lat, weight, scale, y, T, H, C, out_lat.stride(0), out_lat.stride(1),
            scale.stride(0), NOPE=nope, V=v, SN=block[0], SK=block[1], BLOCK_T=bt,
            BLOCK_V=max(16, triton.next_power_of_2(v)), BLOCK_C=bc, PRECISION=precision,
        )  # fmt: skip
    return y
