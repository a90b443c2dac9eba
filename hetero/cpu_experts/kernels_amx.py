"""The GEMM path of the routed experts on AMX tiles: experts with many tokens (prefill).

Why: at 1024 tokens a V3 layer's experts get ~32 tokens each, and the work is compute-bound
(0.72 TFLOP a layer call). The VNNI row dots of kernels_q8 top out near 2 TOP/s on 16 cores and
oneDNN's bf16 matmuls at ~1.4 TFLOP/s on 32-row shapes, with a dequantized copy of each expert
first; AMX's `tdpbusd` multiplies int8 tiles 8x faster than VNNI, on the packed weights as they
are: an int4 row's nibbles are its unsigned bytes (q + 8), int8 rows its signed ones.

Shapes. A weight tile A is 16 rows x KT of k (KT = 32 or 64 bytes); an activation tile B is KT
of k x 16 tokens in VNNI order; the product C [16 rows x 16 tokens] is int32. Weights have a
scale per row and group of G along k, activations a scale per token and 128 of k (as
kernels_q8): C is taken out of the tile unit and scaled every RR = min(G, 128) of k,
acc += (C - offset * sum(x)) * s_w[row] * s_x[token], where `offset` (8 for int4 nibbles, 0 for
int8) makes the unsigned bytes signed. An int4 group of G holds its k as G/2 bytes, the low
nibbles first (formats.py), so unpacking a group gives its k in natural order.

Flow of one call (ops.moe_gemm_amx), over the experts given (each with its pairs' tokens):
1. quantize each expert's tokens, 16 a tile, into B tiles (`quantize_tiles`);
2. gate/up: items of 16 rows of w13 (8 gate/up pairs) x all the expert's token tiles, taken by
   the threads from a shared counter; h = silu(gate) * up, in f32;
3. quantize h into B tiles; 4. down: items of 16 rows of w2 -> y [pair, H], times the pair's
   router weight; 5. out[token] += its pairs' y (kernels.combine).

DEPENDS names the files whose code the cached kernels here compile in (tests check the hashes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hetero.cpu_experts import amx
from hetero.cpu_experts.simd_amx import (
    TM,
    load_scales,
    prefetch_rows,
    rescale,
    silu_tile,
    unpack_rows,
)
from hetero.cpu_experts.simd_pack import block_amax, interleave16
from hetero.cpu_experts.simd_sync import atomic_add, borrowed

DEPENDS = {
    "simd_amx.py": "06ab87a4c0786592",
    "amx.py": "2f565178e8129c46",
    "kernels.py": "2353efb5634e1e6f",
    "simd_sync.py": "c305241e8e8190da",
    "simd_pack.py": "b0ae36ec8e24291a",
}
JIT = {"nogil": True, "fastmath": True, "cache": True}
BLOCK = 128  # k per activation scale
A0, A1, B0, B1 = 1, 2, 3, 4  # tile numbers: weights, activations
CS = (0, 5, 6, 7)  # products: four token tiles in flight (each waits ~200 cycles on its C)
GROUP = len(CS)


def tile_config(kt: int) -> np.ndarray:
    b = (kt // 4, 64)  # B tiles: KT/4 rows of 16 tokens x 4 k
    return amx.config({A0: (TM, kt), A1: (TM, kt), B0: b, B1: b} | {c: (TM, 64) for c in CS})


def _product_into(c: int, b: int, b2: int):
    """An inline function: tile c = A0 . B (+ A1 . B' when nk == 2) for one token tile, its B
    tiles from byte `at` of xb (B' the next, bt bytes on) loaded into tiles b (and b2)."""

    @njit(inline="always", nogil=True, fastmath=True)
    def product(tiles, int8, nk, xb, at, bt):
        amx.tile_zero(tiles, c)
        amx.tile_load(tiles, b, xb, at, 64)
        if int8:
            amx.tile_dp_bssd(tiles, c, A0, b)
        else:
            amx.tile_dp_busd(tiles, c, A0, b)
        if nk == 2:
            amx.tile_load(tiles, b2, xb, at + bt, 64)
            if int8:
                amx.tile_dp_bssd(tiles, c, A1, b2)
            else:
                amx.tile_dp_busd(tiles, c, A1, b2)

    return product


_P0, _P1, _P2, _P3 = (_product_into(c, *bs) for c, bs in zip(CS, [(B0, B1), (B1, B0)] * 2))
# two token tiles: the second's B tiles in the idle C tiles 6 and 7 (B tiles of 64 k have the C
# tiles' shape), so its loads do not wait on _P0's products (tile registers are not renamed)
_P1_FREE = _product_into(CS[1], CS[2], CS[3])


@njit(parallel=True, **JIT)
def quantize_tiles(src, index, kt, rr, xb, xs, xsum):
    """B tiles of the rows index [U, 16] of src [N, K] f32 (-1: a zero column).

    xb [U, K/KT, KT/4, 64] i8: tile u's k-chunk c, VNNI order (row kk holds k = 4 kk .. 4 kk + 3
    of each of the 16 tokens); xs [U, K/128, 16] f32: per token and 128 of k, amax / 127;
    xsum [U, K/RR, 16] i32: the sum of the quantized values over each RR of k.
    Each token's row is quantized in k order into q [16, K], then q's 4-byte words are put side
    by side (word i of token m at 16 i + m: the tiles' order for any KT)."""
    U, K = index.shape[0], src.shape[1]
    words = xb.reshape(U, K * TM).view(np.int32)
    for u in prange(U):
        rows = borrowed(src)  # (its views: no count shared by the threads; simd_sync.borrowed)
        q = np.empty((TM, K), np.int8)
        scales = np.zeros((TM, K // BLOCK), np.float32)
        sums = np.zeros((TM, K // rr), np.int32)
        for m in range(TM):
            if index[u, m] >= 0:
                _quantize_token(rows[index[u, m]], q[m], scales[m], sums[m], rr)
            else:
                q[m] = 0
        xs[u] = scales.T
        xsum[u] = sums.T
        q32 = q.reshape(-1).view(np.int32)
        for i in range(0, K // 4, TM):
            interleave16(q32, K // 4, i, words[u], TM * i)


@njit(inline="always", **JIT)
def _quantize_token(x, q, scales, sums, rr):
    """q [K] i8 = x [K] f32 rounded on its scale a 128 of k (scales [K/128] = amax / 127); sums
    [K/rr] i32: q's sum over each rr of k. (Loops over slices from 0: numba's negative-index
    wrap of x[i] with i from b * BLOCK kept LLVM from vectorizing them.)"""
    for b in range(x.shape[0] // BLOCK):
        scale = block_amax(x, b * BLOCK) / np.float32(127.0)
        scales[b] = scale
        inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
        xb, qb = x[b * BLOCK : (b + 1) * BLOCK], q[b * BLOCK : (b + 1) * BLOCK]
        for i in range(BLOCK):
            qb[i] = np.int8(np.rint(xb[i] * inv))
    for c in range(x.shape[0] // rr):
        qc = q[c * rr : (c + 1) * rr]
        total = np.int32(0)
        for i in range(rr):
            total += np.int32(qc[i])
        sums[c] = total


@njit(inline="always", **JIT)
def _rows_times_tiles(
    tiles, w, s, row0, K, G, kt, rr, offset, xb, xs, xsum, u0, nt, acc, ab, cbuf, sw, ahead, nrow0
):  # fmt: skip
    """acc[t, n, m] = sum over k of weight row row0 + n times token m of tile u0 + t, for the
    16 rows from row0 of w (flat: int4 bytes K/2 a row, or int8 K a row) and nt token tiles.
    `ahead`: bytes of each row prefetched ahead of use (0: none; at most a row), the rows' ends
    running on into the next item's rows from nrow0 (-1: none). The 16 rows are read side by
    side, a line each at a time: 256 streams over 16 threads, more than the hardware
    prefetchers follow."""
    int8 = offset == 0
    rowb = K if int8 else K // 2
    ahead = min(ahead, rowb)
    chunk = rr if int8 else rr // 2  # bytes of a row a chunk
    nk, nq = rr // kt, K // rr
    bt = kt // 4 * 64  # bytes of a B tile
    ng = K // G
    sb = s.itemsize * ng  # scale bytes a row
    gahead = ahead // (rowb // ng)  # groups a row's prefetch runs ahead
    half = TM * rr  # ab: two buffers of unpacked A rows, chunk q in half q % 2
    ctiles = nt * TM * TM  # cbuf: two sets of nt C tiles, chunk q's in set q % 2
    acc[:ctiles] = 0.0
    if not int8:
        unpack_rows(w, row0 * rowb, rowb, ab, rr)
    g, next_group = -1, 0  # the group of chunk q; the k where the next one starts
    for q in range(nq):
        k0 = q * rr
        at = k0 if int8 else k0 // 2  # byte of the row
        if ahead > 0 and at % 64 == 0:  # each line of the rows' chunk (int8: 2 of 128 k)
            for line in range(0, max(chunk, 64), 64):
                prefetch_ahead(w, row0, nrow0, rowb, at + ahead + line)
        if k0 == next_group:
            g, next_group = g + 1, next_group + G
            if ahead > 0 and ng > 1 and g * s.itemsize % 64 == 0:
                prefetch_ahead(s, row0, nrow0, sb, (g + gahead) * s.itemsize)
        if int8:  # A straight from the weights
            amx.tile_load(tiles, A0, w, row0 * rowb + k0, rowb)
            if nk == 2:
                amx.tile_load(tiles, A1, w, row0 * rowb + k0 + kt, rowb)
        else:  # A from the rows unpacked during the last chunk (one group a row: rr = G)
            amx.tile_load(tiles, A0, ab, q % 2 * half, rr)
            if nk == 2:
                amx.tile_load(tiles, A1, ab, q % 2 * half + kt, rr)
        if ng > 1 or q < 2:  # (one scale a row: both buffers hold it from chunk 1 on)
            load_scales(s, row0 * ng + g, ng, sw[q % 2])
        cq = q % 2 * ctiles * 4  # bytes
        for g0 in range(0, nt, GROUP):  # the products of up to 4 token tiles overlap
            n = min(GROUP, nt - g0)
            step = K // kt * bt  # bytes of one token tile's B tiles
            at = ((u0 + g0) * (K // kt) + q * nk) * bt
            _P0(tiles, int8, nk, xb, at, bt)
            if n == 2 and kt == 64:
                _P1_FREE(tiles, int8, nk, xb, at + step, bt)
            elif n > 1:
                _P1(tiles, int8, nk, xb, at + step, bt)
            if n > 2:
                _P2(tiles, int8, nk, xb, at + 2 * step, bt)
            if n > 3:
                _P3(tiles, int8, nk, xb, at + 3 * step, bt)
            c0 = cq + g0 * TM * TM * 4
            amx.tile_store(tiles, CS[0], cbuf, c0, 64)
            if n > 1:
                amx.tile_store(tiles, CS[1], cbuf, c0 + 4 * TM * TM, 64)
            if n > 2:
                amx.tile_store(tiles, CS[2], cbuf, c0 + 8 * TM * TM, 64)
            if n > 3:
                amx.tile_store(tiles, CS[3], cbuf, c0 + 12 * TM * TM, 64)
        # work that the tile unit's results need not wait for: a tile store reaches ordinary
        # loads only once it has left the core (hundreds of cycles), so chunk q - 1's sums are
        # rescaled now, and the next chunk's rows unpacked
        if not int8 and q + 1 < nq:
            unpack_rows(w, row0 * rowb + (k0 + rr) // 2, rowb, ab[(q + 1) % 2 * half :], rr)
        if q > 0:
            _rescale_all(cbuf, acc, xs, xsum, sw, offset, u0, nt, q - 1, (q - 1) * rr // BLOCK)
    _rescale_all(cbuf, acc, xs, xsum, sw, offset, u0, nt, nq - 1, (nq - 1) * rr // BLOCK)


@njit(inline="always", **JIT)
def _rescale_all(cbuf, acc, xs, xsum, sw, offset, u0, nt, q, b):
    """acc of the nt token tiles += chunk q's C tiles (set q % 2 of cbuf), rescaled."""
    base = q % 2 * nt * TM * TM
    for t in range(nt):
        c = cbuf[base + t * TM * TM : base + (t + 1) * TM * TM]
        a = acc[t * TM * TM : (t + 1) * TM * TM]
        rescale(c, a, xs[u0 + t, b], xsum[u0 + t, q], sw[q % 2], offset)


@njit(**JIT)
def gate_up(
    w13, s13, H, I, G, offset, cfg, experts, first_tile, xb, xs, xsum, h, ahead, threads
):  # fmt: skip
    """Step 2: h [U, 16, I] f32 = silu(gate) * up of each expert's token tiles. w13, s13 flat
    (rows [E, I, 2]); experts [A]; first_tile [A + 1]: the expert's tiles among U."""
    pairs, scale = np.empty((0, 0), np.int64), np.empty(0, np.float32)
    _items(w13, s13, H, 2 * I, G, offset, cfg, experts, first_tile, xb, xs, xsum, ahead,
           threads, True, h, pairs, scale, np.empty((0, 0), np.float32))  # fmt: skip


@njit(**JIT)
def down(w2, s2, H, I, G, offset, cfg, experts, first_tile, hb, hs, hsum, pairs, scale, y, ahead,
         threads):  # fmt: skip
    """Step 4: y [P, H] = scale[p] * down(h) for each pair p; pairs [U, 16]: the pair of each
    token column (-1: padding)."""
    h = np.empty((0, 0, 0), np.float32)
    _items(w2, s2, I, H, G, offset, cfg, experts, first_tile, hb, hs, hsum, ahead, threads,
           False, h, pairs, scale, y)  # fmt: skip


@njit(parallel=True, **JIT)
def _items(w, s, K, R, G, offset, cfg, experts, first_tile, xb, xs, xsum, ahead, threads, gate,
           h, pairs, scale, y):  # fmt: skip
    """Items of 16 of an expert's R rows (K of k) x its token tiles, from a shared counter; their
    sums to h (gate: gate/up rows, silu) or to y (down rows, router weights)."""
    kt, rr = tile_k(G)
    A, slabs = experts.shape[0], R // TM
    counter = np.zeros(16, np.int64)
    most = _most_tiles(first_tile)
    for _ in prange(threads):
        tiles, ab, sw, acc, cbuf = _thread_state(cfg, most)
        i = atomic_add(counter, 0, 1)
        nxt = atomic_add(counter, 0, 1)  # claimed an item early: its rows are prefetched
        while i < A * slabs:
            a, slab = i // slabs, i % slabs
            u0, nt = first_tile[a], first_tile[a + 1] - first_tile[a]
            row0 = experts[a] * R + slab * TM
            nrow0 = item_row(nxt, experts, slabs, R, TM)
            _rows_times_tiles(tiles, w, s, row0, K, G, kt, rr, offset, xb, xs, xsum, u0, nt,
                              acc, ab, cbuf, sw, ahead, nrow0)  # fmt: skip
            if gate:
                silu_rows(acc, h, u0, nt, slab)
            else:
                down_rows(acc, y, pairs, scale, u0, nt, slab)
            i, nxt = nxt, atomic_add(counter, 0, 1)
        amx.tile_release(tiles)


@njit(inline="always", **JIT)
def silu_rows(acc, h, u0, nt, slab):
    """h[u0 + t, m, 8 slab + j] = silu(gate) * up from the sums acc [nt, 16 rows, 16 tokens] of
    gate/up rows 16 slab.. (they alternate gate, up), 16 tokens at a time (simd_amx.silu_tile)."""
    inter = h.shape[2]
    for t in range(nt):
        silu_tile(acc, t * TM * TM, h, (u0 + t) * TM * inter + slab * TM // 2, inter)


@njit(inline="always", **JIT)
def down_rows(acc, y, pairs, scale, u0, nt, slab):
    """y[p, 16 slab + n] = the sums acc [nt, 16 rows, 16 tokens] of down rows 16 slab.., times
    the router weight scale[p] of each token column's pair p (pairs [U, 16], -1: padding)."""
    for t in range(nt):
        for m in range(TM):
            p = pairs[u0 + t, m]
            if p >= 0:
                for n in range(TM):
                    y[p, slab * TM + n] = acc[t * TM * TM + n * TM + m] * scale[p]


@njit(inline="always", **JIT)
def item_row(i, experts, per, R, rows):
    """The first weight row of item i (`rows` rows of expert experts[i // per], its R rows in
    `per` items), -1 past the end."""
    if i >= experts.shape[0] * per:
        return -1
    return experts[i // per] * R + i % per * rows


@njit(inline="always", **JIT)
def ahead_at(row0, nrow0, rowb, pos):
    """Where the prefetch for position `pos` of the 16 rows from row0 (rowb bytes each) starts:
    byte pos of row0, or where pos runs past the rows' end, byte pos - rowb of the next item's
    rows from nrow0; -1 where there is no next item."""
    if pos < rowb:
        return row0 * rowb + pos
    if nrow0 >= 0:
        return nrow0 * rowb + pos - rowb
    return -1


@njit(inline="always", **JIT)
def prefetch_ahead(a, row0, nrow0, rowb, pos):
    """Prefetches the line at `ahead_at` of 16 rows of a, rowb bytes apart (none at -1)."""
    at = ahead_at(row0, nrow0, rowb, pos)
    if at >= 0:
        prefetch_rows(a, at, rowb)


@njit(**JIT)
def tile_k(G):
    """(KT, RR) for weights with a scale every G of k: k a tile product and k between two
    rescales (RR <= 128, the activation block; 2 tiles at most)."""
    rr = min(G, BLOCK)
    return min(rr, 64), rr


@njit(inline="always", **JIT)
def _most_tiles(first_tile):
    most = 1
    for a in range(first_tile.shape[0] - 1):
        most = max(most, first_tile[a + 1] - first_tile[a])
    return most


@njit(inline="always", **JIT)
def _thread_state(cfg, most):
    """A thread's tiles, configured (their state kept in memory where emulated), and buffers for
    items of up to `most` token tiles: unpacked A rows and the 16 rows' scales, two chunks of
    each; the f32 sums [most, 16, 16]; the C tiles of two chunks."""
    tiles = np.zeros(amx.TILES_BYTES, np.uint8)
    amx.tile_config(tiles, cfg)
    return (
        tiles,
        np.empty(2 * TM * BLOCK, np.uint8),
        np.empty((2, TM), np.float32),
        np.empty(most * TM * TM, np.float32),
        np.empty(2 * most * TM * TM, np.int32),
    )
