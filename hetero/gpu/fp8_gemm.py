"""y = x W^T for a few tokens, with W in DeepSeek-V3's FP8 format (float8_e4m3fn + one float32
scale per 128x128 block) read as it is stored.

Decode multiplies 1-64 tokens by each weight: the GPU time is the weight's bytes. Dequantizing W
to bf16 first (FP8Linear's simple path) reads 1 byte, writes 2 and reads 2 again per weight; this
kernel reads the 1 byte. Each program owns BLOCK_N output rows and a share of the K blocks
(split-K when the rows alone make too few programs to keep every SM reading), multiplies one
128-wide K block at a time on the tensor cores and scales the block's partial sums by the block's
scale (one per row group): y[m, n] = sum_kb s[n // 128, kb] * sum_{k in kb} x[m, k] W_fp8[n, k].
Split-K partials go to an fp32 buffer [split, M, N] and are summed in order (deterministic):
by the last split of each tile to finish (a counter a tile, CUTLASS's serial split-K: no kernel
after the GEMV), or without counters by one more kernel that also casts; without split-K the
kernel writes y in x's dtype itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hetero.gpu.act import silu_mul_as_torch


@dataclass(frozen=True)
class Tiles:
    """The kernel's launch settings (bench/fp8_sweep.py times the alternatives)."""

    block_n: int = 64  # output rows a program owns: a [64, 128] fp8 tile is 8 KB a step
    num_warps: int = 4
    num_stages: int = 4
    per_sm: int = 4  # programs to aim for an SM, reached by split-K
    # False: one token's row dots on the CUDA cores (more rows keep the MMA). H200 (2026-12-03,
    # bench/results/*-gpu_step.md run 3): V3's GPU step at batch 1 11.26 ms against 11.81 with
    # the 16-row tf32 MMA; in fp8_sweep 1.05-1.8x faster on five of V3's six decode matrices
    mma: bool = False
    # the one-row path: K blocks an iteration (unrolled: their loads issued together, more
    # bytes in flight a program); a split's blocks are rounded up to a multiple of it. H200
    # (2026-12-04, bench/results/*-fp8_unroll.md, weights cold in L2): 2 against 1 on V3's
    # decode matrices 0.99-1.23x (a MoE layer's five 88.9 -> 87.0 us, the dense gate_up 1.23x)
    k_unroll: int = 2


TILES = Tiles()


@triton.jit
def _load_block(w_ptr, s_ptr, rows, row_ok, k, kb, last, K, stride_wn, stride_sn,
                SN: tl.constexpr):  # fmt: skip
    """W's rows `rows` [BN] over k (K block kb) -> (W [BN, BK] fp8, their scales [BN])."""
    w = tl.load(
        w_ptr + rows[:, None] * stride_wn + k[None, :],
        mask=row_ok[:, None] & (k[None, :] < K),
        other=0.0,
    )  # [BN, BK] fp8
    # past K, x and W load as 0 and any in-bounds scale will do: the last block's
    s = tl.load(
        s_ptr + (rows // SN) * stride_sn + tl.minimum(kb, last), mask=row_ok, other=0.0
    )  # [BN]
    return w, s


@triton.jit
def _row_dots(x_row, w_ptr, s_ptr, rows, row_ok, cols, split, K, last, stride_wn, stride_sn,
              SN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PER_SPLIT: tl.constexpr, KU: tl.constexpr):  # fmt: skip
    """One token x_row [K] . W's rows [BN] over this split's K blocks on the CUDA cores -> [BN]
    fp32: products scaled and kept apart [BN, BK] until the loop ends, summed once; KU blocks
    an iteration (PER_SPLIT a multiple of KU). (Loading the next block ahead by hand measured
    slower: V3's GPU step 13.5 ms against 11.1 on one H200 VM, 2026-12-04.)"""
    dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in range(0, PER_SPLIT, KU):
        for j in tl.static_range(KU):
            kb = split * PER_SPLIT + i + j
            k = kb * BLOCK_K + cols
            w, s = _load_block(w_ptr, s_ptr, rows, row_ok, k, kb, last, K, stride_wn,
                               stride_sn, SN)  # fmt: skip
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)  # [BK]
            dots += w.to(tl.float32) * x[None, :] * s[:, None]
    return tl.sum(dots, axis=1)


