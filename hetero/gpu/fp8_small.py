"""y = x W^T for 17-64 tokens (serving's decode batches) on FP8 tensor cores, with W in
DeepSeek-V3's FP8 blocks read as stored and the activations quantized per token per 128
channels (`fp8_prefill.quantize_act`).

At these sizes the product is still the weight's bytes, but cuBLAS's block-scaled GEMM tiles the
tokens 128 at a time: a 7168-row weight makes 56 programs for 132 SMs (V3's GPU step at 32 x 4K
spent 6.9 ms in it on the H200, ~0.55 of HBM). Here the operands are swapped, as small-batch
GEMMs do: the weight's rows are the tensor cores' M side (BLOCK_W rows a program), the tokens
their N side (16-64), each 128-wide K block one FP8 dot y^T[rows, toks] scaled by the weight
block's scale (a row's) and the token's (a column's):
    y[m, n] = sum_kb ws[n // 128, kb] * xs[m, kb] * sum_{k in kb} Wq[n, k] xq[m, k].
The K blocks are split across programs until every SM has work (split-K); the partials are
summed in split order by the last split of each tile to finish (a counter a tile, as
fp8_gemm.py does: deterministic, no kernel after). A SwiGLU's fused gate|up (`silu_mul`): a
program owns BLOCK_W rows of the gate and the same rows of up, and applies silu(gate) * up
where it stores y (no activation kernel after)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hetero.gpu.act import silu_mul_as_torch
from hetero.gpu.fp8_gemm import sm_count, store_split
from hetero.gpu.fp8_prefill import quantize_act

MAX_TOKENS = 64  # the tokens' side of one dot
BLOCK_W = 64  # the fewest weight rows a program (the tensor cores' M side): counters_for's unit


@dataclass(frozen=True)
class SmallTiles:
    """The kernel's launch settings, from bench/fp8_sweep.py --small (H200, 2026-12-05, V3's
    five decode matrices cold in L2): 64 rows, 4 programs an SM, 4 warps, 3 stages was within
    4% and 2% of each matrix's best at 16 and 32 rows on average (2 programs an SM: 4% at 64)."""

    block_w: int = 64  # weight rows a program (64 or 128)
    per_sm: int = 4  # programs to aim for an SM, reached by split-K
    num_warps: int = 4
    num_stages: int = 3


SMALL_TILES = SmallTiles()


