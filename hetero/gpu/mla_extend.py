"""Absorbed MLA for extend steps (prefill, chunked prefill, prefix reuse) over the paged cache.

Sequence b brings q_len new tokens, already written to the cache, at positions
ctx_len - q_len .. ctx_len - 1; new token i attends keys 0 .. ctx_len - q_len + i of its sequence
(the cached prefix and the new tokens up to itself). In latent space, with q_lat = W_UK q_nope
[h, c] and q_pe [h, r]: out_lat[t, h] = softmax_s(scale (q_lat . latent_s + q_pe . rope_s))
latent_s over those keys (`attention.absorbed_attention` is the torch reference).

A program takes BLOCK_M new tokens of one sequence times BLOCK_H heads. All heads and all new
tokens of a sequence share its keys, so the block's (token, head) pairs are flattened into the
BLOCK_M * BLOCK_H rows of one score matrix: each key block is read once for all of them and feeds
two tl.dot's (rows x C by C x BLOCK_N, then probabilities x latent). Flash-attention style: the
program walks key blocks with an online softmax (running max, sum, fp32 accumulator), stops after
the causal limit of its last token and masks keys past each row's own position. Padded rows (a
head past h, a token past q_len) take the last token's limit, so no row ever sees only masked
keys (key 0 is visible to every row: no NaN), and are not stored. Keys are found through the
int32 page table: token n of sequence b lives in page page_table[b, n // page_size], row
n % page_size. The grid is (head block, token block, sequence), head blocks fastest, so the
programs running together read the same sequence's pages (L2 hits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hetero.gpu.mla_decode import _precision


@triton.jit
def _mla_extend(
    q_lat_ptr,  # [T, h, C]
    q_pe_ptr,  # [T, h, R]
    latent_ptr,  # [pages, page_size, C] (one layer's pages)
    rope_ptr,  # [pages, page_size, R]
    table_ptr,  # [B, max_pages] int32
    starts_ptr,  # [B + 1] int32: sequence b's new tokens are rows starts[b] .. starts[b+1]-1 of T
    lens_ptr,  # [B] int32: context length (the new tokens included)
    out_ptr,  # [T, h, C]
    scale,
    H,
    stride_table,
    PAGE: tl.constexpr,
    C: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's for fp32 inputs: "ieee" (bf16/fp16 ignore it)
):
    hb, mb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(starts_ptr + b)
    q_len = tl.load(starts_ptr + b + 1) - q0
    m0 = mb * BLOCK_M
    if m0 >= q_len:  # the grid covers the longest q_len of the batch
        return
    n_ctx = tl.load(lens_ptr + b)
    rows = tl.arange(0, BLOCK_M * BLOCK_H)  # [M]: (token, head) pairs, heads fastest
    i = m0 + rows // BLOCK_H  # new token within the sequence
    heads = hb * BLOCK_H + rows % BLOCK_H
    row_ok = (i < q_len) & (heads < H)
    pos = n_ctx - q_len + tl.minimum(i, q_len - 1)  # [M] the row's last visible key
    qrow = (q0 + i).to(tl.int64) * H + heads  # [M] row of [T * h]
    cs, rs = tl.arange(0, C), tl.arange(0, R)
    q_lat = tl.load(q_lat_ptr + qrow[:, None] * C + cs[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_pe_ptr + qrow[:, None] * R + rs[None, :], mask=row_ok[:, None], other=0.0)
    end = n_ctx - q_len + tl.minimum(m0 + BLOCK_M, q_len)  # keys the block's last token sees
    m = tl.full((BLOCK_M * BLOCK_H,), float("-inf"), tl.float32)  # running max
    denom = tl.zeros((BLOCK_M * BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_M * BLOCK_H, C), tl.float32)
    for n0 in range(0, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)  # [BN]
        ok = toks < end
        page = tl.load(table_ptr + b * stride_table + toks // PAGE, mask=ok, other=0)
        krow = page.to(tl.int64) * PAGE + toks % PAGE  # [BN] row in the layer's pages
        lat = tl.load(latent_ptr + krow[:, None] * C + cs[None, :], mask=ok[:, None], other=0.0)
        rope = tl.load(rope_ptr + krow[:, None] * R + rs[None, :], mask=ok[:, None], other=0.0)
        lat = lat.to(q_lat.dtype)  # [BN, C]
        s = tl.dot(q_lat, tl.trans(lat), input_precision=PRECISION)  # [M, BN]
        s += tl.dot(q_pe, tl.trans(rope).to(q_pe.dtype), input_precision=PRECISION)
        s = tl.where(toks[None, :] <= pos[:, None], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: key 0 was in the first block
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])  # [M, BN]
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=PRECISION)
        m = m_new
    out = acc / denom[:, None]  # [M, C]
    dst = out_ptr + qrow[:, None] * C + cs[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def mla_extend(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    latent: torch.Tensor,
    rope: torch.Tensor,
    page_table: torch.Tensor,
    q_starts: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    block_m: int = 2,
    block_h: int = 16,
    block_n: int = 32,
    num_warps: int = 8,
) -> torch.Tensor:
    """q_lat [T, h, C], q_pe [T, h, R] (the batch's new tokens, sequence after sequence), one
    layer's pages latent [P, page_size, C] and rope [P, page_size, R], page_table [B, n] int32,
    q_starts [B + 1] int32 (cumulative new-token counts, from 0 to T), ctx_lens [B] int32 (after
    this step) -> out_lat [T, h, C] in q_lat's dtype. `max_q_len`: the longest q_len, which sizes
    the grid (None: read from q_starts, a host sync). A program covers block_m tokens x block_h
    heads; block_m * block_h and block_n must be powers of two >= 16 (tl.dot's tiles)."""
    if any(t.dim() != 3 for t in (q_lat, q_pe, latent, rope)):
        dims = [t.dim() for t in (q_lat, q_pe, latent, rope)]
        raise ValueError(f"q_lat, q_pe, latent, rope must be 3-D, got {dims} dimensions")
    T, H, C = q_lat.shape
    P, page, R = rope.shape
    if q_pe.shape != (T, H, R) or latent.shape != (P, page, C):
        shapes = [tuple(t.shape) for t in (q_lat, q_pe, latent, rope)]
        raise ValueError(f"q_lat, q_pe, latent, rope shapes {shapes} do not agree")
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if q_lat.dtype not in floats or q_pe.dtype != q_lat.dtype:
        raise ValueError(f"q_lat, q_pe dtypes {q_lat.dtype}, {q_pe.dtype}: want one of {floats}")
    if latent.dtype not in floats or rope.dtype != latent.dtype:
        raise ValueError(f"latent, rope dtypes {latent.dtype}, {rope.dtype}: want one of {floats}")
    if any(t.dtype != torch.int32 for t in (page_table, q_starts, ctx_lens)):
        raise ValueError("page_table, q_starts and ctx_lens must be int32")
    B = ctx_lens.shape[0] if ctx_lens.dim() == 1 else -1
    if page_table.dim() != 2 or page_table.shape[0] != B or q_starts.shape != (B + 1,):
        raise ValueError(f"page_table {tuple(page_table.shape)}, q_starts {tuple(q_starts.shape)}"
                         f", ctx_lens {tuple(ctx_lens.shape)} do not fit one batch")  # fmt: skip
    for name, n in (("C", C), ("R", R), ("block_m * block_h", block_m * block_h),
                    ("block_n", block_n)):  # fmt: skip
        if n & (n - 1) or n < 16:
            raise ValueError(f"{name} = {n}: the kernel wants a power of two >= 16")
    if block_m & (block_m - 1) or block_h & (block_h - 1):
        raise ValueError(f"block_m = {block_m}, block_h = {block_h}: want powers of two")
    tensors = (q_lat, q_pe, latent, rope, page_table, q_starts, ctx_lens)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("q_lat, q_pe, latent, rope, page_table, q_starts, ctx_lens must be "
                         "contiguous")  # fmt: skip
    out = torch.empty_like(q_lat)
    if max_q_len is None:
        max_q_len = int((q_starts[1:] - q_starts[:-1]).max()) if B else 0
    if T == 0 or max_q_len == 0:
        return out
    grid = (triton.cdiv(H, block_h), triton.cdiv(max_q_len, block_m), B)
    _mla_extend[grid](
        q_lat, q_pe, latent, rope, page_table, q_starts, ctx_lens, out, scale, H,
        page_table.stride(0), PAGE=page, C=C, R=R, BLOCK_M=block_m, BLOCK_H=block_h,
        BLOCK_N=block_n, PRECISION=_precision(q_lat), num_warps=num_warps,
    )  # fmt: skip
    return out