@triton.jit
def _mma(x, w, s, PRECISION: tl.constexpr):
    """x [BM, BK] . W [BN, BK]^T scaled by s [BN] -> [BM, BN] fp32 on the tensor cores, in fp32
    (tf32 holds bf16 activations and e4m3 exactly; bf16 operands measured slower on the H200)."""
    part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
    return part * s[None, :]


@triton.jit
def _fp8_gemm(
    x_ptr,
    w_ptr,
    s_ptr,
    p_ptr,  # x [M, K], W [N, K] fp8, s [ceil(N/SN), ceil(K/BK)], partials [S, M, N] fp32
    y_ptr,  # [M, NY] in x's dtype (NY: N, or N / 2 with SILU_MUL)
    e_ptr,  # PER_ROW_EXPERT: [M] the expert of each row of x (-1: none, its y row is 0)
    count_ptr,  # FIXUP: [tiles] int32, zero between calls (the last split resets its tile's)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_we,  # PER_ROW_EXPERT: W [E, N, K] and s [E, ., .], their strides between experts
    stride_se,
    SN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_SPLIT: tl.constexpr,
    KU: tl.constexpr,  # not MMA: K blocks an iteration of the row dots
    PRECISION: tl.constexpr,
    PER_ROW_EXPERT: tl.constexpr,
    MMA: tl.constexpr,  # False (one row, BLOCK_M 1): products and a row sum on the CUDA cores
    SILU_MUL: tl.constexpr,  # W's rows are [gate | up]: a program owns BLOCK_N rows of each
    DIRECT: tl.constexpr,  # one split: the program stores y itself
    FIXUP: tl.constexpr,  # splits: the last of a tile's splits to finish sums them into y
):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NY = N // 2 if SILU_MUL else N
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.arange(0, BLOCK_K)  # [BK]
    row_ok = rows < NY
    if PER_ROW_EXPERT:  # one row of x a program (lane 0 of the tile), with its expert's W
        lane = tl.arange(0, BLOCK_M)
        toks = pid_m + lane * 0  # [BM]
        e = tl.load(e_ptr + pid_m)
        # the masks from vector loads of e: Triton 3.9's interpreter rejects scalar & vector
        tok_ok = (lane == 0) & (tl.load(e_ptr + toks) >= 0)
        row_ok = row_ok & (tl.load(e_ptr + pid_m + rows * 0) >= 0)
        w_ptr += tl.maximum(e, 0).to(tl.int64) * stride_we
        s_ptr += tl.maximum(e, 0).to(tl.int64) * stride_se
        out_ok = (lane == 0)[:, None] & (rows < N)[None, :]  # a row without an expert: zeros
    else:
        toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        tok_ok = toks < M
        out_ok = tok_ok[:, None] & row_ok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SILU_MUL: the up rows'
    last = tl.cdiv(K, BLOCK_K) - 1  # the last K block (a scale column)
    if MMA:
        for i in range(0, PER_SPLIT):  # past K (the last split's tail) everything is masked
            kb = split * PER_SPLIT + i
            k = kb * BLOCK_K + cols
            x = tl.load(
                x_ptr + toks[:, None] * stride_xm + k[None, :],
                mask=tok_ok[:, None] & (k[None, :] < K),
                other=0.0,
            )  # [BM, BK]
            w, s = _load_block(w_ptr, s_ptr, rows, row_ok, k, kb, last, K, stride_wn, stride_sn,
                               SN)  # fmt: skip
            acc += _mma(x, w, s, PRECISION)
            if SILU_MUL:
                w, s = _load_block(w_ptr, s_ptr, rows + NY, row_ok, k, kb, last, K, stride_wn,
                                   stride_sn, SN)  # fmt: skip
                acc_up += _mma(x, w, s, PRECISION)
    else:  # one token (BLOCK_M 1, toks = [pid_m])
        x_row = x_ptr + pid_m * stride_xm
        dots = _row_dots(x_row, w_ptr, s_ptr, rows, row_ok, cols, split, K, last, stride_wn,
                         stride_sn, SN, BLOCK_N, BLOCK_K, PER_SPLIT, KU)  # fmt: skip
        acc += dots[None, :]
        if SILU_MUL:
            dots = _row_dots(x_row, w_ptr, s_ptr, rows + NY, row_ok, cols, split, K, last,
                             stride_wn, stride_sn, SN, BLOCK_N, BLOCK_K, PER_SPLIT, KU)  # fmt: skip
            acc_up += dots[None, :]
    out = y_ptr + toks[:, None] * NY + rows[None, :]
    if DIRECT:
        if SILU_MUL:
            acc = silu_mul_as_torch(acc, acc_up, y_ptr.dtype.element_ty)
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        store_split(p_ptr + toks[:, None] * N + rows[None, :], split, M * N, NY, acc, acc_up,
                    y_ptr, out, out_ok, count_ptr, tile, tl.num_programs(2), SILU_MUL,
                    FIXUP)  # fmt: skip