@triton.jit
def _dot_block(w_ptr, ws_ptr, x, xs, rows, row_ok, k, k_ok, kc, K, stride_ws, SN: tl.constexpr):
    """W's rows [BW] over one K block (its columns k) . x [BT, BK] -> [BW, BT] fp32, scaled by
    the weight block's scales (a row's) and the tokens' xs [BT] (a column's)."""
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BW, BK]  # fmt: skip
    ws = tl.load(ws_ptr + (rows // SN) * stride_ws + kc, mask=row_ok, other=0.0)  # [BW]
    part = tl.dot(w, tl.trans(x), out_dtype=tl.float32)  # [BW, BT]: fp8 x fp8 -> fp32
    return part * ws[:, None] * xs[None, :]


@triton.jit
def _fp8_swap(
    xq_ptr,  # [M, K] e4m3
    xs_ptr,  # [M, K/BK] fp32
    w_ptr,  # [N, K] e4m3
    ws_ptr,  # [ceil(N/SN), ceil(K/BK)] fp32
    p_ptr,  # [S, M, N] fp32 partials (splits > 1)
    y_ptr,  # [M, NY] in the output dtype (NY: N, or N / 2 with SILU_MUL)
    count_ptr,  # [tiles] int32, zero between calls (the last split resets its tile's)
    M,
    N,
    K,
    stride_ws,
    SN: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SPLIT: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: the program stores y itself
    SILU_MUL: tl.constexpr,  # W's rows are [gate | up]: a program owns BLOCK_W rows of each
):
    pid, split = tl.program_id(0), tl.program_id(1)
    NY = N // 2 if SILU_MUL else N
    rows = pid * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW]
    toks = tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.arange(0, BLOCK_K)  # [BK]
    row_ok, tok_ok = rows < NY, toks < M
    kbs = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)  # SILU_MUL: the up rows'
    for i in range(0, PER_SPLIT):  # past K (the last split's tail) everything is masked
        kb = split * PER_SPLIT + i
        k = kb * BLOCK_K + cols
        k_ok = k < K
        x = tl.load(xq_ptr + toks[:, None] * K + k[None, :],
                    mask=tok_ok[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]  # fmt: skip
        # past K, x and W load as 0 and any in-bounds scale will do: the last block's
        kc = tl.minimum(kb, kbs - 1)
        xs = tl.load(xs_ptr + toks * kbs + kc, mask=tok_ok, other=0.0)  # [BT]
        acc += _dot_block(w_ptr, ws_ptr, x, xs, rows, row_ok, k, k_ok, kc, K, stride_ws, SN)
        if SILU_MUL:
            acc_up += _dot_block(w_ptr, ws_ptr, x, xs, rows + NY, row_ok, k, k_ok, kc, K,
                                 stride_ws, SN)  # fmt: skip
    out_ok = row_ok[:, None] & tok_ok[None, :]
    at = toks[None, :] * N + rows[:, None]  # [BW, BT]: partials[tok, row] (up: + NY)
    out = y_ptr + toks[None, :] * NY + rows[:, None]  # y[tok, row]
    if DIRECT:
        if SILU_MUL:
            acc = silu_mul_as_torch(acc, acc_up, y_ptr.dtype.element_ty)
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:  # the last split of a tile to finish sums them all (fp8_gemm.store_split)
        store_split(p_ptr + at, split, M * N, NY, acc, acc_up, y_ptr, out, out_ok, count_ptr,
                    pid, tl.num_programs(1), SILU_MUL, True)  # fmt: skip


def counters_for(n_rows: int, device: torch.device) -> torch.Tensor:
    """Zeroed tile counters enough for fp8_small over a weight of n_rows."""
    return torch.zeros(triton.cdiv(n_rows, BLOCK_W), dtype=torch.int32, device=device)


def fp8_small(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    counters: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    programs: int | None = None,
    silu_mul: bool = False,
    tiles: SmallTiles = SMALL_TILES,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32, at most MAX_TOKENS rows), weight [N, K] float8_e4m3fn,
    scale [ceil(N/bn), ceil(K/bk)] fp32 -> y [..., N] in x's dtype. `counters`
    (`counters_for`, kept by the caller: zero between calls, one a weight). `programs`: how
    many to aim for (default `tiles.per_sm` an SM on CUDA), reached by splitting K. `silu_mul`:
    weight [2I, K] holds a SwiGLU's gate then up -> silu(x gate^T) * (x up^T) [..., I]."""
    N, K = weight.shape
    bn, bk = block
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > MAX_TOKENS:
        raise ValueError(f"{M} tokens: fp8_small takes at most {MAX_TOKENS}")
    if weight.dtype != torch.float8_e4m3fn or not weight.is_contiguous():
        raise ValueError(f"weight {weight.dtype}: want a contiguous float8_e4m3fn")
    if scale.dtype != torch.float32 or scale.shape != (triton.cdiv(N, bn), triton.cdiv(K, bk)):
        raise ValueError(f"scale {scale.dtype} {tuple(scale.shape)} does not fit weight "
                         f"{N}x{K} in {block}")  # fmt: skip
    if bk & (bk - 1) or bk < 16:
        raise ValueError(f"block {block}: its K size must be a power of two >= 16")
    if silu_mul and N % 2:
        raise ValueError(f"weight of {N} rows: gate and up want an even count")
    NY = N // 2 if silu_mul else N
    if tiles.block_w % BLOCK_W:
        raise ValueError(f"block_w {tiles.block_w}: a multiple of {BLOCK_W}")
    n_tiles = triton.cdiv(NY, tiles.block_w)
    if counters.numel() < n_tiles or counters.dtype != torch.int32:
        raise ValueError(f"{counters.numel()} {counters.dtype} counters for {n_tiles} tiles")
    y = torch.empty(M, NY, device=x.device, dtype=x.dtype)
    if M == 0:
        return y.view(*lead, NY)
    xq, xs = quantize_act(x2, bk)  # [M, K] e4m3, [M, K/bk] fp32
    if programs is None:
        programs = tiles.per_sm * sm_count(x.device) if x.is_cuda else 1
    k_blocks = triton.cdiv(K, bk)
    per_split = triton.cdiv(k_blocks, max(1, min(k_blocks, programs // n_tiles)))
    split = triton.cdiv(k_blocks, per_split)  # no empty splits
    partials = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    _fp8_swap[(n_tiles, split)](
        xq, xs, weight, scale, partials, y, counters, M, N, K, scale.stride(0),
        SN=bn, BLOCK_W=tiles.block_w, BLOCK_T=max(16, triton.next_power_of_2(M)), BLOCK_K=bk,
        PER_SPLIT=per_split, DIRECT=split == 1, SILU_MUL=silu_mul,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip
    return y.view(*lead, NY)
