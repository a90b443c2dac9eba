"""Absorbed MLA decode over the engine's paged latent cache (hetero.model.batch.PagedKVCache).

One new token a sequence attends to its whole context in latent space: with q_lat = W_UK q_nope
[h, c] and q_pe [h, r], out_lat[h] = softmax_s(scale (q_lat . latent_s + q_pe . rope_s)) latent_s
(`attention._decode_latent` is the torch reference). All heads share the latent, so a program
takes BLOCK_H heads of one sequence and reads each context token's latent once for all of them
(the cache is read once a head block, not once a head). The grid is (head block, split,
sequence), head blocks fastest, so the programs that read the same tokens run side by side and
share them in L2 (measured on the H200: no faster than sequence-fastest, 1.27 ms at batch 16 x
32K: at V3's 128 heads the kernel is bound by its dot products, ~245 FLOPs a cache byte, and
reaches ~115 TFLOPS, not by HBM). Long contexts are split across programs (split-KV): split j
covers tokens [j*chunk, (j+1)*chunk), keeps an online softmax (running max, sum, fp32
accumulator), and writes its partial output and log-sum-exp; `_merge_splits` merges them in
one more kernel (`merge_splits`: its torch reference). Tokens are found through the int32 page
table: token n of sequence b lives in page page_table[b, n // page_size], row n % page_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_decode_split(
    q_lat_ptr,  # [B, h, C], the last dim contiguous
    q_pe_ptr,  # [B, h, R] likewise
    latent_ptr,  # [pages, page_size, C] (one layer's pages)
    rope_ptr,  # [pages, page_size, R]
    table_ptr,  # [B, max_pages] int32
    lens_ptr,  # [B] int32/int64: context length (the new token included) - lens_offset
    cos_ptr,  # ROTATE: [L, R/2] fp32 rotary tables
    sin_ptr,
    out_ptr,  # [B, splits, h, C] fp32; ONE: [B, h, C] in q_lat's dtype, the result
    lse_ptr,  # [B, splits, h] fp32 (not with ONE)
    scale,
    H,
    chunk,  # tokens a split
    lens_offset,  # 1 when lens are positions
    stride_table,
    stride_qb,  # q_lat's strides (an einsum's transposed output need not be copied)
    stride_qh,
    stride_pb,  # q_pe's
    stride_ph,
    PAGE: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's for fp32 inputs: "ieee" (bf16/fp16 ignore it)
    ONE: tl.constexpr,  # one split: no merge (the merge of one split is this cast)
    ROTATE: tl.constexpr,  # q_pe not yet rotated: rotate it at position lens[b] (offset 1)
    INTERLEAVE: tl.constexpr,  # ROTATE: rotary pairs (2i, 2i+1), else (i, i + R/2)
):
    hb, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    splits = tl.num_programs(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    head_ok = heads < H
    cs, rs = tl.arange(0, C), tl.arange(0, R)
    q_row = b.to(tl.int64) * stride_qb + heads.to(tl.int64) * stride_qh  # [BH]
    q_lat = tl.load(q_lat_ptr + q_row[:, None] + cs[None, :],
                    mask=head_ok[:, None], other=0.0)  # [BH, C]  # fmt: skip
    p_row = b.to(tl.int64) * stride_pb + heads.to(tl.int64) * stride_ph
    key_cols = rs  # the rope keys' columns, in q_pe's column order
    if ROTATE:  # as hetero.gpu.rope, each pair rounded to q_pe's dtype
        i = tl.arange(0, R // 2)
        if INTERLEAVE:
            first, second = 2 * i, 2 * i + 1
        else:
            first, second = i, i + R // 2
        pos = tl.load(lens_ptr + b).to(tl.int64)
        cos = tl.load(cos_ptr + pos * (R // 2) + i)[None, :]  # [1, R/2]
        sin = tl.load(sin_ptr + pos * (R // 2) + i)[None, :]
        x1 = tl.load(q_pe_ptr + p_row[:, None] + first[None, :], mask=head_ok[:, None],
                     other=0.0).to(tl.float32)  # [BH, R/2]  # fmt: skip
        x2 = tl.load(q_pe_ptr + p_row[:, None] + second[None, :], mask=head_ok[:, None],
                     other=0.0).to(tl.float32)  # fmt: skip
        dtype = q_pe_ptr.dtype.element_ty
        a, c = (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)
        q_pe = tl.reshape(tl.join(a, c), (BLOCK_H, R))  # [BH, R]: a0 c0 a1 c1 ...
        if not INTERLEAVE:  # the keys in the same order: first[j] at 2j, second[j] at 2j + 1
            key_cols = rs // 2 + (rs % 2) * (R // 2)
    else:
        q_pe = tl.load(q_pe_ptr + p_row[:, None] + rs[None, :],
                       mask=head_ok[:, None], other=0.0)  # [BH, R]  # fmt: skip
    n_ctx = tl.load(lens_ptr + b).to(tl.int32) + lens_offset
    start = split * chunk
    end = tl.minimum(start + chunk, n_ctx)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max
    denom = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, C), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)  # [BN]
        ok = toks < end
        page = tl.load(table_ptr + b * stride_table + toks // PAGE, mask=ok, other=0)
        row = page.to(tl.int64) * PAGE + toks % PAGE  # [BN] row in the layer's pages
        lat = tl.load(latent_ptr + row[:, None] * C + cs[None, :], mask=ok[:, None], other=0.0)
        rope = tl.load(rope_ptr + row[:, None] * R + key_cols[None, :], mask=ok[:, None],
                       other=0.0)  # fmt: skip
        s = tl.dot(q_lat, tl.trans(lat).to(q_lat.dtype), input_precision=PRECISION)  # [BH, BN]
        s += tl.dot(q_pe, tl.trans(rope).to(q_pe.dtype), input_precision=PRECISION)
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])  # [BH, BN]
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=PRECISION)
        m = m_new
    # an empty split (past the context) leaves m = -inf, denom = 0: lse -inf, weight 0 on merge
    safe = tl.where(denom > 0, denom, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
    base = (b * splits + split) * H + heads  # [BH]
    dst = out_ptr + base[:, None] * C + cs[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    if not ONE:
        tl.store(lse_ptr + base, lse, mask=head_ok)


@triton.jit
def _merge_splits(
    out_ptr,  # [B, S, h, C] fp32 partial outputs
    lse_ptr,  # [B, S, h] fp32 their log-sum-exps (-inf: an empty split)
    y_ptr,  # [B, h, C]
    S,
    H,
    C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    h, b = tl.program_id(0), tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    ok = ss < S
    rows = (b * S + ss) * H + h  # [BS]
    lse = tl.load(lse_ptr + rows, mask=ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # (split 0 always holds a token: never taken)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))  # [BS]
    w = w / tl.sum(w, axis=0)
    cs = tl.arange(0, C)
    part = tl.load(out_ptr + rows[:, None] * C + cs[None, :], mask=ok[:, None], other=0.0)
    y = tl.sum(part * w[:, None], axis=0)  # [C]
    tl.store(y_ptr + (b * H + h) * C + cs, y.to(y_ptr.dtype.element_ty))


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    rope: torch.Tensor,
    page_table: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
    block_h: int | None = None,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
    lens_offset: int = 0,
    rotary: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> torch.Tensor:
    """q_lat [B, h, C], q_pe [B, h, R] (one new token a sequence; any strides but the last
    dim's), one layer's pages latent [P, page_size, C] and rope [P, page_size, R], page_table
    [B, n] int32, ctx_lens [B] int32 or int64 (+ `lens_offset`: the positions of the new tokens
    with lens_offset=1, read as they are, no cast kernel a layer) -> out_lat [B, h, C] in q_lat's
    dtype. `splits`: programs a sequence's context is split over (default: enough to give every
    SM work at this batch). `block_h`: heads a program (default: `head_block`'s). `rotary`
    (cos, sin [L, R/2] fp32, interleave), with positions as
    ctx_lens (lens_offset=1): q_pe is rotated here, as hetero.gpu.rope would (one kernel a layer
    fewer at decode).
    Tiles: bench/mla_sweep.py's best on the H200 (64 heads x 64 tokens, 8 warps: 0.59 ms at
    batch 32 x 8K against 0.71 for 16 x 32 x 4 warps, 0.16 against 0.19 ms at batch 1 x 4K)."""
    B, H, C = q_lat.shape
    P, page, R = rope.shape
    if q_pe.shape != (B, H, R) or latent.shape != (P, page, C):
        shapes = [tuple(t.shape) for t in (q_lat, q_pe, latent, rope)]
        raise ValueError(f"q_lat, q_pe, latent, rope shapes {shapes} do not agree")
    if page_table.dtype != torch.int32 or ctx_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError("page_table must be int32, ctx_lens int32 or int64")
    if page_table.shape[0] != B or ctx_lens.shape != (B,):
        raise ValueError(f"page_table {tuple(page_table.shape)}, ctx_lens "
                         f"{tuple(ctx_lens.shape)} do not fit a batch of {B}")  # fmt: skip
    for name, n in (("C", C), ("R", R), ("page_size", page)):
        if n & (n - 1) or n < 16:
            raise ValueError(f"{name} = {n}: the kernel wants a power of two >= 16")
    if not all(t.is_contiguous() for t in (latent, rope, page_table)):
        raise ValueError("latent, rope and page_table must be contiguous")
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1:
        raise ValueError("q_lat and q_pe want a contiguous last dim")
    if rotary is not None:
        cos, sin, interleave = rotary
        if lens_offset != 1 or cos.shape[-1] != R // 2 or sin.shape != cos.shape:
            raise ValueError(f"rotary wants positions (lens_offset=1) and [L, {R // 2}] tables, "
                             f"got lens_offset={lens_offset}, {tuple(cos.shape)}")  # fmt: skip
        cos, sin = cos.contiguous(), sin.contiguous()
    else:
        cos = sin = ctx_lens  # not read
        interleave = False
    longest = page_table.shape[1] * page
    props = torch.cuda.get_device_properties(q_lat.device) if q_lat.is_cuda else None
    sms = props.multi_processor_count if props else 1
    block_h = block_h or head_block(B, H, longest, sms)
    if splits is None:
        splits = split_count(B * triton.cdiv(H, block_h), longest, block_n, sms)
    chunk = triton.cdiv(triton.cdiv(longest, splits), block_n) * block_n
    one = splits == 1  # the kernel stores the result: no merge kernel
    out = torch.empty(B, splits, H, C, device=q_lat.device,
                      dtype=q_lat.dtype if one else torch.float32)  # fmt: skip
    lse = out if one else torch.empty(B, splits, H, device=q_lat.device, dtype=torch.float32)
    grid = (triton.cdiv(H, block_h), splits, B)  # head blocks fastest: see the module's doc
    _mla_decode_split[grid](
        q_lat, q_pe, latent, rope, page_table, ctx_lens, cos, sin, out, lse, scale, H, chunk,
        lens_offset,
        page_table.stride(0), q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        PAGE=page, C=C, R=R, BLOCK_H=block_h, BLOCK_N=block_n,
        PRECISION=_precision(q_lat), ONE=one, ROTATE=rotary is not None,
        INTERLEAVE=interleave, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out[:, 0] if one else merge(out, lse, q_lat.dtype)


def head_block(batch: int, heads: int, longest: int, slots: int) -> int:
    """Heads a program: 64 (each context token read once for 64 heads), unless the batch's
    programs at 64, split as far as `split_count` goes (a split a 256 tokens), fill less than
    half of one wave: then 16, four times the programs (the head blocks that read the same
    tokens run side by side and share them in L2). H200, graphed (bench/mla_sweep.py --grid
    tiles, 2026-12-04): batch 1, 16 against 64 heads: 5.9 against 10.3 us at 64 tokens, 19.0
    against 30.5 at 4K; 8 x 1K 31.2 against 31.6; and where 64 fill most of a wave, 64 wins:
    4 x 4K 36 against 54 us, 16 x 1K 36 against 52."""
    most = batch * triton.cdiv(heads, 64) * max(1, triton.cdiv(longest, 256))
    return 64 if 2 * most >= slots else 16


def split_count(programs: int, longest: int, block_n: int, slots: int) -> int:
    """Splits of each sequence's context that finish the kernel soonest when `programs` head
    blocks each take `splits` programs and `slots` programs run at once (one an SM: the default
    tiles hold ~220 KB of shared memory). Time ~ waves x (steps of block_n tokens a split + one
    for the program's prologue and partial store); the fewest splits among equal times (each
    one more is merged). Candidates: the most splits that fit in 1..4 waves, one split a 256
    tokens at most. (Was ~2 programs an SM: 5 splits at V3's 32 x 4K, 320 programs in 3 waves
    of 13 steps, where 2 splits run 128 programs in one wave of 32.)"""
    cap, programs = max(1, triton.cdiv(longest, 256)), max(1, programs)
    best, best_cost = 1, None
    for s in sorted({1, *(min(cap, w * slots // programs) for w in range(1, 5))} - {0}):
        steps = triton.cdiv(triton.cdiv(longest, s), block_n)
        cost = triton.cdiv(programs * s, slots) * (steps + 1)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def merge(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`merge_splits` in one kernel, the result in `dtype`."""
    B, S, H, C = out.shape
    merged = torch.empty(B, H, C, device=out.device, dtype=dtype)
    _merge_splits[(H, B)](out, lse, merged, S, H, C=C, BLOCK_S=triton.next_power_of_2(S))
    return merged


def _precision(q: torch.Tensor) -> str:
    """fp32 queries get fp32 dots (the GPU would take TF32's 10-bit mantissas by default)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Partial outputs out [B, S, h, C] with log-sum-exps lse [B, S, h] -> [B, h, C] (fp32):
    what `_merge_splits` computes in one kernel (it was ~5 torch kernels a layer)."""
    w = torch.softmax(lse, dim=1)  # [B, S, h]: each split's share of the whole softmax
    return torch.einsum("bsh,bshc->bhc", torch.nan_to_num(w), out)
