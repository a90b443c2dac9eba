"""A layer's GPU-resident routed experts as two grouped GEMMs over the tokens sorted by expert
(vLLM's fused_moe design), with the weights read as they are stored: DeepSeek-V3's FP8 blocks
(W8A16), the CPU's packed int4 (W4A16, hetero.cpu_experts.formats) or its int8 (per row or per
128), so a layer's experts can be copied host -> GPU in their CPU format and computed from it.

`moe_align` lays the local (token, slot) pairs out by expert, padded to BLOCK_M rows. Then:
1. `_gate_up`, grid (blocks, I / BLOCK_N): a program takes BLOCK_M sorted rows of one expert
   (x gathered by token) and BLOCK_N columns of I, accumulates the gate and the up tiles of the
   same rows over H in one loop and stores h = silu(gate) * up [R, I] in sorted order. At
   decode sizes (16-row blocks) each program sums one of SPLIT_K ranges of H instead, stores
   its partial gate and up, and `_silu_mul` adds the ranges in a fixed order into h: 4x the
   programs where a pair's 32 could not stream its expert (H200, one or two int4-g32 experts:
   0.98 -> 0.55 ms).
2. `_down`, grid (blocks, H / BLOCK_N): h's rows times down_proj, scaled by the pair's router
   weight, stored to y [T*k, H] fp32 at the pair's row; out = y.view(T, k, H).sum(1).
The sum over k is a store per pair then a torch sum rather than an atomic add into [T, H]: each
pair is computed once, so plain stores suffice, and the sum runs in a fixed order, so a replay
gives the same bits (fp32 atomics add in whatever order programs finish). The cost is y's
T*k*H*4 bytes, zeroed, written and read once: nothing at decode; at T=512, k=8 it is 117 MB,
a third of 8 FP8 experts' weights (a bf16 y or atomics would be the fix if that shows).
BLOCK_M: 16 unless the pairs average more than 16 an expert (64), a launcher argument.

Weight tiles, dequantized in registers for a bf16 (or fp32) tl.dot with fp32 accumulation:
- FP8: one 128-wide K step is one scale column; the step's partial sums are scaled per row.
- int4: in each group of G along K, byte j holds weight j (low nibble) and j + G/2 (high), both
  + 8. A K step of 128 weights loads 64 bytes a row; the low nibbles meet x at each group's
  first half, the high nibbles at its second half (two dots of K = 64), each nibble times its
  group's bf16 scale. w13 [E, I, 2, H/2] is read as [E, 2I, H/2]: gate row r is row 2r, up 2r+1.
  From DEQUANT_PAIRS pairs a local expert on average (a prefill), the experts are first
  dequantized to x's dtype in one pass (`hetero.gpu.dequant`) and the dense tiles run instead:
  unpacking and scaling in registers, repeated by every program sharing a weight tile, held
  the int4 kernels to 25-45 TFLOPS on the H200 against the FP8 tiles' ~150.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetero.gpu import DEQUANT_BYTES
from hetero.gpu.dequant import dequant_int4
from hetero.gpu.moe_align import moe_align

BLOCK_N = 64  # output columns a program owns
INT4_BLOCK_K = 128  # weights along K per step of the int4 kernels (a multiple of every group)
SPLIT_K = 4  # gate/up's K ranges at decode sizes (`split_k`)
DEQUANT_PAIRS = 16  # local pairs an expert, on average, from which int4 experts are dequantized


@triton.jit
def _load_x(x_ptr, xoff, x_ok, k0, K, BLOCK_K: tl.constexpr, G: tl.constexpr,
            INT4: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """One K step of the activations: [BM, BK] (FP8), or for int4 the two [BM, BK/2] halves
    (each group's first and second half) that meet the low and the high nibbles. DOT_F32: as
    fp32 (Triton 3.9's interpreter gets bf16 dots wrong; the GPU dots bf16 on tensor cores)."""
    if INT4:
        c = tl.arange(0, BLOCK_K // 2)
        k = k0 + (c // (G // 2)) * G + c % (G // 2)  # [BK/2]
        m = x_ok[:, None] & (k[None, :] < K)
        xa = tl.load(x_ptr + xoff[:, None] + k[None, :], mask=m, other=0.0)
        xb = tl.load(x_ptr + xoff[:, None] + k[None, :] + G // 2, mask=m, other=0.0)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        xa = tl.load(x_ptr + xoff[:, None] + k[None, :], mask=x_ok[:, None] & (k[None, :] < K),
                     other=0.0)  # fmt: skip
        xb = xa
    if DOT_F32:
        xa, xb = xa.to(tl.float32), xb.to(tl.float32)
    return xa, xb


@triton.jit
def _dot_w(acc, xa, xb, w_ptr, s_ptr, rows, row_ok, k0, K, stride_wn, stride_sn,
           SN: tl.constexpr, SK: tl.constexpr, BLOCK_K: tl.constexpr,
           INT4: tl.constexpr):  # fmt: skip
    """acc [BM, BN] += x's K step times weight rows `rows` [BN]: FP8 scales s[row // SN, k //
    SK]; int4 (SN = 1, SK = G) scales s[row, k // G] as bf16."""
    if INT4:
        c = tl.arange(0, BLOCK_K // 2)
        k = k0 + (c // (SK // 2)) * SK + c % (SK // 2)  # [BK/2] the low nibbles' weights
        m = row_ok[:, None] & (k[None, :] < K)
        b = tl.load(w_ptr + rows[:, None] * stride_wn + k0 // 2 + c[None, :], mask=m, other=0)
        s = tl.load(s_ptr + rows[:, None] * stride_sn + k[None, :] // SK, mask=m, other=0.0)
        s = s.to(tl.float32)  # [BN, BK/2]
        lo = (((b & 15).to(tl.int32) - 8).to(tl.float32) * s).to(xa.dtype)
        hi = (((b >> 4).to(tl.int32) - 8).to(tl.float32) * s).to(xa.dtype)
        acc += tl.dot(xa, tl.trans(lo), input_precision="ieee")
        acc += tl.dot(xb, tl.trans(hi), input_precision="ieee")
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :],
                    mask=row_ok[:, None] & (k[None, :] < K), other=0.0)  # [BN, BK]  # fmt: skip
        s = tl.load(s_ptr + (rows // SN) * stride_sn + k0 // SK, mask=row_ok, other=0.0)  # [BN]
        part = tl.dot(xa, tl.trans(w.to(xa.dtype)), input_precision="ieee")  # e4m3: exact
        acc += part * s[None, :]
    return acc


@triton.jit
def _gate_up(x_ptr, w_ptr, s_ptr, h_ptr, pairs_ptr, bexp_ptr,
             P, TOPK, K, I, UP_ROW, stride_we, stride_wn, stride_se, stride_sn,
             KS, ROW_STEP: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             INT4: tl.constexpr, DOT_F32: tl.constexpr, PARTIAL: tl.constexpr):  # fmt: skip
    """h[pos, r] = silu(x[t] . gate[r]) * (x[t] . up[r]) for the pair at sorted row pos;
    gate row r is weight row r * ROW_STEP, up row r is that + UP_ROW. Program (., ., z) sums
    K's range [z KS, (z + 1) KS); PARTIAL: it stores its g and u to h [z, pos, 2, I] fp32
    instead (split-K: `_silu_mul` sums the ranges in a fixed order)."""
    blk, j, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = tl.load(bexp_ptr + blk)
    if e < 0:  # past the used rows
        return
    pos = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of the sorted order
    pair = tl.load(pairs_ptr + pos)  # [BM] t * k + slot; P: padding
    ok = pair < P
    xoff = (pair // TOPK).to(tl.int64) * K  # [BM] the token's row of x
    r = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of h
    r_ok = r < I
    w_ptr += e.to(tl.int64) * stride_we
    s_ptr += e.to(tl.int64) * stride_se
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(z * KS, tl.minimum(z * KS + KS, K), BLOCK_K):
        xa, xb = _load_x(x_ptr, xoff, ok, k0, K, BLOCK_K, SK, INT4, DOT_F32)
        g = _dot_w(g, xa, xb, w_ptr, s_ptr, r * ROW_STEP, r_ok, k0, K, stride_wn, stride_sn,
                   SN, SK, BLOCK_K, INT4)  # fmt: skip
        u = _dot_w(u, xa, xb, w_ptr, s_ptr, r * ROW_STEP + UP_ROW, r_ok, k0, K, stride_wn,
                   stride_sn, SN, SK, BLOCK_K, INT4)  # fmt: skip
    store = ok[:, None] & r_ok[None, :]
    if PARTIAL:  # [z, pos, 2, I] fp32
        at = h_ptr + ((z * tl.num_programs(0) * BLOCK_M + pos[:, None]).to(tl.int64) * 2) * I
        tl.store(at + r[None, :], g, mask=store)
        tl.store(at + I + r[None, :], u, mask=store)
    else:
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + pos[:, None].to(tl.int64) * I + r[None, :],
                 h.to(h_ptr.dtype.element_ty), mask=store)  # fmt: skip


@triton.jit
def _silu_mul(part_ptr, h_ptr, pairs_ptr, P, R, I, SPLIT, BLOCK: tl.constexpr):
    """h[pos] = silu(sum_z g[z, pos]) * sum_z u[z, pos], the K ranges summed in order (the
    same bits every run); rows without a pair skip."""
    pos, j = tl.program_id(0), tl.program_id(1)
    if tl.load(pairs_ptr + pos) >= P:
        return
    c = j * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for z in range(0, SPLIT):
        at = part_ptr + ((z * R + pos).to(tl.int64) * 2) * I
        g += tl.load(at + c, mask=m, other=0.0)
        u += tl.load(at + I + c, mask=m, other=0.0)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + pos.to(tl.int64) * I + c, h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _down(h_ptr, w_ptr, s_ptr, y_ptr, rw_ptr, pairs_ptr, bexp_ptr,
          P, K, N, stride_we, stride_wn, stride_se, stride_sn,
          SN: tl.constexpr, SK: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          INT4: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """y[pair, n] = router weight of the pair * (h[pos] . down[n]) for the pair at sorted row
    pos; padding rows store nothing."""
    blk, j = tl.program_id(0), tl.program_id(1)
    e = tl.load(bexp_ptr + blk)
    if e < 0:
        return
    pos = blk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pair = tl.load(pairs_ptr + pos)  # [BM]
    ok = pair < P
    r = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of y
    r_ok = r < N
    w_ptr += e.to(tl.int64) * stride_we
    s_ptr += e.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xa, xb = _load_x(h_ptr, pos.to(tl.int64) * K, ok, k0, K, BLOCK_K, SK, INT4, DOT_F32)
        acc = _dot_w(acc, xa, xb, w_ptr, s_ptr, r, r_ok, k0, K, stride_wn, stride_sn,
                     SN, SK, BLOCK_K, INT4)  # fmt: skip
    rw = tl.load(rw_ptr + pair, mask=ok, other=0.0)  # [BM]
    tl.store(y_ptr + pair[:, None].to(tl.int64) * N + r[None, :], acc * rw[:, None],
             mask=ok[:, None] & r_ok[None, :])  # fmt: skip


def fused_moe_fp8(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    local: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    block_m: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [T, H], ids/weights [T, k], local [E] (expert id -> stack index, -1: elsewhere);
    StackedFP8Experts' stacks: w13 [n, 2I, H] e4m3 (gate rows, then up rows), s13 [n, 2I/bn,
    ceil(H/bk)] fp32, w2 [n, H, I], s2 [n, ceil(H/bn), ceil(I/bk)] -> the local experts'
    weighted sum [T, H] in x's dtype (pairs with id < 0 or not local count zero)."""
    _want(w13.ndim == 3 and w2.ndim == 3, f"w13/w2 {w13.ndim}/{w2.ndim} dims: want 3")
    (n, I2, H), (bn, bk) = w13.shape, block
    I = I2 // 2
    e4m3, f32 = torch.float8_e4m3fn, torch.float32
    _want(w13.dtype == w2.dtype == e4m3, f"w13/w2 {w13.dtype}/{w2.dtype}: want e4m3fn")
    _want(s13.dtype == s2.dtype == f32, f"s13/s2 {s13.dtype}/{s2.dtype}: want float32")
    _want(bk >= 16 and bk & (bk - 1) == 0, f"block {block}: its K size must be a power of 2 >= 16")
    _want(I2 % 2 == 0 and I % bn == 0, f"w13 {tuple(w13.shape)}: I must be a multiple of {bn}")
    _want(w2.shape == (n, H, I), f"w2 {tuple(w2.shape)} does not fit w13 {tuple(w13.shape)}")
    _want(s13.shape == (n, I2 // bn, -(-H // bk)), f"s13 {tuple(s13.shape)} does not fit w13")
    _want(s2.shape == (n, -(-H // bn), -(-I // bk)), f"s2 {tuple(s2.shape)} does not fit w2")
    fmt = dict(SN=bn, SK=bk, BLOCK_K=bk, INT4=False)
    rows13 = (w13.stride(1), s13.stride(1), 1, I)  # gate row r: row r, up row r: row I + r
    return _run(x, ids, weights, local, (w13, s13, w2, s2), I, rows13, fmt, block_m, out_dtype)


def fused_moe_int4(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    local: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    group: int,
    block_m: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """As `fused_moe_fp8`, with the experts in the CPU's packed int4 (PackedExperts' arrays as
    tensors): w13 [n, I, 2, H/2] uint8, s13 [n, I, 2, H/G] bf16 (or its bits as int16/uint16),
    w2 [n, H, I/2] uint8, s2 [n, H, I/G]; G = `group`."""
    G = group
    _want(w13.ndim == 4 and w13.shape[2] == 2, f"w13 {tuple(w13.shape)}: want [n, I, 2, H/2]")
    n, I, _, H = *w13.shape[:3], 2 * w13.shape[3]
    _want(G in (32, 64, 128), f"group {G}: want 32, 64 or 128")
    _want(H % G == 0 and I % G == 0, f"H {H} / I {I}: not multiples of the group {G}")
    _want(w13.dtype == w2.dtype == torch.uint8, f"w13/w2 {w13.dtype}/{w2.dtype}: want uint8")
    _want(w2.shape == (n, H, I // 2), f"w2 {tuple(w2.shape)} does not fit w13 {tuple(w13.shape)}")
    _want(s13.shape == (n, I, 2, H // G), f"s13 {tuple(s13.shape)} does not fit w13, group {G}")
    _want(s2.shape == (n, H, I // G), f"s2 {tuple(s2.shape)} does not fit w2, group {G}")
    s13, s2 = _bf16(s13, "s13"), _bf16(s2, "s2")
    fmt = dict(SN=1, SK=G, BLOCK_K=INT4_BLOCK_K, INT4=True)
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if ids.numel() >= DEQUANT_PAIRS * n and not capturing:
        return _dequantized(x, ids, weights, local, (w13, s13, w2, s2), G, block_m, out_dtype)
    rows13 = (w13.stride(2), s13.stride(2), 2, 1)  # [n, I, 2, .] as [n, 2I, .]: gate 2r, up 2r+1
    return _run(x, ids, weights, local, (w13, s13, w2, s2), I, rows13, fmt, block_m, out_dtype)


def dequant_bytes() -> int:
    """The dense copies' budget (a function: tests lower it)."""
    return DEQUANT_BYTES


def _dequantized(x, ids, weights, local, ws, G, block_m, out_dtype) -> torch.Tensor:
    """fused_moe_int4 at prefill sizes: the local experts dequantized to x's dtype a pass of at
    most DEQUANT_BYTES at a time (each pass the experts [e0, e1) of the stack, the others' pairs
    masked by their local index), run on the dense tiles, the passes summed in fp32."""
    w13, s13, w2, s2 = ws
    n, I, _, H = *w13.shape[:3], 2 * w13.shape[3]
    dense = x.dtype if x.is_cuda else torch.float32  # (the interpreter: fp32 dots)
    per = max(1, dequant_bytes() // (3 * H * I * dense.itemsize))  # experts a pass
    fmt = dict(SN=1, SK=max(H, I), BLOCK_K=128, INT4=False)  # one scale column: ones
    out = None
    for e0 in range(0, n, per):
        e1 = min(n, e0 + per)
        part = (dequant_int4(w13[e0:e1], s13[e0:e1], G, dense),
                torch.ones(e1 - e0, I, 2, 1, device=x.device),
                dequant_int4(w2[e0:e1], s2[e0:e1], G, dense),
                torch.ones(e1 - e0, H, 1, device=x.device))  # fmt: skip
        here = local if (e0, e1) == (0, n) else torch.where(
            (local >= e0) & (local < e1), local - e0, -1)  # fmt: skip
        rows13 = (part[0].stride(2), part[1].stride(2), 2, 1)
        y = _run(x, ids, weights, here, part, I, rows13, fmt, block_m, torch.float32)
        out = y if out is None else out.add_(y)
    return out.to(out_dtype or x.dtype)


def fused_moe_int8(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    local: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    block_m: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """As `fused_moe_int4`, with the CPU's packed int8 (one fp32 scale per row, or per group
    of G >= 128 along K): w13 [n, I, 2, H] int8, s13 [n, I, 2, H/G] fp32, w2 [n, H, I], s2
    [n, H, I/G]. The FP8 path's tiles: a K step of 128 weights lies in one scale's group, so
    its partial sums are scaled once a row (int8 -> bf16 is exact)."""
    _want(w13.ndim == 4 and w13.shape[2] == 2, f"w13 {tuple(w13.shape)}: want [n, I, 2, H]")
    n, I, _, H = w13.shape
    _want(w13.dtype == w2.dtype == torch.int8, f"w13/w2 {w13.dtype}/{w2.dtype}: want int8")
    _want(s13.dtype == s2.dtype == torch.float32, f"s13/s2 {s13.dtype}/{s2.dtype}: want fp32")
    _want(w2.shape == (n, H, I), f"w2 {tuple(w2.shape)} does not fit w13 {tuple(w13.shape)}")
    g13, g2 = s13.shape[-1], s2.shape[-1]
    _want(s13.shape == (n, I, 2, g13) and H % g13 == 0, f"s13 {tuple(s13.shape)}: not w13's")
    _want(s2.shape == (n, H, g2) and I % g2 == 0, f"s2 {tuple(s2.shape)}: not w2's")
    if g13 == g2 == 1:  # a scale per row: every K step of either matrix reads column 0
        G = max(H, I)
    else:
        G = H // g13
        ok = G == I // g2 and G % 128 == 0
        _want(ok, f"int8 groups {H // g13}/{I // g2}: want per row, or one multiple of 128")
    fmt = dict(SN=1, SK=G, BLOCK_K=128, INT4=False)
    rows13 = (w13.stride(2), s13.stride(2), 2, 1)  # [n, I, 2, .] as [n, 2I, .]: gate 2r, up 2r+1
    return _run(x, ids, weights, local, (w13, s13, w2, s2), I, rows13, fmt, block_m, out_dtype)


def _run(x, ids, weights, local, ws, I, rows13, fmt, block_m, out_dtype=None) -> torch.Tensor:
    w13, s13, w2, s2 = ws
    floats = (torch.bfloat16, torch.float16, torch.float32)
    _want(x.ndim == 2 and x.dtype in floats, f"x {x.dtype} {tuple(x.shape)}: want [T, H] float")
    T, H = x.shape
    _want(w2.shape[1] == H, f"x {tuple(x.shape)}: H does not match w2 {tuple(w2.shape)}")
    ok = ids.ndim == 2 and ids.shape[0] == T and not ids.is_floating_point()
    _want(ok, f"ids {ids.dtype} {tuple(ids.shape)}: want integer [T={T}, k]")
    ok = weights.shape == ids.shape and weights.is_floating_point()
    _want(ok, f"weights {weights.dtype} {tuple(weights.shape)}: want float {tuple(ids.shape)}")
    _want(local.ndim == 1 and not local.is_floating_point(), "local: want an integer [E]")
    _want(all(t.device == x.device for t in (ids, weights, local, *ws)), "not all on x's device")
    _want(all(t.is_contiguous() for t in ws), "w13, s13, w2 and s2 must be contiguous")
    k, n = ids.shape[1], w13.shape[0]
    bm = block_m or (16 if T * k <= 16 * n else 64)  # ~ the rows an expert gets
    _want(bm >= 16 and bm & (bm - 1) == 0, f"block_m {bm}: want a power of 2 >= 16 (tl.dot)")
    if T * k == 0 or n == 0:
        return torch.zeros_like(x)
    a = moe_align(ids, local, n, bm)
    R = a.pairs.numel()
    x = x.contiguous()
    h = torch.empty(R, I, dtype=x.dtype, device=x.device)  # [R, I] in sorted order
    y = torch.zeros(T * k, H, dtype=torch.float32, device=x.device)  # [T k, H] per pair
    rw = weights.float().contiguous().view(-1)  # [T k]
    common = dict(BLOCK_M=bm, BLOCK_N=BLOCK_N, num_warps=4, **fmt,
                  DOT_F32=x.dtype == torch.float32 or not x.is_cuda)  # fmt: skip
    w_row, s_row, step, up = rows13
    split = split_k(bm, H, fmt["BLOCK_K"])
    ks = triton.cdiv(triton.cdiv(H, fmt["BLOCK_K"]), split) * fmt["BLOCK_K"]  # K a range
    part = torch.empty(split, R, 2, I, dtype=torch.float32, device=x.device) if split > 1 else h
    _gate_up[(R // bm, triton.cdiv(I, BLOCK_N), split)](
        x, w13, s13, part, a.pairs, a.block_expert, T * k, k, H, I, up,
        w13.stride(0), w_row, s13.stride(0), s_row, ks, ROW_STEP=step, PARTIAL=split > 1,
        **common,
    )  # fmt: skip
    if split > 1:
        _silu_mul[(R, triton.cdiv(I, 1024))](part, h, a.pairs, T * k, R, I, split, BLOCK=1024)
    _down[(R // bm, triton.cdiv(H, BLOCK_N))](
        h, w2, s2, y, rw, a.pairs, a.block_expert, T * k, I, H,
        w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1), **common,
    )  # fmt: skip
    return y.view(T, k, H).sum(1).to(out_dtype or x.dtype)


def split_k(block_m: int, K: int, block_k: int) -> int:
    """gate/up's K ranges a program: at decode sizes (16-row blocks: a pair or two an expert)
    the grid is (pairs' blocks) x I / BLOCK_N, 32 programs for one pair at V3's shapes, too few
    to stream an expert's weights at HBM speed (the H200 measured one int4 expert at ~1 ms); 4
    ranges make it 128 a pair. Prefill sizes keep one (their grid is large)."""
    return min(SPLIT_K, triton.cdiv(K, block_k)) if block_m == 16 else 1


def _bf16(s: torch.Tensor, name: str) -> torch.Tensor:
    """int4 scales as bf16: bf16 itself, or its bit patterns (the CPU store's uint16)."""
    if s.dtype in (torch.int16, torch.uint16):
        return s.view(torch.bfloat16)
    _want(s.dtype == torch.bfloat16, f"{name} {s.dtype}: want bf16 (or its bits as int16/uint16)")
    return s


def _want(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