@triton.jit
def store_split(part_ptrs, split, stride, NY, acc, acc_up, y_ptr, out, out_ok, count_ptr, tile,
                splits, SILU_MUL: tl.constexpr, FIXUP: tl.constexpr):  # fmt: skip
    """A split's fp32 partials acc (SILU_MUL: and the up rows' acc_up, NY columns on) stored at
    part_ptrs + split * stride; with FIXUP, CUTLASS's serial split-K: a counter a tile is
    raised, and the tile's last split to finish sums every split's partials in split order
    (deterministic) into `out` in y's dtype (SILU_MUL: silu(gate) * up), then resets its
    counter for the next call (graph replays). Without FIXUP `_sum_splits` adds them after."""
    tl.store(part_ptrs + split * stride, acc, mask=out_ok)
    if SILU_MUL:
        tl.store(part_ptrs + split * stride + NY, acc_up, mask=out_ok)
    if FIXUP:
        tl.debug_barrier()  # every thread's partials stored before the count is raised
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")  # (release, then acquire)
        if done == splits - 1:  # the tile's last split: sum all in split order
            acc = tl.zeros_like(acc)
            acc_up = tl.zeros_like(acc)
            for j in range(0, splits):
                src = part_ptrs + j * stride
                acc += tl.load(src, mask=out_ok, other=0.0, cache_modifier=".cg")
                if SILU_MUL:
                    acc_up += tl.load(src + NY, mask=out_ok, other=0.0, cache_modifier=".cg")
            if SILU_MUL:
                acc = silu_mul_as_torch(acc, acc_up, y_ptr.dtype.element_ty)
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _sum_splits(p_ptr, y_ptr, S, MN, NH, BLOCK: tl.constexpr, SILU_MUL: tl.constexpr):
    """y [MN] = sum over s of p [S, MN] fp32, in order (deterministic), cast to y's dtype.
    SILU_MUL: p's rows are [gate | up], NH wide each, and y [M, NH] = silu(gate) * up."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if SILU_MUL:
        ok = i < MN // 2
        src = (i // NH) * 2 * NH + i % NH  # the gate's column; the up's is NH further
    else:
        ok = i < MN
        src = i
    acc = tl.zeros((BLOCK,), tl.float32)
    up = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, S):
        acc += tl.load(p_ptr + s * MN + src, mask=ok, other=0.0)
        if SILU_MUL:
            up += tl.load(p_ptr + s * MN + src + NH, mask=ok, other=0.0)
    if SILU_MUL:
        acc = silu_mul_as_torch(acc, up, y_ptr.dtype.element_ty)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


def fp8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    programs: int | None = None,
    silu_mul: bool = False,
    tiles: Tiles | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32), weight [N, K] float8_e4m3fn, scale [ceil(N/bn), ceil(K/bk)]
    fp32 -> y [..., N] in x's dtype. `programs`: how many programs to aim for (default:
    `tiles.per_sm` an SM on CUDA), reached by splitting K when the rows alone give fewer.
    `silu_mul`: a SwiGLU's first half, weight [2I, K] holding gate then up
    (hetero.model.fp8.fuse_fp8) -> silu(x gate^T) * (x up^T) [..., I], applied where the
    partial sums are added (no kernel after the GEMV). `tiles`: launch settings (None: TILES).
    `counters` (`tile_counters`, kept by the caller, zero between calls): split-K's partials
    are summed by the last split of each tile to finish, in the same kernel; without them by
    one more kernel (`_sum_splits`). Either way in split order: the same y, deterministically."""
    N, K = weight.shape
    if silu_mul and N % 2:
        raise ValueError(f"weight of {N} rows: gate and up want an even count")
    lead = x.shape[:-1]
    tiles = tiles or TILES
    y = _launch(x.reshape(-1, K), None, weight, scale, block, programs, silu_mul, tiles, counters)
    return y.view(*lead, N // 2 if silu_mul else N)


def tile_counters(n_rows: int, max_tokens: int, device: torch.device) -> torch.Tensor:
    """Zeroed counters enough for fp8_gemm over a weight of n_rows at up to max_tokens tokens,
    any Tiles."""
    return torch.zeros(triton.cdiv(n_rows, 16) * triton.cdiv(max_tokens, 16), dtype=torch.int32,
                       device=device)  # fmt: skip


def fp8_expert_gemm(
    x: torch.Tensor,
    experts: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    programs: int | None = None,
) -> torch.Tensor:
    """Row m of x [M, K] times expert experts[m]'s weight: weight [E, N, K] fp8, scale [E,
    ceil(N/bn), ceil(K/bk)] -> y [M, N] in x's dtype; rows with expert -1 give zeros. For a
    layer's GPU-resident experts at decode: a fixed number of rows (tokens x top-k), no host
    sync, so it can be captured in a CUDA graph."""
    if weight.ndim != 3 or experts.shape != x.shape[:1]:
        raise ValueError(f"weight {tuple(weight.shape)} / experts {tuple(experts.shape)}")
    return _launch(x, experts, weight, scale, block, programs)


def _launch(x2, experts, weight, scale, block, programs, silu_mul=False, tiles=TILES,
            counters=None):  # fmt: skip
    N, K = weight.shape[-2:]
    NY = N // 2 if silu_mul else N  # y's columns: a silu_mul program owns rows of gate and up
    bn, bk = block
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    per_row = experts is not None
    mma = tiles.mma or per_row or M > 1
    BLOCK_M = 1 if not mma else 16 if per_row else max(16, min(64, triton.next_power_of_2(M)))
    n_tiles, m_tiles, k_blocks = (
        triton.cdiv(NY, tiles.block_n),
        M if per_row else triton.cdiv(M, BLOCK_M),
        triton.cdiv(K, bk),
    )
    if programs is None:
        programs = tiles.per_sm * sm_count(x2.device) if x2.is_cuda else 1
    split = max(1, min(k_blocks, programs // max(1, n_tiles * m_tiles)))
    ku = 1 if mma else tiles.k_unroll
    per_split = triton.cdiv(triton.cdiv(k_blocks, split), ku) * ku
    split = triton.cdiv(k_blocks, per_split)  # no empty splits
    fixup = split > 1 and counters is not None and not per_row
    if fixup and counters.numel() < n_tiles * m_tiles:
        raise ValueError(f"{counters.numel()} counters for {n_tiles * m_tiles} tiles")
    y = torch.empty((M, NY), dtype=x2.dtype, device=x2.device)
    # more than one split: fp32 partials, summed by the last split of a tile or by _sum_splits
    partials = torch.empty((split, M, N), dtype=torch.float32, device=x2.device) if split > 1 else y
    if M:
        _fp8_gemm[(n_tiles, m_tiles, split)](
            x2, weight, scale, partials, y, experts if per_row else y,
            counters if fixup else y, M, N, K,
            x2.stride(0), weight.stride(-2), scale.stride(-2),
            weight.stride(0) if per_row else 0, scale.stride(0) if per_row else 0,
            SN=bn, BLOCK_M=BLOCK_M, BLOCK_N=tiles.block_n, BLOCK_K=bk, PER_SPLIT=per_split, KU=ku,
            PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", PER_ROW_EXPERT=per_row,
            MMA=mma,
            SILU_MUL=silu_mul, DIRECT=split == 1, FIXUP=fixup,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
    if split > 1 and not fixup and M:
        _sum_splits[(triton.cdiv(y.numel(), 1024),)](partials, y, split, M * N, NY,
                                                     BLOCK=1024, SILU_MUL=silu_mul)  # fmt: skip
    return y


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
